"""``fp.connect``: a fleet of devices behind one transport and one reply collector."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import torch

from producer.remote.collector import PendingCommand, ReplyCollector
from producer.remote.device import Device
from producer.transport.base import Transport
from producer.transport.local import LocalTransport
from schemas.command_pb2 import Command, DeleteObjects
from schemas.errors import TransportError
from schemas.ir import SCHEMA_VERSION
from schemas.wire import encode_command, encode_command_parts, new_id

DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for a device's reply before ``TimeoutError``."""


class Fleet:
    """The devices reachable through one transport; create with :func:`connect`.

    Examples
    --------
    >>> import producer as fp
    >>> with fp.connect() as fleet:
    ...     bob = fleet.device("bob")
    ...     [d.id for d in fleet.devices]
    ['bob']
    """

    def __init__(
        self,
        *,
        transport: Transport,
        collector: ReplyCollector,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.transport = transport
        self.collector = collector
        self.timeout = timeout
        self._devices: dict[str, Device] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._garbage: deque[tuple[str, str]] = deque()  # (device id, object id) to delete

    def device(self, id: str, *, data: Iterable[torch.Tensor] = ()) -> Device:
        """The device ``id`` (started or declared on first use), with ``data`` stored on it.

        Tensors in ``data`` keep the tags given with ``fp.tag`` and are stored before this
        returns, so ``search`` finds them right away.
        """
        if self._closed:
            raise TransportError("this fleet is closed; call fp.connect() again")
        with self._lock:
            device = self._devices.get(id)
            if device is None:
                self.transport.ensure_device(id)
                device = self._devices[id] = Device(id, self)
        pointers = [device.send_tensor(t) for t in data]
        for pointer in pointers:
            pointer.wait()
        return device

    def as_producer(self, producer_id: str) -> Fleet:
        """This fleet's embedded devices as another producer sees them (its own identity,
        objects and replies): how tests play a second producer without a broker.

        Example
        -------
        >>> import producer as fp
        >>> with fp.connect() as fleet:
        ...     mallory = fleet.as_producer("mallory")
        ...     [d.id for d in mallory.devices], mallory.transport.producer_id
        ([], 'mallory')
        """
        if not isinstance(self.transport, LocalTransport):
            raise TypeError(
                "as_producer() plays another producer on embedded devices; over RabbitMQ "
                "connect with that producer's broker user instead"
            )
        collector = ReplyCollector()
        transport = self.transport.as_producer(producer_id, collector.on_reply)
        return Fleet(transport=transport, collector=collector, timeout=self.timeout)

    @property
    def devices(self) -> tuple[Device, ...]:
        """The devices used through this fleet, in order of first use."""
        with self._lock:
            return tuple(self._devices.values())

    def submit(
        self,
        device_id: str,
        body: str,
        msg: Any,
        result_ids: tuple[str, ...] = (),
        *,
        tensors: Sequence[torch.Tensor] = (),
    ) -> PendingCommand:
        """Publish one command to a device; the returned future resolves with its reply.

        ``tensors`` are those encoded with ``tensor_to_proto(t, framed=True)`` in ``msg``.
        """
        riding = self._collect_garbage(device_id)
        command = Command(
            schema_version=SCHEMA_VERSION,
            command_id=new_id(),
            device_id=device_id,
            delete_first=riding,
        )
        getattr(command, body).CopyFrom(msg)
        data = encode_command_parts(command, tensors)  # tensors not copied into one bytes
        pending = self.collector.expect(
            command.command_id, device_id=device_id, result_ids=result_ids, data=data
        )
        try:
            self.transport.publish(device_id, data, command_id=command.command_id)
        except BaseException as exc:
            self.collector.forget(command.command_id, exc)
            raise
        self.collector.published(command.command_id)
        return pending

    def _publish_unsent(self) -> None:
        """Publish again what a killed predecessor journaled but never saw confirmed (the
        device runs a command id once: a repeat of one that did arrive gets its reply)."""
        for device_id, command_id, data in self.collector.unsent():
            try:
                self.transport.publish(device_id, data, command_id=command_id)
            except Exception as exc:
                self.collector.forget(command_id, exc)
            else:
                self.collector.published(command_id)

    def release(self, command_id: str) -> None:
        """Stop keeping a command whose reply was read findable by id (see ``ReplyCollector``)."""
        self.collector.release(command_id)

    def discard(self, device_id: str, object_id: str) -> None:
        """Delete a remote object with the next command (safe from finalizers: no locks)."""
        self._garbage.append((device_id, object_id))

    def _collect_garbage(self, riding_device: str | None = None) -> list[str]:
        """Publish one ``DeleteObjects`` per device for dropped result pointers (no reply).

        The ids for ``riding_device`` are returned instead: they go in the ``delete_first``
        field of the command about to be sent there (no extra message).
        """
        by_device: dict[str, list[str]] = {}
        while self._garbage:
            try:
                device_id, object_id = self._garbage.popleft()
            except IndexError:  # emptied by another thread
                break
            by_device.setdefault(device_id, []).append(object_id)
        riding = by_device.pop(riding_device, []) if riding_device is not None else []
        for device_id, ids in by_device.items():
            command = Command(
                schema_version=SCHEMA_VERSION,
                command_id=new_id(),
                device_id=device_id,
                delete_objects=DeleteObjects(ids=ids),
            )
            with contextlib.suppress(Exception):  # best effort: the device may be gone
                self.transport.publish(
                    device_id, encode_command(command), command_id=command.command_id
                )
        return riding

    def recover(self) -> dict[str, PendingCommand]:
        """The commands a previous producer with this producer id left in flight, by id.

        ``fp.connect(url, producer_id=...)`` re-registers them from the producer's journal
        before it consumes replies, so each resolves with its reply (a result, a plain
        Python output or a typed error) as if this process had sent it; results are also
        found by result id (``fleet.collector.for_result(rid).value(rid)``).

        Examples
        --------
        >>> import producer as fp
        >>> with fp.connect() as fleet:  # embedded devices: nothing to recover
        ...     fleet.recover()
        {}
        """
        return self.collector.recovered

    def close(self) -> None:
        """Stop the transport; commands still awaiting a reply fail with ``TransportError``.

        Their journal rows stay: a producer with the same id recovers them.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.transport.close()
        finally:
            self.collector.fail_all(TransportError("the fleet was closed before the reply came"))
            if self.collector.journal is not None:
                self.collector.journal.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Fleet {type(self.transport).__name__} devices:{[d.id for d in self.devices]}>"


def connect(
    url: str | None = None, *, timeout: float | None = DEFAULT_TIMEOUT, **settings: Any
) -> Fleet:
    """Connect to a fleet: embedded devices by default, or RabbitMQ + Celery workers.

    Parameters
    ----------
    url
        ``None`` for in-process devices (threads exchanging the same protobuf bytes), or an
        ``amqp://`` URL for devices served by Celery workers on RabbitMQ queues.
    timeout
        Seconds to wait for a device's reply before raising ``TimeoutError``.
    **settings
        Broker settings (``broker_config.settings.Settings`` fields) for an ``amqp://`` URL.
        With a ``producer_id`` the fleet keeps an in-flight journal in ``journal_dir`` and
        recovers what a killed producer of that id left in flight (:meth:`Fleet.recover`).

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> fleet = fp.connect()
    >>> bob = fleet.device("bob")
    >>> x_ptr = fp.send(torch.tensor([1, 2, 3, 4, 5]), bob)
    >>> x_ptr.get()
    tensor([1, 2, 3, 4, 5])
    >>> fleet.close()
    """
    collector = ReplyCollector()
    transport: Transport
    if url is None:
        producer_id = settings.pop("producer_id", None)
        if settings:
            raise TypeError(f"embedded devices take no broker settings: {sorted(settings)}")
        transport = LocalTransport(collector.on_reply, producer_id=producer_id or "local")
    elif url.startswith(("amqp://", "amqps://")):
        from broker_config.settings import Settings
        from producer.transport.amqp import AmqpTransport
        from producer.transport.journal import Journal, journal_path

        s = Settings.from_env(broker_url=url, **settings)
        journal = None
        if s.producer_id is not None:  # a named producer can be restarted: journal it
            journal = Journal(journal_path(s.journal_dir, s.producer_id))
        collector = ReplyCollector(journal=journal, unclaimed_ttl=s.unclaimed_reply_ttl)
        collector.recover(in_flight_ttl=s.results_queue_expires)  # before replies flow
        try:
            transport = AmqpTransport(settings=s, on_reply=collector.on_reply)
        except BaseException:
            if journal is not None:
                journal.close()
            raise
    else:
        raise ValueError(f"unsupported fleet URL {url!r}; use None (embedded) or amqp://...")
    fleet = Fleet(transport=transport, collector=collector, timeout=timeout)
    fleet._publish_unsent()
    return fleet
