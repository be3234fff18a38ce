"""Reply collector: futures keyed by command id and result id, resolved from reply bytes.

A reply is accepted for a command only from the device the command went to: its own
``device_id`` must name that device and, when the transport knows who sent it (a
least-privilege broker user, ``sender=``), so must the sender. A reply nobody awaits is kept,
not dropped, for ``unclaimed_ttl`` seconds (at most ``MAX_UNCLAIMED`` replies and
``MAX_UNCLAIMED_BYTES``, oldest dropped first; an ``ok`` reply carrying no objects has
nothing to claim and is dropped), so that a later
:meth:`ReplyCollector.expect` or :meth:`ReplyCollector.recover` with its command id gets it.
With a :class:`~producer.transport.journal.Journal` both what is in flight and the kept
replies survive a killed process (see that module for the rules).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from producer.transport.journal import (
    MAX_UNCLAIMED,
    MAX_UNCLAIMED_BYTES,
    CommandNotSent,
    Journal,
)
from schemas.command_pb2 import ObjectInfo, Reply
from schemas.errors import FedplanError, ObjectNotFound, ReplyTimeout
from schemas.tensor_codec import FramedParts, tensor_from_proto
from schemas.value_codec import value_from_proto
from schemas.wire import decode_reply, decode_reply_values, error_from_proto

log = logging.getLogger(__name__)


class PendingCommand(Future[Reply]):
    """The future of one command's reply; knows its device and result ids for messages."""

    def __init__(self, command_id: str, device_id: str, result_ids: tuple[str, ...]) -> None:
        super().__init__()
        self.command_id = command_id
        self.device_id = device_id
        self.result_ids = result_ids
        self.values: dict[str, torch.Tensor] = {}
        """Framed tensor values of the reply's objects, by object id, decoded straight from
        the received buffer (see :meth:`tensor`)."""
        self._taken: set[str] = set()

    def tensor(self, info: ObjectInfo) -> torch.Tensor:
        """The tensor value ``info`` (an object of this command's reply) carries.

        A value that travelled as a frame was decoded once from the received buffer: the
        first call gets that tensor itself (no copy), later calls a copy of it. An inline
        value is decoded from the protobuf as before.

        Examples
        --------
        >>> from schemas.tensor_codec import tensor_to_proto
        >>> p = PendingCommand("c1", "alice", ("r1",))
        >>> p.tensor(ObjectInfo(id="r1", has_value=True, value=tensor_to_proto(torch.ones(2))))
        tensor([1., 1.])
        """
        value = self.values.get(info.id)
        if value is None:
            return tensor_from_proto(info.value)
        if info.id in self._taken:
            return value.detach().clone().requires_grad_(value.requires_grad)
        self._taken.add(info.id)
        return value

    def reply(self, timeout: float | None) -> Reply:
        """The successful reply; raises the device's typed error or ``ReplyTimeout``."""
        try:
            return self.result(timeout)
        except FutureTimeout:
            raise ReplyTimeout(
                f"no reply from device {self.device_id!r} for command {self.command_id} "
                f"within {timeout}s; is the device running? (raise the fleet's timeout for "
                "slow devices)",
                device_id=self.device_id,
            ) from None

    def object_info(self, result_id: str, timeout: float | None) -> ObjectInfo:
        """The reply's metadata (and value, when sent) of one result."""
        for info in self.reply(timeout).ok.objects:
            if info.id == result_id:
                return info
        raise ObjectNotFound(
            f"the reply of command {self.command_id} carries no object {result_id!r}",
            device_id=self.device_id,
        )

    def value(self, result_id: str, timeout: float | None = None) -> Any:
        """A result's value carried by the reply: a Python value, or a tensor sent inline.

        Raises the device's typed error, ``ReplyTimeout``, or ``ObjectNotFound`` when the
        reply carries only the result's metadata (fetch it from the device then).

        Examples
        --------
        >>> from schemas.command_pb2 import Ok
        >>> from schemas.value_codec import value_to_proto
        >>> p = PendingCommand("c1", "alice", ("r1",))
        >>> info = ObjectInfo(id="r1", kind="value", python_value=value_to_proto(3))
        >>> p.set_result(Reply(command_id="c1", device_id="alice", ok=Ok(objects=[info])))
        >>> p.value("r1")
        3
        """
        info = self.object_info(result_id, timeout)
        if info.kind == "value":
            return value_from_proto(info.python_value)
        if info.has_value:
            return self.tensor(info)
        raise ObjectNotFound(
            f"the reply of command {self.command_id} carries no value of {result_id!r}",
            device_id=self.device_id,
        )


