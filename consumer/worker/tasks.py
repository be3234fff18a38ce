"""The one Celery task of a device: run a command, publish its reply, then let Celery ack."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from celery import Task, shared_task, signals
from celery.exceptions import Reject

from broker_config import names
from broker_config.envelope import task_headers
from broker_config.settings import Settings
from consumer.policy.audit import AuditLog
from consumer.policy.rules import PolicyFile
from consumer.runtime.device import DeviceRuntime
from consumer.runtime.replies import crashed_reply, encode_safely, error_reply
from consumer.store.limits import StoreLimits
from consumer.store.sqlite import SqliteStore
from consumer.worker.chunks import assemble, done_with_chunks
from consumer.worker.devices import DEVICE_HEADER, device_settings
from consumer.worker.gate import DELIVERIES_HEADER, ON_BEHALF_HEADER, SENDER_HEADER
from consumer.worker.limits import time_budget
from consumer.worker.memory import command_memory
from consumer.worker.publishing import (
    confirming_producer,
    forget_connection,
    publish,
    publish_reply,
)
from schemas.command_pb2 import Reply
from schemas.errors import DeviceError, FedplanError, TimeLimitError
from schemas.tensor_codec import FramedParts
from schemas.wire import decode_reply, decode_reply_framed, encode_reply

log = logging.getLogger(__name__)

# Error codes whose command is dead-lettered after its error reply: the message itself is bad.
DEAD_LETTER_CODES = frozenset({"DECODE_FAILED", "UNSUPPORTED_SCHEMA", "OP_NOT_ALLOWED"})

_runtimes: dict[tuple[int, str, str], DeviceRuntime] = {}


def _pool_process_init(**_: Any) -> None:
    """In each new pool process: torch's intra-op threads from ``settings.torch_threads``.

    torch starts one thread per core in every process; eight device workers on two cores
    then ran each small op on two threads that fought the other workers' threads (see
    docs/performance.md). Celery sends ``worker_process_init`` in the child after the fork.
    """
    s = getattr(handle.app.conf, "fedplan_settings", None)
    threads = (s if isinstance(s, Settings) else Settings.from_env()).torch_threads
    if threads > 0:
        torch.set_num_threads(threads)


signals.worker_process_init.connect(
    _pool_process_init, weak=False, dispatch_uid="fedplan-pool-process-init"
)


def _settings(task: Task) -> Settings:
    s = getattr(task.app.conf, "fedplan_settings", None)
    return s if isinstance(s, Settings) else Settings.from_env()


def _device_id(task: Task) -> str:
    """The device of the queue the command came from (set by the gate from the broker's
    consumer tag, never from what the sender wrote)."""
    device = getattr(task.request, DEVICE_HEADER, None)
    if not isinstance(device, str) or not device:
        raise DeviceError(
            "cannot tell which device this command is for: consume fedplan.device.<id> queues "
            "through the gate"
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
            policy=PolicyFile(settings.data_dir),
            audit=AuditLog(settings.data_dir),
        )
        _runtimes[key] = runtime
    return runtime


def _forward(task: Task, device_id: str, command: bytes) -> None:
    """MoveObject: publish a command to another device's queue, replying where we reply,
    for the producer the move runs for (honoured by the destination from device users)."""
    command_id = hashlib.sha256(command).hexdigest()[:16]
    headers = task_headers(command_id)
    behalf = _sender(task.request)
    if behalf != _settings_user(task):
        headers[ON_BEHALF_HEADER] = behalf
    publish(
        _settings(task),
        command,
        exchange=names.commands_exchange(),
        routing_key=names.device_routing_key(device_id),
        headers=headers,
        correlation_id=command_id,
        reply_to=task.request.reply_to,
    )


@shared_task(
    name=names.TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    Request="consumer.worker.requests:DeviceRequest",
)
def handle(self: Task, data: bytes) -> None:
    """Run one command (or collect one chunk of it) and publish the reply before the ack.

    The gate (:mod:`consumer.worker.gate`) checked the message and counted its deliveries
    first. The reply goes to the results exchange with the message's ``reply_to`` as routing
    key and the command id as ``correlation_id``. A message that cannot be a valid command
    gets its error reply and is then rejected to the dead-letter queue. The device's soft
    time limit is enforced here (a ``TIME_LIMIT`` error reply); Celery's hard limit is the
    backstop (:class:`~consumer.worker.requests.DeviceRequest`).
    """
    request = self.request
    device_id = _device_id(self)
    settings = device_settings(_settings(self), device_id)
    deliveries = _deliveries(request)
    if deliveries > settings.delivery_limit:
        _refuse_unless_done(self, _runtime(self, device_id, settings), data, deliveries)
    try:
        whole = assemble(settings, request, data)
    except FedplanError as exc:  # a transfer beyond the device's bounds
        _answer(self, _error(device_id, request, exc))
        done_with_chunks(settings, request)
        raise Reject(f"{exc.code}: {exc.message}", requeue=False) from None
    if whole is None:
        return  # more chunks to come; this one is stored, ack it
    runtime = _runtime(self, device_id, settings)
    try:
        sender = _sender(request)
    except DeviceError as exc:
        _answer(self, _error(device_id, request, exc))
        done_with_chunks(settings, request)
        raise Reject(f"{exc.code}: {exc.message}", requeue=False) from None
    seconds, hint = settings.soft_time_limit, "raise FEDPLAN_SOFT_TIME_LIMIT on the device"
    try:
        budgets = runtime.policy_source.current().budgets
        wall, alloc = budgets.max_wall_seconds, budgets.max_alloc_bytes
    except Exception:  # an invalid policy file: the runtime refuses the command itself
        wall = alloc = 0
    if wall and wall < seconds:
        seconds, hint = wall, "ask the operator (policy budget max_wall_seconds)"
    try:
        with time_budget(seconds, hint), command_memory(alloc):
            reply = runtime.handle_parts(whole, sender)  # large values: parts, not joined
    except TimeLimitError as exc:  # fired outside the runtime's own error handling
        reply = _error(device_id, request, exc)
    store = runtime.store
    if isinstance(store, SqliteStore):
        store.flush()  # in-place changes of commands that stored no reply (reads, errors)
    try:  # the reply's tensor frames are not copied into protobuf bytes to read its id
        if isinstance(reply, FramedParts) and isinstance(reply.message, Reply):
            parsed = reply.message
        else:
            parsed = decode_reply_framed(reply)[0]
    except Exception:  # the runtime always encodes; be safe anyway
        log.exception("the runtime returned an undecodable reply")
        parsed = Reply()
    command_id = parsed.command_id or str(request.correlation_id or request.id)
    if not parsed.command_id and parsed.WhichOneof("outcome") == "error":
        parsed.command_id = command_id  # undecodable: answer under the message's id
        reply = encode_reply(parsed)
    try:
        _answer(self, reply, command_id)
    except Exception as exc:  # the broker did not take the reply (a node lost, say)
        forget_connection()
        log.warning("reply to %s not published (%r); the command is requeued", command_id, exc)
        # Its effects and reply are committed: the redelivery is answered from the cache.
        raise Reject(f"reply to {command_id} not published: {exc!r}", requeue=True) from None
    done_with_chunks(settings, request)
    if parsed.WhichOneof("outcome") == "error" and parsed.error.code in DEAD_LETTER_CODES:
        raise Reject(f"{parsed.error.code}: {parsed.error.message}", requeue=False)


def _sender(request: Any) -> str:
    """Who sent the command: the gate's ``fedplan_sender`` (from the AMQP ``user_id``)."""
    sender = getattr(request, SENDER_HEADER, None)
    if not isinstance(sender, str) or not sender:
        raise DeviceError("the command reached the task without its sender; refused")
    return sender


