"""The device store interface: tensors, plans (with their state) and tags, by id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from schemas.ir import PlanIR
from schemas.tensor_codec import FramedParts


@dataclass(slots=True)
class StoredObject:
    """A tensor held by a device, with its tags and description."""

    id: str
    tensor: torch.Tensor
    tags: tuple[str, ...] = ()
    description: str = ""


@dataclass(slots=True)
class StoredPlan:
    """A plan held by a device; ``ir.state_values`` is its live, persistent state."""

    id: str
    ir: PlanIR
    content_hash: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


class DeviceStore(Protocol):
    """What the device runtime needs from storage; implementations must be thread-safe.

    ``MemoryStore`` backs embedded devices; ``SqliteStore`` (SQLite index + tensor blobs)
    backs Celery workers and survives restarts. ``get_*`` raise ``ObjectNotFound``; a write
    over a bound raises ``StoreFullError`` (see :mod:`consumer.store.limits`).
    """

    def put_object(self, obj: StoredObject) -> None: ...

    def get_object(self, object_id: str) -> StoredObject: ...

    def has_object(self, object_id: str) -> bool: ...

    def delete_object(self, object_id: str) -> None: ...

    def search(self, tags: list[str]) -> list[StoredObject]: ...

    def list_objects(self) -> list[StoredObject]: ...

    def resident_objects(self) -> list[StoredObject]:
        """The objects whose tensors this process holds in memory now (the only ones
        another tensor can share memory with; nothing is loaded)."""
        ...

    def clear_objects(self) -> None: ...

    def put_plan(self, plan: StoredPlan) -> None: ...

    def get_plan(self, plan_id: str) -> StoredPlan: ...

    def has_plan(self, plan_id: str) -> bool: ...

    def save_plan_state(self, plan: StoredPlan) -> None:
        """Persist the plan's state after a run changed it (no-op in memory)."""
        ...

    def delete_plan(self, plan_id: str) -> None: ...

    def put_reply(
        self, command_id: str, result_ids: list[str], reply: bytes | FramedParts
    ) -> None:
        """Remember the encoded reply of a command whose results were stored (idempotency)."""
        ...

    def get_reply(self, command_id: str) -> bytes | None: ...

    def begin(self) -> None:
        """Start a unit: the writes until ``commit`` happen together or not at all."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Undo the unit's writes where the store can (the in-memory store cannot)."""
        ...
