"""Plan output patterns: which leaves of a plan's result become stored objects, and back."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from schemas.ir import Ref, SymExpr, Value
from schemas.tree import tree_leaves, tree_map


def output_slots(pattern: Value) -> list[Value]:
    """The leaves of an output pattern that carry a computed value (``Ref``/``SymExpr``), in order.

    Constant leaves (``None``, a baked-in int) are not results: the caller rebuilds them.

    Examples
    --------
    >>> output_slots((Ref(3), None, [Ref(4)]))
    [Ref(slot=3), Ref(slot=4)]
    """
    return tree_leaves(pattern, keep=_computed)


def _computed(leaf: Value) -> bool:
    return isinstance(leaf, Ref | SymExpr)


def flatten_like(pattern: Value, value: Any) -> list[Any]:
    """The parts of ``value`` (a plan's output) at the pattern's computed leaves, in order."""
    found: list[Any] = []
    _flatten(pattern, value, found)
    return found


def _flatten(pattern: Value, value: Any, found: list[Any]) -> None:
    if isinstance(pattern, Ref | SymExpr):
        found.append(value)
    elif isinstance(pattern, tuple | list):
        for i, item in enumerate(pattern):
            _flatten(item, value[i], found)
    elif isinstance(pattern, dict):
        for key, item in pattern.items():
            _flatten(item, value[key], found)


def rebuild_like(pattern: Value, make: Callable[[int], Any]) -> Any:
    """The pattern's structure with ``make(i)`` at the i-th computed leaf, constants kept.

    Examples
    --------
    >>> rebuild_like((Ref(3), None, [Ref(4)]), lambda i: f"r{i}")
    ('r0', None, ['r1'])
    """
    counter = iter(range(1 << 62))
    return tree_map(lambda leaf: make(next(counter)) if _computed(leaf) else leaf, pattern)


def inline_flags(results: list[Any], limit: int, others: Iterable[Any]) -> list[bool]:
    """Which results may travel in the reply: tensors of at most ``limit`` bytes sharing no memory.

    A result that shares memory with a tensor in ``others`` (the call's arguments, the plan's
    state and constants) or with another result could change on the device without its
    pointer being named by a later command, so its value is not sent (``get()`` fetches it).

    Examples
    --------
    >>> x = torch.zeros(4)
    >>> inline_flags([x + 1, x[:2], torch.zeros(1000)], 64, [x])
    [True, False, False]
    """
    taken = {_storage(t) for t in tree_leaves(list(others), keep=_is_tensor)}
    keys = [_storage(v) if isinstance(v, torch.Tensor) else None for v in results]
    flags = []
    for value, key in zip(results, keys, strict=True):
        flags.append(
            isinstance(value, torch.Tensor)
            and value.numel() * value.element_size() <= limit
            and (key == 0 or (key not in taken and keys.count(key) == 1))
        )
    return flags


def _storage(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)
