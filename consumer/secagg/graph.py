"""The neighbour graph of a round: complete for small rounds, k-regular (SecAgg+) for large.

Devices only agree keys, share secrets and cancel masks with their neighbours. The k-regular
graph is a Harary (circulant) graph over an order of the devices fixed by a public seed:
each device is joined to the ``k // 2`` devices on either side of it (and, for odd ``k``, to
the one opposite). Anyone holding the device list and the seed computes the same graph.

Examples
--------
>>> g = neighbour_graph(["a", "b", "c", "d", "e", "f"], k=2, seed=b"round-7")
>>> all(len(peers) == 2 for peers in g.values())
True
>>> all(d in g[p] for d, peers in g.items() for p in peers)
True
>>> neighbour_graph(["a", "b", "c"], k=8, seed=b"")["a"]
('b', 'c')
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from consumer.secagg.errors import SecAggProtocolError


def neighbour_graph(
    devices: Sequence[str], *, k: int | None = None, seed: bytes
) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (sorted). ``k`` None or >= n-1 gives the complete graph.

    An odd ``k`` with an odd number of devices has no k-regular graph: ``k + 1`` is used.
    """
    ids = sorted(devices)
    if len(set(ids)) != len(ids):
        raise SecAggProtocolError("device ids in a round must be distinct")
    n = len(ids)
    if k is None or k >= n - 1:
        return {d: tuple(p for p in ids if p != d) for d in ids}
    if k < 1:
        raise SecAggProtocolError(f"k={k}: every device needs at least one neighbour")
    if k % 2 and n % 2:
        k += 1
    order = sorted(ids, key=lambda d: hashlib.sha256(seed + b"\x00" + d.encode()).digest())
    position = {d: i for i, d in enumerate(order)}
    offsets = list(range(1, k // 2 + 1))
    graph: dict[str, tuple[str, ...]] = {}
    for d in ids:
        i = position[d]
        peers = {order[(i + o) % n] for o in offsets} | {order[(i - o) % n] for o in offsets}
        if k % 2:
            peers.add(order[(i + n // 2) % n])
        graph[d] = tuple(sorted(peers))
    return graph
