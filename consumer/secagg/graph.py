"""The neighbour graph of a round: complete for small rounds, k-regular (SecAgg+) for large.

Devices only agree keys, share secrets and cancel masks with their neighbours. The k-regular
graph is a Harary (circulant) graph over an order of the devices fixed by a public seed:
each device is joined to the ``k // 2`` devices on either side of it (and, for odd ``k``, to
the one opposite). Anyone holding the device list, ``k`` and the seed computes the same graph
(:data:`GRAPH_VERSION` names this derivation on the wire), so a round's config carries
``k`` and a seed, never the ``n·k`` edges; a device computes only its own neighbours.

:func:`safe_degree` picks the smallest ``k`` whose round survives a given fraction of the
devices dropping out, except with a given (union-bounded, exact hypergeometric) probability.

Examples
--------
>>> g = neighbour_graph(["a", "b", "c", "d", "e", "f"], k=2, seed=b"round-7")
>>> all(len(peers) == 2 for peers in g.values())
True
>>> all(d in g[p] for d, peers in g.items() for p in peers)
True
>>> neighbour_graph(["a", "b", "c"], k=8, seed=b"")["a"]
('b', 'c')
>>> safe_degree(100, max_dropout=1 / 3)  # 33 of 100 dropping can never break t = 34 of 67
67
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from consumer.secagg.errors import SecAggProtocolError

GRAPH_VERSION = 1
"""The graph derivation on the wire: Harary graph over the SHA-256(seed ‖ 0 ‖ id) order."""
DEFAULT_FAILURE_PROBABILITY = 2.0**-30
"""The default bound on the chance that a round with ``max_dropout`` dropping cannot unmask."""


class NeighbourGraph(Mapping[str, tuple[str, ...]]):
    """Each device's neighbours (sorted), computed on first access: complete when ``k`` is
    ``None`` (or ``k >= n - 1``), else k-regular over the seeded order.

    An odd ``k`` with an odd number of devices has no k-regular graph: ``k + 1`` is used.
    ``k`` is the degree actually used (``None`` for the complete graph).
    """

    __slots__ = ("_cache", "_order", "_position", "devices", "k", "seed")

    def __init__(self, devices: Sequence[str], *, k: int | None, seed: bytes) -> None:
        ids = tuple(sorted(devices))
        if len(set(ids)) != len(ids):
            raise SecAggProtocolError("device ids in a round must be distinct")
        n = len(ids)
        if k is not None and k < n - 1:
            if k < 1:
                raise SecAggProtocolError(f"k={k}: every device needs at least one neighbour")
            k += (k % 2) * (n % 2)
        else:
            k = None
        self.devices, self.k, self.seed = ids, k, bytes(seed) if k is not None else b""
        self._cache: dict[str, tuple[str, ...]] = {}
        self._order: list[str] = []
        self._position: dict[str, int] = {}
        if k is not None:
            self._order = sorted(ids, key=lambda d: hashlib.sha256(
                seed + b"\x00" + d.encode()).digest())
            self._position = {d: i for i, d in enumerate(self._order)}

    @property
    def degree(self) -> int:
        """Every device's number of neighbours."""
        return len(self.devices) - 1 if self.k is None else self.k

    def __getitem__(self, device: str) -> tuple[str, ...]:
        peers = self._cache.get(device)
        if peers is None:
            peers = self._cache[device] = self._peers(device)
        return peers

    def _peers(self, device: str) -> tuple[str, ...]:
        if self.k is None:
            if device not in self.devices:
                raise KeyError(device)
            return tuple(p for p in self.devices if p != device)
        i, n, order = self._position[device], len(self.devices), self._order
        offsets = range(1, self.k // 2 + 1)
        peers = {order[(i + o) % n] for o in offsets} | {order[(i - o) % n] for o in offsets}
        if self.k % 2:
            peers.add(order[(i + n // 2) % n])
        return tuple(sorted(peers))

    def __iter__(self) -> Iterator[str]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def __contains__(self, device: object) -> bool:
        return device in self.devices

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NeighbourGraph) and (self.devices, self.k, self.seed) == (
            other.devices, other.k, other.seed
        ):
            return True
        return Mapping.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"NeighbourGraph(n={len(self.devices)}, k={self.k}, seed={self.seed.hex()})"


def neighbour_graph(
    devices: Sequence[str], *, k: int | None = None, seed: bytes
) -> NeighbourGraph:
    """Each device's neighbours (sorted). ``k`` None or >= n-1 gives the complete graph."""
    return NeighbourGraph(devices, k=k, seed=seed)


def dropout_failure_probability(
    n: int, k: int, *, max_dropout: float, threshold: int | None = None
) -> float:
    """An upper bound on the chance that, with ``floor(n · max_dropout)`` of ``n`` devices
    dropping uniformly at random, some device of a k-regular round keeps fewer than
    ``threshold`` (default ``k // 2 + 1``) neighbours to rebuild its secret from: ``n``
    times the exact hypergeometric tail (Bell et al. 2020 bound the same event; 0 when it
    cannot happen whichever devices drop).

    >>> dropout_failure_probability(100, 60, max_dropout=1 / 3) > 1e-4
    True
    """
    if k >= n - 1:
        k = n - 1
    others, dropped = n - 1, math.floor(n * max_dropout)
    t = threshold if threshold is not None else k // 2 + 1
    tail = sum(math.comb(dropped, x) * math.comb(others - dropped, k - x)
               for x in range(k - t + 1, min(k, dropped) + 1))
    return min(1.0, n * tail / math.comb(others, k))


def safe_degree(
    n: int,
    *,
    max_dropout: float,
    failure_probability: float = DEFAULT_FAILURE_PROBABILITY,
    threshold_of: Callable[[int], int] = lambda k: k // 2 + 1,
) -> int:
    """The smallest ``k`` (``n - 1``: the complete graph) for which ``max_dropout`` of ``n``
    devices dropping fails a round with at most ``failure_probability``; ``threshold_of``
    gives the threshold of a degree.

    >>> safe_degree(1000, max_dropout=1 / 3) < 999
    True
    """
    for k in range(2, n - 1):
        used = k + (k % 2) * (n % 2)  # as NeighbourGraph builds it
        if dropout_failure_probability(n, used, max_dropout=max_dropout,
                                       threshold=threshold_of(used)) <= failure_probability:
            return used
    return n - 1