class ReplyCollector:
    """Matches replies (from any transport thread) to the futures of the commands awaiting them.

    Parameters
    ----------
    keep
        Resolved commands kept findable by id.
    journal
        Durable record of what is in flight and of unclaimed replies (None: memory only).
    unclaimed_ttl
        Seconds a reply nobody awaits is kept for a later claim.

    Examples
    --------
    >>> collector = ReplyCollector()
    >>> pending = collector.expect("cmd-1", device_id="device_1", result_ids=("r1",))
    >>> pending.done()
    False
    """

    def __init__(
        self,
        *,
        keep: int = 1024,
        journal: Journal | None = None,
        unclaimed_ttl: float = 24 * 3600.0,
    ) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._pending: dict[str, PendingCommand] = {}
        self._done: OrderedDict[str, PendingCommand] = OrderedDict()
        self._by_result: dict[str, PendingCommand] = {}
        self._unclaimed: OrderedDict[str, tuple[Reply, str | None, float, int]] = OrderedDict()
        self._unclaimed_bytes = 0
        self._recovered: dict[str, PendingCommand] = {}
        self._unsent: list[tuple[str, str, bytes]] = []
        self.journal = journal
        self.unclaimed_ttl = unclaimed_ttl
        self.refused = 0
        """Replies refused: from the wrong device or sender."""

    def expect(
        self,
        command_id: str,
        *,
        device_id: str,
        result_ids: tuple[str, ...] = (),
        data: bytes | FramedParts | None = None,
    ) -> PendingCommand:
        """Register a command before publishing it; its future resolves with the reply.

        With a journal the command (and ``data``, its encoded bytes, when small enough) is
        written to it first, before it can be published; call :meth:`published` once the
        broker confirmed it.
        """
        if self.journal is not None:
            self.journal.record(command_id, device_id, tuple(result_ids), data)
        return self._register(command_id, device_id, tuple(result_ids))

    def published(self, command_id: str) -> None:
        """The broker confirmed the command: the journal drops its bytes."""
        if self.journal is not None:
            try:
                self.journal.published(command_id)
            except Exception:  # at worst a successor publishes it again: the device dedups
                log.exception("could not journal the publish of command %s", command_id)

    def unsent(self) -> list[tuple[str, str, bytes]]:
        """Recovered commands whose publish was never confirmed, as ``(device_id,
        command_id, data)``: publish each again, then call :meth:`published`."""
        with self._lock:
            return list(self._unsent)

    def _register(
        self, command_id: str, device_id: str, result_ids: tuple[str, ...]
    ) -> PendingCommand:
        pending = PendingCommand(command_id, device_id, result_ids)
        with self._lock:
            self._pending[command_id] = pending
            for result_id in result_ids:
                self._by_result[result_id] = pending
            kept = self._unclaimed.pop(command_id, None)
            if kept is not None:
                self._unclaimed_bytes -= kept[3]
        if kept is not None:
            self._deliver(pending, kept[0], kept[1])
        return pending

    def recover(self, *, in_flight_ttl: float | None = None) -> dict[str, PendingCommand]:
        """Re-register what the journal says is in flight, and reload unclaimed replies.

        Call before the transport consumes replies (``fp.connect`` does). Returns the
        recovered commands by command id; journal rows older than ``in_flight_ttl`` seconds
        are dropped. Without a journal there is nothing to recover.
        """
        if self.journal is None:
            return {}
        now = time.time()
        for kept in self.journal.unclaimed(ttl=self.unclaimed_ttl):
            try:
                reply = decode_reply(kept.data)
            except Exception:
                self.journal.done(kept.command_id)
                continue
            with self._lock:
                self._store_unclaimed(kept.command_id, reply, kept.sender, kept.received, kept.data)
        drop = None if in_flight_ttl is None else now - in_flight_ttl
        for entry in self.journal.in_flight(older_than_drop=drop):
            if entry.command_id not in self._pending:
                pending = self._register(entry.command_id, entry.device_id, entry.result_ids)
                with self._lock:
                    self._recovered[entry.command_id] = pending
                    if not entry.published and entry.body is not None:
                        self._unsent.append((entry.device_id, entry.command_id, entry.body))
                if not entry.published and entry.body is None:
                    self.forget(
                        entry.command_id,
                        CommandNotSent(
                            f"command {entry.command_id} for device {entry.device_id!r} may "
                            "never have reached the broker (its producer died before the "
                            "publish was confirmed) and was too large to journal: send it "
                            "again",
                            device_id=entry.device_id,
                        ),
                    )
        with self._lock:
            return dict(self._recovered)

    @property
    def recovered(self) -> dict[str, PendingCommand]:
        """The commands :meth:`recover` found in flight, by command id."""
        with self._lock:
            return dict(self._recovered)

    def _retire(self, pending: PendingCommand) -> None:
        """Keep a resolved command findable by id for a while (callers hold their futures)."""
        self._done[pending.command_id] = pending
        while len(self._done) > self._keep:
            _, old = self._done.popitem(last=False)
            for result_id in old.result_ids:
                if self._by_result.get(result_id) is old:
                    del self._by_result[result_id]

    def release(self, command_id: str) -> None:
        """Stop keeping a resolved command findable (its waiters hold it if they need it)."""
        with self._lock:
            old = self._done.pop(command_id, None)
            if old is not None:
                for result_id in old.result_ids:
                    if self._by_result.get(result_id) is old:
                        del self._by_result[result_id]

    def forget(self, command_id: str, error: BaseException) -> None:
        """Fail a registered command that could not be published."""
        with self._lock:
            pending = self._pending.pop(command_id, None)
            if pending is not None:
                self._retire(pending)
        self._journal_done(command_id)
        if pending is not None and not pending.done():
            pending.set_exception(error)

    def on_reply(self, data: bytes | memoryview, *, sender: str | None = None) -> None:
        """Resolve the future of the command this encoded ``Reply`` answers; never raises.

        ``sender``: the device the transport vouches sent it (None: the transport cannot
        tell). A reply from another device than the command's is refused and the command
        keeps waiting; a reply nobody awaits is kept for a later claim.
        """
        try:  # framed values become tensors over ``data`` itself (no protobuf bytes copy)
            reply, values = decode_reply_values(data)
        except Exception:
            log.exception("dropping a reply that could not be decoded")
            return
        try:
            with self._lock:
                pending = self._pending.get(reply.command_id)
                if pending is None:
                    self._keep_unclaimed(reply, sender, data, framed=bool(values))
                    return
            self._deliver(pending, reply, sender, values)
        except Exception:  # never let a reply stop the transport's thread
            log.exception("failed to handle the reply to command %s", reply.command_id)

    def _keep_unclaimed(
        self, reply: Reply, sender: str | None, data: bytes | memoryview, *, framed: bool = False
    ) -> None:
        """Called with the lock held; a ``framed`` reply is kept with its values inline."""
        ok = reply.WhichOneof("outcome") == "ok"
        if ok and not reply.ok.objects and not reply.ok.HasField("plan"):
            return  # nothing to claim (a delete's reply)
        if len(data) > MAX_UNCLAIMED_BYTES:
            log.warning("a reply to unknown command %s is too large to keep", reply.command_id)
            return
        if framed:
            reply = decode_reply(data)
        data = data if isinstance(data, bytes) else bytes(data)
        log.debug("keeping the reply to unknown command %s from %s", reply.command_id, sender)
        self._store_unclaimed(reply.command_id, reply, sender, time.time(), data)
        if self.journal is not None:
            try:
                self.journal.keep(reply.command_id, sender, data)
            except Exception:
                log.exception("could not journal the reply to command %s", reply.command_id)

    def _store_unclaimed(
        self, command_id: str, reply: Reply, sender: str | None, received: float, data: bytes
    ) -> None:
        """Called with the lock held; drops the oldest past the bounds or the TTL."""
        old = self._unclaimed.pop(command_id, None)
        if old is not None:
            self._unclaimed_bytes -= old[3]
        self._unclaimed[command_id] = (reply, sender, received, len(data))
        self._unclaimed_bytes += len(data)
        limit = time.time() - self.unclaimed_ttl
        while self._unclaimed and (
            len(self._unclaimed) > MAX_UNCLAIMED
            or self._unclaimed_bytes > MAX_UNCLAIMED_BYTES
            or next(iter(self._unclaimed.values()))[2] < limit
        ):
            _, dropped = self._unclaimed.popitem(last=False)
            self._unclaimed_bytes -= dropped[3]

    def _deliver(
        self,
        pending: PendingCommand,
        reply: Reply,
        sender: str | None,
        values: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Resolve ``pending`` with ``reply`` (and its decoded ``values``, see
        :meth:`PendingCommand.tensor`) if it comes from the command's device."""
        wrong = reply.device_id != pending.device_id or (
            sender is not None and sender != pending.device_id
        )
        if wrong:
            self.refused += 1
            if self.refused > 10 and self.refused % 1000:
                return False  # a flood: log the first ten and every thousandth
            log.warning(
                "refused a reply to command %s (sent to %r) claiming device %r from sender %r",
                pending.command_id,
                pending.device_id,
                reply.device_id[:80],
                sender,
            )
            return False
        with self._lock:
            if self._pending.get(pending.command_id) is not pending:
                return False  # another reply won
            del self._pending[pending.command_id]
            self._retire(pending)
        if not pending.done():
            if reply.WhichOneof("outcome") == "error":
                try:
                    error: BaseException = error_from_proto(reply.error)
                except Exception as exc:  # a malformed error still fails the waiters
                    error = FedplanError(f"device sent an unreadable error: {exc}")
                pending.set_exception(error)
            else:
                pending.values = values or {}
                pending.set_result(reply)
        # Only once the reply is handed over: a process killed before this line leaves the
        # row, and the next producer with this id recovers the command again.
        self._journal_done(pending.command_id)
        return True

    def _journal_done(self, command_id: str) -> None:
        if self.journal is not None:
            try:
                self.journal.done(command_id)
            except Exception:
                log.exception("could not update the journal for command %s", command_id)

    def command(self, command_id: str) -> PendingCommand:
        """The future of a command registered with :meth:`expect`."""
        with self._lock:
            pending = self._pending.get(command_id) or self._done.get(command_id)
        if pending is None:
            raise ObjectNotFound(f"no command {command_id!r} is awaited by this collector")
        return pending

    def for_result(self, result_id: str) -> PendingCommand:
        """The future of the command that produces ``result_id``."""
        with self._lock:
            pending = self._by_result.get(result_id)
        if pending is None:
            raise ObjectNotFound(f"no command awaited here produces result {result_id!r}")
        return pending

    def wait(self, command_id: str, timeout: float | None) -> Reply:
        """Block until the command's reply; raise its typed error or ``ReplyTimeout``."""
        return self.command(command_id).reply(timeout)

    def wait_result(self, result_id: str, timeout: float | None) -> ObjectInfo:
        """Block until the reply carrying ``result_id``; raise its error or ``ReplyTimeout``."""
        return self.for_result(result_id).object_info(result_id, timeout)

    @property
    def in_flight(self) -> int:
        """How many commands still await their reply."""
        with self._lock:
            return len(self._pending)

    def fail_all(self, error: BaseException) -> None:
        """Fail every awaited command (the transport closed or lost its connection)."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            for item in pending:
                self._retire(item)
        for item in pending:
            if not item.done():
                item.set_exception(error)
