"""The one Celery task of a device: run a command, publish its reply, then let Celery ack."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.worker.strategy import default as default_strategy
from kombu import Connection, Producer

from broker_config import names
from broker_config.envelope import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    TRANSFER_HEADER,
    chunk_headers,
    split_chunks,
    task_headers,
)
from broker_config.settings import Settings
from consumer.runtime.device import DeviceRuntime
from consumer.runtime.replies import crashed_reply
from consumer.store.limits import StoreLimits
from consumer.store.sqlite import SqliteStore
from consumer.worker.delivery_attempts import DeliveryAttempts
from schemas.command_pb2 import Reply
from schemas.errors import DeviceError
from schemas.wire import decode_reply, encode_reply

log = logging.getLogger(__name__)

# Error codes whose command is dead-lettered after its error reply: the message itself is bad.
DEAD_LETTER_CODES = frozenset({"DECODE_FAILED", "UNSUPPORTED_SCHEMA", "OP_NOT_ALLOWED"})

_runtimes: dict[tuple[int, str, str], DeviceRuntime] = {}
_attempts: dict[tuple[int, str], DeliveryAttempts] = {}


def _settings(task: Task) -> Settings:
    s = getattr(task.app.conf, "fedplan_settings", None)
    return s if isinstance(s, Settings) else Settings.from_env()


def _device_id(task: Task) -> str:
    device = os.environ.get("FEDPLAN_DEVICE_ID") or names.device_from_queue(
        (task.request.delivery_info or {}).get("routing_key") or ""
    )
    if not device:
        raise DeviceError(
            "cannot tell which device this worker is: consume a fedplan.device.<id> queue "
            "or set FEDPLAN_DEVICE_ID"
        )
    return device


def _runtime(task: Task, device_id: str, settings: Settings) -> DeviceRuntime:
    key = (os.getpid(), device_id, str(settings.data_dir))
    runtime = _runtimes.get(key)
    if runtime is None:
        limits = StoreLimits.from_settings(settings)
        store = SqliteStore(settings.data_dir, limits=limits)
        runtime = DeviceRuntime(
            device_id=device_id,
            store=store,
            forward=lambda dest, data: _forward(task, dest, data),
            limits=limits,
        )
        _runtimes[key] = runtime
    return runtime


def _publish(
    task: Task,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    headers: dict[str, Any],
    correlation_id: str,
    reply_to: str | None = None,
) -> None:
    """Publish with publisher confirms: returns once the broker has taken every piece."""
    settings = _settings(task)
    producer = _confirming_producer(settings)
    pieces = split_chunks(body, settings.max_message_size)
    for i, piece in enumerate(pieces):
        extra = chunk_headers(correlation_id, i, len(pieces)) if len(pieces) > 1 else {}
        producer.publish(
            bytes(piece),
            exchange=exchange,
            routing_key=routing_key,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            headers={**headers, **extra},
            correlation_id=correlation_id,
            reply_to=reply_to,
            user_id=producer.connection.userid,
            delivery_mode=2,
            retry=True,
            declare=[],
        )


_producers: dict[int, Producer] = {}


def _confirming_producer(settings: Settings) -> Producer:
    """This process's producer for replies, on a connection in publisher-confirm mode.

    Only replies (and forwarded commands) wait for confirms; Celery's own event messages
    keep the worker's connection without them.
    """
    producer = _producers.get(os.getpid())
    if producer is None:
        conn = Connection(
            settings.broker_url,
            heartbeat=0,  # nobody would send them between tasks; TCP keepalive instead
            transport_options={"confirm_publish": True},
        )
        producer = Producer(conn, auto_declare=False)
        _producers.clear()  # a forked child never uses its parent's connection
        _producers[os.getpid()] = producer
    return producer


def _forward(task: Task, device_id: str, command: bytes) -> None:
    """MoveObject: publish a command to another device's queue, replying where we reply."""
    command_id = hashlib.sha256(command).hexdigest()[:16]
    _publish(
        task,
        command,
        exchange=names.commands_exchange(),
        routing_key=names.device_routing_key(device_id),
        headers=task_headers(command_id),
        correlation_id=command_id,
        reply_to=task.request.reply_to,
    )


def _assemble(settings: Settings, request: Any, data: bytes) -> bytes | None:
    """Store one chunk; the whole command once every chunk is there, else None."""
    count = int(getattr(request, CHUNKS_HEADER, None) or 1)
    if count <= 1:
        return data
    transfer = str(getattr(request, TRANSFER_HEADER, ""))
    index = int(getattr(request, CHUNK_HEADER, 0))
    folder = Path(settings.data_dir) / "chunks" / hashlib.sha256(transfer.encode()).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{index}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / str(index))
    parts = [folder / str(i) for i in range(count)]
    if not all(p.exists() for p in parts):
        return None
    whole = b"".join(p.read_bytes() for p in parts)
    return whole


