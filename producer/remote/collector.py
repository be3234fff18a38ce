"""Reply collector: futures keyed by command id and result id, resolved from reply bytes."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from schemas.command_pb2 import ObjectInfo, Reply
from schemas.errors import FedplanError, ObjectNotFound
from schemas.wire import decode_reply, error_from_proto

log = logging.getLogger(__name__)


class PendingCommand(Future[Reply]):
    """The future of one command's reply; knows its device and result ids for messages."""

    def __init__(self, command_id: str, device_id: str, result_ids: tuple[str, ...]) -> None:
        super().__init__()
        self.command_id = command_id
        self.device_id = device_id
        self.result_ids = result_ids

    def reply(self, timeout: float | None) -> Reply:
        """The successful reply; raises the device's typed error or ``TimeoutError``."""
        try:
            return self.result(timeout)
        except FutureTimeout:
            raise TimeoutError(
                f"no reply from device {self.device_id!r} for command {self.command_id} "
                f"within {timeout}s; is the device running? (raise the fleet's timeout for "
                "slow devices)"
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


class ReplyCollector:
    """Matches replies (from any transport thread) to the futures of the commands awaiting them.

    Examples
    --------
    >>> collector = ReplyCollector()
    >>> pending = collector.expect("cmd-1", device_id="device_1", result_ids=("r1",))
    >>> pending.done()
    False
    """

    def __init__(self, *, keep: int = 1024) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self._pending: dict[str, PendingCommand] = {}
        self._done: OrderedDict[str, PendingCommand] = OrderedDict()
        self._by_result: dict[str, PendingCommand] = {}

    def expect(
        self, command_id: str, *, device_id: str, result_ids: tuple[str, ...] = ()
    ) -> PendingCommand:
        """Register a command before publishing it; its future resolves with the reply."""
        pending = PendingCommand(command_id, device_id, tuple(result_ids))
        with self._lock:
            self._pending[command_id] = pending
            for result_id in result_ids:
                self._by_result[result_id] = pending
        return pending

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
        if pending is not None and not pending.done():
            pending.set_exception(error)

    def on_reply(self, data: bytes) -> None:
        """Resolve the future of the command this encoded ``Reply`` answers; never raises."""
        try:
            reply = decode_reply(data)
        except Exception:
            log.exception("dropping a reply that could not be decoded")
            return
        with self._lock:
            pending = self._pending.pop(reply.command_id, None)
            if pending is not None:
                self._retire(pending)
        if pending is None:
            # Replies to commands nobody waits for (a device forwarding a moved object).
            log.debug("reply to unknown command %s from %s", reply.command_id, reply.device_id)
            return
        if pending.done():
            return
        if reply.WhichOneof("outcome") == "error":
            try:
                error: BaseException = error_from_proto(reply.error)
            except Exception as exc:  # a malformed error still fails the waiters
                error = FedplanError(f"device sent an unreadable error: {exc}")
            pending.set_exception(error)
        else:
            pending.set_result(reply)

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
        """Block until the command's reply; raise its typed error or ``TimeoutError``."""
        return self.command(command_id).reply(timeout)

    def wait_result(self, result_id: str, timeout: float | None) -> ObjectInfo:
        """Block until the reply carrying ``result_id``; raise its error or ``TimeoutError``."""
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
