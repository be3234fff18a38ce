"""The tensors a store process holds in memory: a least-recently-used cache bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from consumer.store.base import StoredObject
from consumer.store.tensor_files import tensor_nbytes


@dataclass(slots=True)
class Live:
    """An object held in memory: the row version it came from, its tensor's ``_version``."""

    seq: int
    version: int
    obj: StoredObject
    nbytes: int = 0

    @property
    def dirty(self) -> bool:
        """Changed in place since it was loaded or last written."""
        return self.obj.tensor._version != self.version


class LiveCache:
    """Live objects by id, least recently used first, at most ``max_bytes`` of clean ones.

    A tensor that requires grad (or has a ``.grad``) is never dropped: its autograd identity
    exists only in memory. A tensor changed in place is kept until it was written back.
    :meth:`trim` runs only between commands (after a unit committed): a tensor a command
    holds is never dropped under it, so its in-place changes reach the disk.

    Examples
    --------
    >>> import torch
    >>> cache = LiveCache(max_bytes=8)
    >>> cache.put(StoredObject("a", torch.zeros(2)), seq=1)
    >>> cache.put(StoredObject("b", torch.zeros(2)), seq=2)
    >>> cache.put(StoredObject("c", torch.zeros(2)), seq=3)
    >>> cache.trim()
    >>> list(cache.ids())
    ['b', 'c']
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, Live] = OrderedDict()

    def put(self, obj: StoredObject, seq: int) -> None:
        self.pop(obj.id)
        live = Live(seq, obj.tensor._version, obj, tensor_nbytes(obj.tensor))
        self._items[obj.id] = live
        self.nbytes += live.nbytes

    def get(self, object_id: str) -> Live | None:
        """The live object (now the most recently used), or None."""
        live = self._items.get(object_id)
        if live is not None:
            self._items.move_to_end(object_id)
        return live

    def pop(self, object_id: str) -> None:
        live = self._items.pop(object_id, None)
        if live is not None:
            self.nbytes -= live.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def ids(self) -> Iterator[str]:
        return iter(list(self._items))

    def values(self) -> list[Live]:
        return list(self._items.values())

    def trim(self) -> None:
        """Drop least recently used clean tensors until the cache fits ``max_bytes``."""
        if self.nbytes <= self.max_bytes:
            return
        for object_id, live in list(self._items.items()):
            if self.nbytes <= self.max_bytes:
                return
            t = live.obj.tensor
            if not (t.requires_grad or t.grad is not None or live.dirty):
                self.pop(object_id)
