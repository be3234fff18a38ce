"""Embedded transport: each device has its own runtime and FIFO, run on a shared executor."""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from consumer.policy.fairness import ProducerBudgets
from consumer.runtime.device import DeviceRuntime
from consumer.store.memory import MemoryStore
from producer.transport.base import ReplyHandler
from schemas.errors import DeviceNotFound, TransportError
from schemas.tensor_codec import FramedParts

log = logging.getLogger(__name__)

DEFAULT_THREADS = 4
"""Executor threads shared by all embedded devices of one transport."""

LOCAL_PRODUCER = "local"
"""The identity embedded devices see for a fleet connected without a ``producer_id``."""

_Item = tuple[bytes, str, ReplyHandler, bool]
"""A command for an embedded device: its bytes, its sender, where its reply goes, whether
another device forwarded it (a move)."""


def _device_thread_init(intra_op_threads: int | None) -> None:
    if intra_op_threads is not None:
        limit_intra_op_threads(intra_op_threads)


@functools.cache
def _openmp() -> Any:
    """The OpenMP runtime torch runs its intra-op work on, or ``None`` (another backend)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for lib in sorted((Path(torch.__file__).parent / "lib").glob("lib*omp*.so*")):
        try:
            runtime = ctypes.CDLL(str(lib))  # already loaded by torch: the same handle
            if hasattr(runtime, "omp_set_num_threads"):
                return runtime
        except OSError:
            continue
    return None


def limit_intra_op_threads(threads: int) -> None:
    """Cap torch's intra-op threads for the calling thread only (other threads keep theirs).

    ``torch.set_num_threads`` would also change the default every thread created later
    starts from; the OpenMP setting is per thread. Does nothing when torch's parallel
    backend is not OpenMP.
    """
    runtime = _openmp()
    if runtime is None:
        return
    torch.get_num_threads()  # torch initialises a thread's setting on first use: do it first
    runtime.omp_set_num_threads(max(1, threads))


class _EmbeddedDevice:
    """One device: a FIFO of command bytes, drained in order on the transport's shared
    executor (no thread of its own, so a thousand devices cost a thousand queues, not
    a thousand threads). At most one drain of a device runs at a time."""

    def __init__(
        self,
        device_id: str,
        runtime: DeviceRuntime,
        executor: ThreadPoolExecutor,
        run_lock: threading.Lock | None,
        current: threading.local,
    ) -> None:
        self.device_id = device_id
        self._executor = executor
        self._run_lock = run_lock
        self._current = current
        self.runtime = runtime
        self.inbox: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, item: _Item) -> None:
        """Queue a command; schedule a drain unless one is queued or running."""
        with self._lock:
            self.inbox.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the transport closed in between
            raise TransportError("the embedded transport is closed; connect() again") from None

    def waiting(self) -> int:
        with self._lock:
            return len(self.inbox)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self.inbox:
                    self._scheduled = False
                    return
                item = self.inbox.popleft()
            self._run(item)

    def _run(self, item: _Item) -> None:
        data, sender, on_reply, forwarded = item
        self._current.item = item  # a MoveObject forwards as the same sender
        try:
            if self._run_lock is None:
                reply = self._handle(data, sender, forwarded)
            else:
                with self._run_lock:
                    reply = self._handle(data, sender, forwarded)
        finally:
            self._current.item = None
        try:
            on_reply(reply)
        except Exception:
            log.exception("reply handler failed for device %s", self.device_id)

    def _handle(self, data: bytes, sender: str, forwarded: bool) -> bytes:
        if forwarded:  # another device's move: not refused by the fairness budgets
            return self.runtime.handle(data, sender, forwarded=True)
        return self.runtime.handle(data, sender)


class LocalTransport:
    """In-process devices (PySyft's VirtualWorker) speaking the same protobuf bytes as RabbitMQ.

    Parameters
    ----------
    on_reply
        Called from the device threads with every encoded ``Reply``.
    intra_op_threads
        Torch intra-op threads per device thread (default 1: the devices already run in
        parallel, and each device splitting small ops across all cores makes their threads
        wait on each other); ``None`` keeps torch's default.
    one_at_a_time
        Run one command at a time across all of this transport's devices (default). The
        device threads share one GIL, so running them together mostly adds GIL hand-offs
        and context switches (an 8-device FedAvg round ran ~25% faster one at a time on 2
        cores); ``False`` lets them overlap inside torch ops that release the GIL.

    producer_id
        The identity the devices see as the sender of this transport's commands (the
        embedded counterpart of the broker-validated AMQP ``user_id``).
    threads
        Threads of the executor all devices share (default 4): devices queue their
        commands and run them on it in order, one at a time per device, so a fleet of
        thousands of devices needs no thread per device.

    :meth:`as_producer` gives another producer's transport to the same devices (its own
    identity, its own replies): what two producers sharing a RabbitMQ device are.

    Examples
    --------
    >>> replies = []
    >>> transport = LocalTransport(replies.append)
    >>> transport.ensure_device("device_1")
    >>> transport.device_ids
    ('device_1',)
    >>> transport.close()
    """

    def __init__(
        self,
        on_reply: ReplyHandler,
        *,
        intra_op_threads: int | None = 1,
        one_at_a_time: bool = True,
        producer_id: str = LOCAL_PRODUCER,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        if threads < 1:
            raise TransportError(f"threads={threads}: the embedded devices need 1 or more")
        self._on_reply = on_reply
        self.producer_id = producer_id or LOCAL_PRODUCER
        self._intra_op_threads = intra_op_threads
        self._run_lock = threading.Lock() if one_at_a_time else None
        self._lock = threading.Lock()
        self._devices: dict[str, _EmbeddedDevice] = {}
        self._closed = False
        self._current = threading.local()
        self._owner = True  # this transport started the devices and closes them
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="fedplan-devices",
            initializer=_device_thread_init,
            initargs=(intra_op_threads,),
        )

    def as_producer(self, producer_id: str, on_reply: ReplyHandler) -> LocalTransport:
        """A transport to the same devices for another producer (closing it stops nothing).

        Example
        -------
        >>> mine, theirs = [], []
        >>> transport = LocalTransport(mine.append)
        >>> other = transport.as_producer("mallory", theirs.append)
        >>> other.producer_id
        'mallory'
        >>> transport.close()
        """
        other = LocalTransport.__new__(LocalTransport)
        other.__dict__.update(self.__dict__)
        other._on_reply = on_reply
        other.producer_id = producer_id or LOCAL_PRODUCER
        other._owner = False
        return other

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
            runtime = DeviceRuntime(
                device_id=device_id,
                store=MemoryStore(),
                forward=self._forward,
                rates=ProducerBudgets(),
            )
            self._devices[device_id] = _EmbeddedDevice(
                device_id, runtime, self._executor, self._run_lock, self._current
            )

    def publish(self, device_id: str, command: bytes | FramedParts, *, command_id: str) -> None:
        """Queue the command bytes for the device; ``DeviceNotFound`` if it was never started."""
        self._device(device_id).put((bytes(command), self.producer_id, self._on_reply, False))

    def _forward(self, device_id: str, command: bytes) -> None:
        """A device publishing to another (``MoveObject``), for the producer whose command
        it runs; the reply goes to that producer."""
        item = getattr(self._current, "item", None)
        sender, on_reply = (
            (item[1], item[2]) if item is not None else (LOCAL_PRODUCER, self._on_reply)
        )
        self._device(device_id).put((bytes(command), sender, on_reply, True))

    def _device(self, device_id: str) -> _EmbeddedDevice:
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
        return device

    def pending(self, device_id: str) -> tuple[int, bool] | None:
        """``(commands waiting in the device's inbox, whether it is served)``; ``None`` if
        the device was never started (what pace steering reads, like a queue's depth)."""
        with self._lock:
            device = self._devices.get(device_id)
        if device is None:
            return None
        with self._lock:
            served = not self._closed
        return device.waiting(), served

    def runtime(self, device_id: str) -> DeviceRuntime:
        """The runtime of an embedded device (for tests and inspection)."""
        with self._lock:
            device = self._devices.get(device_id)
        if device is None:
            raise DeviceNotFound(f"no embedded device {device_id!r}", device_id=device_id)
        return device.runtime

    def close(self) -> None:
        """Stop the devices after they have run the commands already queued (a transport
        from :meth:`as_producer` leaves the devices running)."""
        if not self._owner:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)
