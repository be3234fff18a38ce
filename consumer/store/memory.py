"""In-memory device store for embedded devices: dicts behind one lock."""

from __future__ import annotations

import threading
from collections import OrderedDict

from consumer.store.base import StoredObject, StoredPlan
from schemas.errors import ObjectNotFound


class MemoryStore:
    """A thread-safe :class:`~consumer.store.DeviceStore` that lives as long as the process.

    Examples
    --------
    >>> import torch
    >>> store = MemoryStore()
    >>> store.put_object(StoredObject("a", torch.ones(2), tags=("x",)))
    >>> [o.id for o in store.search(["x"])]
    ['a']
    """

    def __init__(self, *, max_replies: int = 10_000) -> None:
        self._max_replies = max_replies
        self._lock = threading.Lock()
        self._objects: dict[str, StoredObject] = {}
        self._plans: dict[str, StoredPlan] = {}
        self._replies: OrderedDict[str, bytes] = OrderedDict()

    def put_object(self, obj: StoredObject) -> None:
        with self._lock:
            self._objects[obj.id] = obj

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
            if self._objects.pop(object_id, None) is None:
                raise ObjectNotFound(f"no object {object_id!r} to delete on this device")

    def search(self, tags: list[str]) -> list[StoredObject]:
        wanted = set(tags)
        with self._lock:
            return [o for o in self._objects.values() if wanted.issubset(o.tags)]

    def list_objects(self) -> list[StoredObject]:
        with self._lock:
            return list(self._objects.values())

    def clear_objects(self) -> None:
        with self._lock:
            self._objects.clear()

    def put_plan(self, plan: StoredPlan) -> None:
        with self._lock:
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

    def put_reply(self, command_id: str, result_ids: list[str], reply: bytes) -> None:
        with self._lock:
            self._replies[command_id] = reply
            while len(self._replies) > self._max_replies:  # redeliveries come soon or never
                self._replies.popitem(last=False)

    def get_reply(self, command_id: str) -> bytes | None:
        with self._lock:
            return self._replies.get(command_id)