def _done_with_chunks(settings: Settings, request: Any) -> None:
    transfer = getattr(request, TRANSFER_HEADER, None)
    if transfer is not None:
        folder = (
            Path(settings.data_dir) / "chunks" / hashlib.sha256(str(transfer).encode()).hexdigest()
        )
        shutil.rmtree(folder, ignore_errors=True)


def _deliveries(settings: Settings, request: Any) -> int:
    """How often this message was delivered; redeliveries are counted durably first."""
    if not (request.delivery_info or {}).get("redelivered"):
        return 1
    key = (os.getpid(), str(settings.data_dir))
    attempts = _attempts.get(key)
    if attempts is None:
        attempts = _attempts[key] = DeliveryAttempts(settings.data_dir)
    return attempts.record_redelivery(str(request.id))


def guarded_strategy(task: Task, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy, except that malformed messages are dead-lettered at once.

    kombu hands an empty body to no decoder, and a message without an ``id`` header fails
    inside Celery's consumer: either way Celery would restart its connection and receive
    the same message again, forever.
    """
    handler = default_strategy(task, app, consumer, **kwargs)

    def on_message(message: Any, *args: Any, **kw: Any) -> Any:
        if not message.body or not (message.headers or {}).get("id"):
            log.error("rejecting a message without body or id header to the dead-letter queue")
            message.reject_log_error(log, consumer.connection_errors, requeue=False)
            return None
        return handler(message, *args, **kw)

    return on_message


@shared_task(
    name=names.TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    Strategy="consumer.worker.tasks:guarded_strategy",
)
def handle(self: Task, data: bytes) -> None:
    """Run one command (or collect one chunk of it) and publish the reply before the ack.

    The reply goes to the results exchange with the message's ``reply_to`` as routing key
    and the command id as ``correlation_id``. A message that cannot be a valid command gets
    its error reply and is then rejected to the dead-letter queue.
    """
    settings = _settings(self)
    request = self.request
    whole = _assemble(settings, request, data)
    if whole is None:
        return  # more chunks to come; this one is stored, ack it
    runtime = _runtime(self, _device_id(self), settings)
    deliveries = _deliveries(settings, request)
    if deliveries > settings.delivery_limit:
        _refuse_unless_done(self, runtime, whole, deliveries)
    reply = runtime.handle(whole)
    store = runtime.store
    if isinstance(store, SqliteStore):
        store.flush()  # in-place changes of commands that stored no reply (reads, errors)
    try:
        parsed = decode_reply(reply)
    except Exception:  # the runtime always encodes; be safe anyway
        log.exception("the runtime returned an undecodable reply")
        parsed = Reply()
    command_id = parsed.command_id or str(request.correlation_id or request.id)
    if not parsed.command_id and parsed.WhichOneof("outcome") == "error":
        parsed.command_id = command_id  # undecodable: answer under the message's id
        reply = encode_reply(parsed)
    if request.reply_to:
        _publish(
            self,
            reply,
            exchange=names.results_exchange(),
            routing_key=request.reply_to,
            headers={},
            correlation_id=command_id,
        )
    else:
        log.warning("command %s has no reply_to; its reply is dropped", command_id)
    _done_with_chunks(settings, request)
    if parsed.WhichOneof("outcome") == "error" and parsed.error.code in DEAD_LETTER_CODES:
        raise Reject(f"{parsed.error.code}: {parsed.error.message}", requeue=False)


def _refuse_unless_done(task: Task, runtime: DeviceRuntime, data: bytes, deliveries: int) -> None:
    """Answer a poison command with an error reply and reject it to the dead-letter queue
    without running it; returns when the command has a stored reply (it ran to the end)."""
    request = task.request
    message_id = str(request.correlation_id or request.id)
    reply = crashed_reply(runtime.device_id, data, deliveries, message_id)
    command_id = decode_reply(reply).command_id or message_id
    if runtime.store.get_reply(command_id) is not None:
        return  # it ran to the end once, only the ack got lost: republish its reply
    log.error("command %s delivered %d times: refused, dead-lettered", command_id, deliveries)
    if request.reply_to:
        _publish(
            task,
            reply,
            exchange=names.results_exchange(),
            routing_key=request.reply_to,
            headers={},
            correlation_id=command_id,
        )
    _done_with_chunks(_settings(task), request)
    raise Reject(f"command {command_id} crashed its worker {deliveries - 1} times", requeue=False)