def _settings_user(task: Task) -> str:
    """The broker user this worker publishes as."""
    return str(confirming_producer(_settings(task)).connection.userid or "")


def _deliveries(request: Any) -> int:
    """How often the gate saw this message delivered (1 when it did not say)."""
    n = getattr(request, DELIVERIES_HEADER, None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _error(device_id: str, request: Any, exc: FedplanError) -> bytes:
    command_id = str(request.correlation_id or request.id)
    return encode_safely(error_reply(device_id, command_id, [], exc))


def _answer(task: Task, reply: bytes | FramedParts, command_id: str | None = None) -> None:
    request = task.request
    cid = command_id or str(request.correlation_id or request.id)
    if request.reply_to:
        publish_reply(_settings(task), reply, reply_to=request.reply_to, command_id=cid)
    else:
        log.warning("command %s has no reply_to; its reply is dropped", cid)


def _refuse_unless_done(task: Task, runtime: DeviceRuntime, data: bytes, deliveries: int) -> None:
    """Answer a poison command with an error reply and reject it to the dead-letter queue
    without running it; returns when the command has a stored reply (it ran to the end)."""
    request = task.request
    message_id = str(request.correlation_id or request.id)
    reply = crashed_reply(runtime.device_id, data, deliveries, message_id)
    command_id = decode_reply(reply).command_id or message_id
    try:
        done = runtime.cached_reply(command_id, _sender(request)) is not None
    except DeviceError:
        done = False
    if done:
        return  # it ran to the end once, only the ack got lost: republish its reply
    log.error("command %s delivered %d times: refused, dead-lettered", command_id, deliveries)
    _answer(task, reply, command_id)
    done_with_chunks(device_settings(_settings(task), runtime.device_id), request)
    raise Reject(f"command {command_id} crashed its worker {deliveries - 1} times", requeue=False)
