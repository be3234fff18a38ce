"""The RabbitMQ transport: one I/O thread owns a pika connection; the only pika importer."""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any
from urllib.parse import quote

import pika
import pika.data
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from broker_config import names, topology
from broker_config.envelope import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    Pieces,
    chunk_headers,
    message_pieces,
    task_headers,
)
from broker_config.settings import Settings
from producer.transport.journal import ProducerIdInUse
from producer.transport.reassembly import (
    MIN_CHUNK_CHARGE,
    RejectedReply,
    ReplyAssembler,
    reply_sender,
)
from schemas.errors import BrokerUnavailable, DeviceNotFound, PublishTimeout, TransportError

log = logging.getLogger(__name__)

_Work = Callable[[BlockingChannel], Any]

NACK_RETRIES = 5
"""Nacked publishes of one command (each followed by a pause and a reconnect: 3 s in all)
before it is refused."""

MAX_INCOMPLETE_REPLIES = 256
"""Incomplete chunked replies held at once (the oldest is dropped to make room)."""


def _total_timestamps() -> None:
    """Make pika's header decoding total for timestamps (once per process).

    pika turns a header timestamp into a ``datetime`` and raises past the year 9999, while
    decoding the frame: one reply with ``{"t": <2**64-1 as a timestamp>}`` in its headers
    (RabbitMQ passes it through) would drop the connection, and the redelivered message
    would drop every reconnect after it. Such a timestamp is kept as its integer seconds.
    """
    original = pika.data.decode_value
    if getattr(original, "_fedplan_total", False):
        return

    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        try:
            return original(encoded, offset)
        except (OverflowError, OSError, ValueError):
            if encoded[offset : offset + 1] != b"T":
                raise
            (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
            return seconds, offset + 9

    decode_value._fedplan_total = True  # type: ignore[attr-defined]
    pika.data.decode_value = decode_value


_total_timestamps()


PREFETCH = 64
"""Unacked reply messages the broker sends ahead; half of them may be chunks of incomplete
replies left unacked until their reply is whole, so a killed producer gets them again."""


def _settle(fut: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete a future unless its caller cancelled it meanwhile (never raises)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class AmqpTransport:
    """Publishes commands to device queues and feeds replies from a durable results queue.

    pika is not thread-safe, so one I/O thread owns the connection and its channel; callers
    hand it work through a queue and wait on a future. Publishes use publisher confirms,
    ``mandatory`` (a device without a queue raises ``DeviceNotFound`` at once) and
    persistent delivery, in Celery's task message protocol v2 so a stock ``celery worker``
    consumes them. The connection is re-established with exponential backoff; work handed
    over meanwhile waits, and replies that arrived meanwhile wait in the durable results
    queue (named after ``settings.producer_id``, so a restarted producer finds them).

    Parameters
    ----------
    on_reply
        Called from the I/O thread with each encoded ``Reply`` (chunks reassembled), as
        ``on_reply(data)`` for a reply from the producer's own broker user (everything on
        one shared user, e.g. ``guest``: devices cannot be told apart) or one listed in
        ``settings.trusted_reply_users``, and as
        ``on_reply(data, sender=device_id)`` for one from a least-privilege device user
        ``fedplan-device-<id>`` (``ReplyCollector.on_reply`` then accepts it only for a
        command sent to that device). Messages from any other user, or with no
        ``user_id``, and malformed or oversized chunks are acked and dropped
        (``rejected_replies`` counts them); see ``producer.transport.reassembly``.
    settings
        Broker URL, producer id, maximum message size, timeouts.
    url
        Overrides ``settings.broker_url``.

    Examples
    --------
    >>> t = AmqpTransport(on_reply=print, settings=Settings())  # doctest: +SKIP
    >>> t.ensure_device("alice")  # doctest: +SKIP
    >>> t.publish("alice", command_bytes, command_id="c1")  # doctest: +SKIP
    >>> t.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        on_reply: Callable[..., None],
        settings: Settings | None = None,
        url: str | None = None,
    ) -> None:
        s = settings or Settings.from_env()
        if url is not None:
            s = s.replace(broker_url=url)
        if s.producer_id is None:
            from schemas.wire import new_id

            s = s.replace(producer_id=f"p{new_id()}")
        self.settings = s
        self.producer_id: str = s.producer_id or ""
        self.results_queue = names.results_queue(self.producer_id)
        self._on_reply = on_reply
        self._params = connection_parameters(s, f"fedplan producer {self.producer_id}")
        extra = {u.strip() for u in s.trusted_reply_users.split(",") if u.strip()}
        self.user: str = self._params[0].credentials.username
        """The broker user this producer connects as: the identity devices see."""
        self._trusted_users = frozenset({self.user, *extra})
        self._assembler = ReplyAssembler(
            max_reply_size=s.max_reply_size,
            max_pending_bytes=2 * s.max_reply_size,
            max_transfers=MAX_INCOMPLETE_REPLIES,
            ttl=s.reply_transfer_ttl,
            max_held=PREFETCH // 2,
            min_chunk_charge=MIN_CHUNK_CHARGE,
        )
        self.rejected_replies = 0
        """Reply messages refused (malformed, over a bound, or from a user not allowed)."""
        self._work: deque[tuple[_Work, Future[Any]]] = deque()
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._closing = threading.Event()
        self._ready: Future[None] = Future()
        self._devices: set[str] = set()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="fedplan-amqp-io", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout=s.confirm_timeout)
        except Exception:
            self.close()
            raise

    # -- the Transport protocol --------------------------------------------------------

    def publish(self, device_id: str, command: bytes | Pieces, *, command_id: str) -> None:
        """Publish one command (chunked above the maximum message size); wait for confirms.

        ``command`` is the encoded command, or its framed parts (``encode_command_parts``):
        then each chunk is copied once from the tensors' memory, never the whole command.
        Raises ``DeviceNotFound`` when no queue is bound for the device and
        ``TransportError`` when the broker refuses it (e.g. the device queue is full).
        """
        routing_key = names.device_routing_key(device_id)
        count = message_pieces(command, self.settings.max_message_size)[0]
        abandoned = threading.Event()  # set when the caller stops waiting

        def work(ch: BlockingChannel) -> None:
            _, pieces = message_pieces(command, self.settings.max_message_size)  # anew on a retry
            for i, piece in enumerate(pieces):
                if abandoned.is_set() or self._closing.is_set():
                    raise PublishTimeout(
                        f"command {command_id} abandoned after {i} of {count} pieces",
                        device_id=device_id,
                    )
                extra = chunk_headers(command_id, i, count) if count > 1 else None
                task_id = command_id if count == 1 else f"{command_id}.{i}"
                props = pika.BasicProperties(
                    content_type=CONTENT_TYPE,
                    content_encoding=CONTENT_ENCODING,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    correlation_id=command_id,
                    reply_to=names.results_routing_key(self.producer_id),
                    headers=task_headers(task_id, extra=extra),
                    priority=0,
                    user_id=self.user,  # the broker refuses it unless it is our user
                )
                try:
                    ch.basic_publish(names.commands_exchange(), routing_key, piece, props, True)
                except pex.UnroutableError:
                    raise DeviceNotFound(
                        f"no queue for device {device_id!r}; start its worker or create it "
                        "with fleet.device(...) / `fedplan broker setup --device`",
                        device_id=device_id,
                    ) from None
                except pex.NackError:
                    nacks[0] += 1
                    if nacks[0] > NACK_RETRIES:
                        raise TransportError(
                            f"the broker refused a command for device {device_id!r}; its "
                            f"queue is probably full ({self.settings.queue_max_length} "
                            "messages): is the device's worker running?",
                            device_id=device_id,
                        ) from None
                    # After a cluster node was lost, a channel that published to a quorum
                    # queue before its new leader was elected keeps being nacked (RabbitMQ
                    # 3.10); a new connection is not. Reconnect, then publish again (a
                    # repeated command id is answered from the device's reply cache).
                    ch.connection.sleep(0.2 * nacks[0])
                    raise pex.ChannelWrongStateError("publish nacked; reconnecting") from None

        nacks = [0]
        try:
            self._call(work, abandoned)
        except PublishTimeout as e:
            raise PublishTimeout(
                f"the broker did not confirm command {command_id} ({len(command)} bytes, "
                f"{count} message(s)) for device {device_id!r} within "
                f"{self.settings.confirm_timeout}s; the rest of it is not sent (pieces already "
                "taken may still arrive); raise FEDPLAN_CONFIRM_TIMEOUT for large commands",
                device_id=device_id,
            ) from e

    def ensure_device(self, device_id: str) -> None:
        """Declare the device's durable queue and bind it (idempotent)."""
        spec = topology.device_queue(device_id, self.settings)

        def work(ch: BlockingChannel) -> None:
            if self.settings.producer_declares:
                self._declare_queue(ch, spec)
            self._devices.add(device_id)

        self._call(work)

    @property
    def incomplete_replies(self) -> tuple[int, int]:
        """How many chunked replies are incomplete, and how many bytes they hold."""
        return self._assembler.transfers, self._assembler.pending_bytes

    @property
    def alive(self) -> bool:
        """Whether the I/O thread runs (it stops only on ``close``)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the I/O thread and close the connection (pending replies stay queued)."""
        self._closing.set()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # -- hand-over to the I/O thread ---------------------------------------------------

    def _call(self, work: _Work, abandoned: threading.Event | None = None) -> Any:
        """Run ``work`` on the I/O thread (after a reconnect if need be) and wait for it.

        Past ``confirm_timeout`` the call fails alone: work not started is withdrawn
        (``BrokerUnavailable`` while reconnecting, else ``TransportError``); work under way
        gets ``abandoned`` set and the caller a ``PublishTimeout``. The I/O thread goes on.
        """
        if self._closing.is_set():
            raise TransportError("the transport is closed; connect again with fp.connect(url)")
        fut: Future[Any] = Future()
        with self._lock:
            self._work.append((work, fut))
        if threading.current_thread() is self._thread:  # from on_reply: runs after it returns
            return None
        self._wake()
        timeout = self.settings.confirm_timeout
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            if fut.cancel():  # never started: withdrawn (the I/O thread skips it)
                if self._conn is None:
                    raise BrokerUnavailable(
                        f"the broker at {_safe_url(self.settings)} did not answer within "
                        f"{timeout}s (reconnecting); retry later or raise "
                        "FEDPLAN_CONFIRM_TIMEOUT"
                    ) from None
                raise TransportError(
                    f"the transport to {_safe_url(self.settings)} was busy with earlier "
                    f"sends for {timeout}s; this one was not sent (raise "
                    "FEDPLAN_CONFIRM_TIMEOUT for large commands)"
                ) from None
            if abandoned is not None:
                abandoned.set()
            raise PublishTimeout(
                f"the broker at {_safe_url(self.settings)} did not confirm within {timeout}s"
            ) from None

    def _wake(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.add_callback_threadsafe(lambda: None)

    # -- the I/O thread ----------------------------------------------------------------

    def _run(self) -> None:
        """The I/O thread: connect, serve, reconnect with backoff; survives any error."""
        attempt = 0
        while not self._closing.is_set():
            try:
                self._conn = pika.BlockingConnection(self._params)
                ch = self._setup(self._conn)
                if not self._ready.done():
                    self._ready.set_result(None)
                elif attempt:
                    log.info("reconnected to the broker after %d attempt(s)", attempt)
                attempt = 0
                self._loop(self._conn, ch)
            except Exception as e:
                lost = isinstance(e, _CONNECTION_ERRORS)
                if not self._ready.done() and _exclusive_refusal(e):
                    self._ready.set_exception(
                        ProducerIdInUse(
                            f"producer id {self.producer_id!r} is in use: another producer "
                            f"consumes {self.results_queue} at {_safe_url(self.settings)}; "
                            "two producers with one id would take each other's replies. "
                            "Close that one, or connect with another producer_id"
                        )
                    )
                    return
                if not self._ready.done():
                    self._ready.set_exception(
                        BrokerUnavailable(
                            f"cannot connect to the broker at {_safe_url(self.settings)} ({e!r}); "
                            "is RabbitMQ running? (scripts/ensure_rabbitmq)"
                        )
                    )
                    return
                if self._closing.is_set():
                    break
                attempt += 1
                self.reconnects += 1
                delay = min(self.settings.reconnect_max_delay, 0.05 * 2**attempt)
                if lost:
                    log.warning("broker connection lost (%r); reconnecting in %.2fs", e, delay)
                else:  # a bug or a hostile input got this far: start over, never die
                    log.exception("the transport's I/O thread failed; reconnecting in %.2fs", delay)
                self._closing.wait(delay)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None and conn.is_open:
                    with contextlib.suppress(Exception):
                        conn.close()
        self._fail_pending(TransportError("the transport was closed before this was sent"))

    def _setup(self, conn: pika.BlockingConnection) -> BlockingChannel:
        ch = conn.channel()
        ch.confirm_delivery()
        declares = self.settings.producer_declares  # off under a least-privilege user
        if declares:
            for ex in topology.exchanges():
                ch.exchange_declare(ex.name, ex.type, durable=True)
            ch = self._declare_dead_letter_queue(conn, ch)
        self._declare_queue(ch, topology.results_queue(self.producer_id, self.settings))
        for device in sorted(self._devices) if declares else ():  # may have been deleted
            self._declare_queue(ch, topology.device_queue(device, self.settings))
        ch.basic_qos(prefetch_count=PREFETCH)
        self._assembler.forget_tokens()  # unacked chunks come again on this channel
        # exclusive: one producer per producer id, on any host (a second one is refused).
        # Classic queues only: RabbitMQ 3.10 quorum queues accept a second exclusive
        # consumer; there, only the journal's lock (same host) keeps an id to one producer.
        ch.basic_consume(self.results_queue, self._on_message, auto_ack=False, exclusive=True)
        return ch

    def _declare_dead_letter_queue(
        self, conn: pika.BlockingConnection, ch: BlockingChannel
    ) -> BlockingChannel:
        """Declare the bounded dead-letter queue; one an older fedplan declared without bounds
        (RabbitMQ refuses other arguments: PRECONDITION_FAILED) is used as it is, with a
        warning, instead of failing every connection."""
        spec = topology.dead_letter_queue(self.settings)
        try:
            self._declare_queue(ch, spec)
            return ch
        except pex.ChannelClosedByBroker as e:
            if e.reply_code != 406:
                raise
            log.warning(
                "%s exists with other arguments than this fedplan declares (%s); using it as "
                "it is: delete it once it is empty to get the "
                "bounded one",
                spec.name,
                e.reply_text,
            )
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(spec.name, passive=True)
        ch.queue_bind(spec.name, spec.exchange, routing_key=spec.routing_key)
        return ch

    def _declare_queue(self, ch: BlockingChannel, spec: topology.QueueSpec) -> None:
        ch.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        ch.queue_bind(spec.name, spec.exchange, routing_key=spec.routing_key)

    def _loop(self, conn: pika.BlockingConnection, ch: BlockingChannel) -> None:
        next_expiry = time.monotonic()
        while not self._closing.is_set():
            self._drain(ch)
            conn.process_data_events(time_limit=0.2)
            if time.monotonic() >= next_expiry:
                if self._assembler.expire():
                    log.warning("dropped incomplete chunked replies past their TTL")
                    for tag in self._assembler.releasable():
                        ch.basic_ack(tag)
                next_expiry = time.monotonic() + 5.0
        self._drain(ch)

    def _drain(self, ch: BlockingChannel) -> None:
        while True:
            with self._lock:
                if not self._work:
                    return
                work, fut = self._work[0]
            if fut.done() or not (fut.running() or fut.set_running_or_notify_cancel()):
                with self._lock:  # the caller withdrew it before it started
                    self._work.popleft()
                continue
            try:
                result = work(ch)
            except (
                pex.AMQPConnectionError,
                pex.ConnectionClosed,
                pex.StreamLostError,
                pex.ChannelWrongStateError,
            ):
                raise  # keep the item: it is redone after the reconnect
            except pex.ChannelClosedByBroker as e:
                with self._lock:
                    self._work.popleft()
                _settle(
                    fut,
                    error=TransportError(
                        f"the broker refused the operation: {e.reply_code} {e.reply_text}"
                    ),
                )
                raise
            except Exception as e:
                with self._lock:
                    self._work.popleft()
                _settle(fut, error=e)
            else:
                with self._lock:
                    self._work.popleft()
                _settle(fut, result)

    def _fail_pending(self, exc: Exception) -> None:
        with self._lock:
            items, self._work = list(self._work), deque()
        for _, fut in items:
            if not fut.done():
                _settle(fut, error=exc)

    def _on_message(self, ch: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
        """One message from the results queue: checked, assembled, handed over, acked.

        A message refused by the checks (see ``reassembly``) is acked and counted in
        ``rejected_replies``: it can neither stop this thread nor be redelivered forever.
        A chunk of an incomplete reply stays unacked (within bounds) until the reply is
        whole and handed over, so a producer killed meanwhile loses none of it.
        """
        tag = method.delivery_tag
        ours = True  # False: the assembler holds the tag
        try:
            sender = reply_sender(props.user_id, self._trusted_users)
            data = self._assembler.add(props.headers, body, sender=sender.user, token=tag)
            ours = data is not None
            if data is not None:
                if sender.device_id is None:
                    self._on_reply(data)
                else:
                    self._on_reply(data, sender=sender.device_id)
        except RejectedReply as e:
            self.rejected_replies += 1
            if self.rejected_replies <= 10 or self.rejected_replies % 1000 == 0:  # floods
                log.warning(
                    "refused a message in %s (%d so far): %s; workers on a shared broker "
                    "user other than this producer's need FEDPLAN_TRUSTED_REPLY_USERS",
                    self.results_queue,
                    self.rejected_replies,
                    e,
                )
        except Exception:
            self.rejected_replies += 1
            log.exception("the reply handler failed on a reply; the reply is dropped")
        if ours:
            ch.basic_ack(tag)
        for held in self._assembler.releasable():
            ch.basic_ack(held)


_CONNECTION_ERRORS = (
    pex.AMQPConnectionError,
    pex.ConnectionClosed,
    pex.StreamLostError,
    pex.ChannelClosed,
    pex.ChannelWrongStateError,
    OSError,
)


def _exclusive_refusal(e: Exception) -> bool:
    """Whether the broker refused our results-queue consumer: another holds it exclusively."""
    return (
        isinstance(e, pex.ChannelClosedByBroker)
        and e.reply_code == 403
        and "exclusive" in str(e.reply_text).lower()
    )


def connection_parameters(settings: Settings, name: str) -> list[pika.ConnectionParameters]:
    """pika parameters for each of ``settings.broker_urls``, tried in that order.

    ``pika.BlockingConnection`` takes the list and connects to the first node that answers;
    after a connection loss the transport reconnects the same way, so a cluster's
    surviving nodes take over (``amqp://a:5672/;amqp://b:5672/``, as kombu writes failover).

    Examples
    --------
    >>> ps = connection_parameters(Settings(broker_url="amqp://h:1/;amqp://h:2/"), "x")
    >>> [p.port for p in ps]
    [1, 2]
    """
    out: list[pika.ConnectionParameters] = []
    for url in settings.broker_urls:
        params = pika.URLParameters(url)
        params.heartbeat = settings.heartbeat
        params.blocked_connection_timeout = settings.confirm_timeout
        params.client_properties = {"connection_name": name}
        out.append(params)
    return out


def _safe_url(settings: Settings) -> str:
    """The broker URLs without credentials, for messages (``amqp://host:port/vhost``)."""
    shown = []
    for url in settings.broker_urls:
        params = pika.URLParameters(url)
        vhost = "" if params.virtual_host == "/" else quote(params.virtual_host, safe="")
        scheme = "amqps" if url.startswith("amqps") else "amqp"
        shown.append(f"{scheme}://{params.host}:{params.port}/{vhost}")
    return ";".join(shown)
