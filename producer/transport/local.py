"""Embedded transport: each device is a thread with its own runtime, fed command bytes."""

from __future__ import annotations

import logging
import queue
import threading

from consumer.memory_store import MemoryStore
from consumer.runtime import DeviceRuntime
from producer.transport.base import ReplyHandler
from schemas.errors import DeviceNotFound, TransportError

log = logging.getLogger(__name__)

_STOP = None


class _EmbeddedDevice:
    """One device: a FIFO of command bytes drained by one worker thread."""

    def __init__(self, device_id: str, runtime: DeviceRuntime, on_reply: ReplyHandler) -> None:
        self.device_id = device_id
        self.runtime = runtime
        self.inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._on_reply = on_reply
        self.thread = threading.Thread(
            target=self._serve, name=f"fedplan-device-{device_id}", daemon=True
        )
        self.thread.start()

    def _serve(self) -> None:
        while True:
            data = self.inbox.get()
            if data is _STOP:
                return
            reply = self.runtime.handle(data)
            try:
                self._on_reply(reply)
            except Exception:
                log.exception("reply handler failed for device %s", self.device_id)


class LocalTransport:
    """In-process devices (PySyft's VirtualWorker) speaking the same protobuf bytes as RabbitMQ.

    Parameters
    ----------
    on_reply
        Called from the device threads with every encoded ``Reply``.

    Examples
    --------
    >>> replies = []
    >>> transport = LocalTransport(replies.append)
    >>> transport.ensure_device("device_1")
    >>> transport.device_ids
    ('device_1',)
    >>> transport.close()
    """

    def __init__(self, on_reply: ReplyHandler) -> None:
        self._on_reply = on_reply
        self._lock = threading.Lock()
        self._devices: dict[str, _EmbeddedDevice] = {}
        self._closed = False

    @property
    def device_ids(self) -> tuple[str, ...]:
        """The devices started so far, in order."""
        with self._lock:
            return tuple(self._devices)

    def ensure_device(self, device_id: str) -> None:
        """Start the device's thread, runtime and in-memory store unless already running."""
        with self._lock:
            if self._closed:
                raise TransportError("the embedded transport is closed; connect() again")
            if device_id in self._devices:
                return
            runtime = DeviceRuntime(device_id=device_id, store=MemoryStore(), forward=self._forward)
            self._devices[device_id] = _EmbeddedDevice(device_id, runtime, self._on_reply)

    def publish(self, device_id: str, command: bytes, *, command_id: str) -> None:
        """Queue the command bytes for the device; ``DeviceNotFound`` if it was never started."""
        self._inbox(device_id).put(bytes(command))

    def _forward(self, device_id: str, command: bytes) -> None:
        """A device publishing to another (``MoveObject``); its reply goes to ``on_reply``."""
        self._inbox(device_id).put(bytes(command))

    def _inbox(self, device_id: str) -> queue.SimpleQueue[bytes | None]:
        with self._lock:
            device = self._devices.get(device_id)
            closed = self._closed
        if closed:
            raise TransportError("the embedded transport is closed; connect() again")
        if device is None:
            raise DeviceNotFound(
                f"no embedded device {device_id!r}; create it with fleet.device({device_id!r})",
                device_id=device_id,
            )
        return device.inbox

    def runtime(self, device_id: str) -> DeviceRuntime:
        """The runtime of an embedded device (for tests and inspection)."""
        with self._lock:
            device = self._devices.get(device_id)
        if device is None:
            raise DeviceNotFound(f"no embedded device {device_id!r}", device_id=device_id)
        return device.runtime

    def close(self) -> None:
        """Stop every device thread after it has drained the commands already queued."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            devices = list(self._devices.values())
        for device in devices:
            device.inbox.put(_STOP)
        for device in devices:
            device.thread.join(timeout=10)
