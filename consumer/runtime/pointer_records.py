"""Pointers a device holds to objects on other devices (the seeds' pointer to a pointer)."""

from __future__ import annotations

import threading

from schemas.command_pb2 import ObjectInfo, StorePointer


class PointerRecords:
    """The pointer records of one device, by object id.

    A record only names where the value is (``location``, ``remote_id``) with its metadata;
    the value itself stays on the other device until the server moves it. Records live in
    the device process's memory: a restarted worker forgets them (its tensors it keeps).

    Examples
    --------
    >>> records = PointerRecords()
    >>> records.put(StorePointer(id="p", location="bob", remote_id="x", tags=["t"]))
    >>> records.info(records.get("p")).points_to_device
    'bob'
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, StorePointer] = {}

    def put(self, record: StorePointer) -> None:
        with self._lock:
            self._records[record.id] = record

    def get(self, object_id: str) -> StorePointer | None:
        with self._lock:
            return self._records.get(object_id)

    def pop(self, object_id: str) -> StorePointer | None:
        with self._lock:
            return self._records.pop(object_id, None)

    def search(self, tags: list[str]) -> list[StorePointer]:
        """Records carrying every one of ``tags`` (all records for no tags)."""
        with self._lock:
            return [r for r in self._records.values() if set(tags) <= set(r.tags)]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    @staticmethod
    def info(record: StorePointer) -> ObjectInfo:
        """The record's metadata for a reply (kind ``"pointer"``)."""
        return ObjectInfo(
            id=record.id,
            tags=list(record.tags),
            description=record.description,
            dtype=record.dtype,
            shape=list(record.shape),
            kind="pointer",
            points_to_device=record.location,
            points_to_id=record.remote_id,
        )


__all__ = ["PointerRecords"]
