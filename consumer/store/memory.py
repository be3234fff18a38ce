"""In-memory device store for embedded devices: dicts behind one lock."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict

from consumer.store.base import StoredObject, StoredPlan
from consumer.store.limits import StoreLimits
from consumer.store.tensor_files import tensor_nbytes
from schemas.errors import ObjectNotFound, StoreFullError
from schemas.tensor_codec import FramedParts


class MemoryStore:
    """A thread-safe :class:`~consumer.store.DeviceStore` that lives as long as the process.

    The same bounds as the persistent store (:mod:`consumer.store.limits`) on the bytes of
    tensors, plan state and cached replies; units are no-ops (nothing can be rolled back,
    and nothing outlives the process to be redelivered).

    Examples
    --------
    >>> import torch
    >>> store = MemoryStore()
    >>> store.put_object(StoredObject("a", torch.ones(2), tags=("x",)))
    >>> [o.id for o in store.search(["x"])]
    ['a']
    """

    def __init__(
        self, *, limits: StoreLimits | None = None, max_replies: int | None = None
    ) -> None:
        limits = limits or StoreLimits()
        if max_replies is not None:
            limits = dataclasses.replace(limits, max_replies=max_replies)
        self.limits = limits
        self._lock = threading.Lock()
        self._objects: dict[str, StoredObject] = {}
        self._plans: dict[str, StoredPlan] = {}
        self._replies: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._reply_bytes = 0
        self._object_bytes = 0

    def stored_bytes(self) -> int:
        """Bytes held: tensors, plan state and cached replies."""
        with self._lock:
            return self._used()

    def _used(self) -> int:
        plans = sum(_plan_bytes(p) for p in self._plans.values())
        return self._object_bytes + plans + self._reply_bytes

    def _check_room(self, adding: int, freeing: int, what: str) -> None:
        if adding <= freeing:
            return
        after = self._used() - freeing + adding
        if after > self.limits.max_bytes:
            raise StoreFullError(
                f"storing {what} ({adding} bytes) would take the device store to {after} "
                f"bytes, over its bound of {self.limits.max_bytes} (FEDPLAN_STORE_MAX_BYTES); "
                "delete objects the server no longer needs (get() them or drop their "
                "pointers) or raise the bound"
            )

    def begin(self) -> None:
        """Nothing to do: writes apply at once."""

    def commit(self) -> None:
        """Nothing to do: writes applied at once."""

    def rollback(self) -> None:
        """Nothing can be undone in memory."""

    def put_object(self, obj: StoredObject) -> None:
        with self._lock:
            old = self._objects.get(obj.id)
            freeing = tensor_nbytes(old.tensor) if old is not None else 0
            self._check_room(tensor_nbytes(obj.tensor), freeing, f"object {obj.id!r}")
            self._objects[obj.id] = obj
            self._object_bytes += tensor_nbytes(obj.tensor) - freeing

    def get_object(self, object_id: str) -> StoredObject:
        with self._lock:
            try:
                return self._objects[object_id]
            except KeyError:
                raise ObjectNotFound(
                    f"no object {object_id!r} on this device; it may have been fetched with "
                    "get() or deleted already"
                ) from None

    def has_object(self, object_id: str) -> bool:
        with self._lock:
            return object_id in self._objects

    def delete_object(self, object_id: str) -> None:
        with self._lock:
            old = self._objects.pop(object_id, None)
            if old is None:
                raise ObjectNotFound(f"no object {object_id!r} to delete on this device")
            self._object_bytes -= tensor_nbytes(old.tensor)

    def search(self, tags: list[str]) -> list[StoredObject]:
        wanted = set(tags)
        with self._lock:
            return [o for o in self._objects.values() if wanted.issubset(o.tags)]

    def resident_objects(self) -> list[StoredObject]:
        """Every object (all live in memory)."""
        with self._lock:
            return list(self._objects.values())

    def list_objects(self) -> list[StoredObject]:
        with self._lock:
            return list(self._objects.values())

    def clear_objects(self) -> None:
        with self._lock:
            self._objects.clear()
            self._object_bytes = 0

    def put_plan(self, plan: StoredPlan) -> None:
        with self._lock:
            old = self._plans.get(plan.id)
            freeing = _plan_bytes(old) if old is not None else 0
            self._check_room(_plan_bytes(plan), freeing, f"plan {plan.id!r}")
            self._plans[plan.id] = plan

    def get_plan(self, plan_id: str) -> StoredPlan:
        with self._lock:
            try:
                return self._plans[plan_id]
            except KeyError:
                raise ObjectNotFound(
                    f"no plan {plan_id!r} on this device; send the plan to it first",
                    plan_id=plan_id,
                ) from None

    def has_plan(self, plan_id: str) -> bool:
        with self._lock:
            return plan_id in self._plans

    def save_plan_state(self, plan: StoredPlan) -> None:
        """Nothing to do: the stored plan's state tensors are the live ones."""

    def delete_plan(self, plan_id: str) -> None:
        with self._lock:
            if self._plans.pop(plan_id, None) is None:
                raise ObjectNotFound(f"no plan {plan_id!r} to delete", plan_id=plan_id)

    def put_reply(
        self, command_id: str, result_ids: list[str], reply: bytes | FramedParts
    ) -> None:
        """Cache a reply; expired and then the oldest replies go while over the bounds."""
        if len(reply) > self.limits.max_reply_bytes:
            raise StoreFullError(
                f"the reply of command {command_id} is {len(reply)} bytes, more than the "
                f"{self.limits.max_reply_bytes} bytes of cached replies a device keeps "
                "(FEDPLAN_STORE_MAX_REPLY_BYTES). Return fewer values with the command and "
                "fetch big results with get()"
            )
        with self._lock:
            self._drop_reply(command_id)
            now = time.monotonic()
            cutoff = now - self.limits.reply_ttl
            while self._replies and (
                next(iter(self._replies.values()))[1] < cutoff
                or len(self._replies) >= self.limits.max_replies
                or self._reply_bytes + len(reply) > self.limits.max_reply_bytes
            ):
                self._drop_reply(next(iter(self._replies)))
            self._check_room(len(reply), 0, f"the reply of {command_id}")
            self._replies[command_id] = (bytes(reply), now)
            self._reply_bytes += len(reply)

    def _drop_reply(self, command_id: str) -> None:
        old = self._replies.pop(command_id, None)
        if old is not None:
            self._reply_bytes -= len(old[0])

    def get_reply(self, command_id: str) -> bytes | None:
        with self._lock:
            found = self._replies.get(command_id)
            if found is None or found[1] < time.monotonic() - self.limits.reply_ttl:
                return None
            return found[0]


def _plan_bytes(plan: StoredPlan) -> int:
    return sum(tensor_nbytes(t) for t in plan.ir.state_values.values())
