"""Nested values (tuples, lists, dicts of leaves): one walker for the server and the devices.

The role ``torch.fx.node.map_aggregate`` plays in torch.fx: plan arguments, outputs and IR
value patterns are trees whose containers are tuples (named tuples and ``torch.Size``
included), lists and dicts; everything else is a leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Predicate = Callable[[Any], bool]


def is_container(value: Any) -> bool:
    """Whether the walkers here descend into ``value`` (a tuple, list or dict)."""
    return isinstance(value, tuple | list | dict)


def tree_map(fn: Callable[[Any], Any], value: Any, *, leaf: Predicate | None = None) -> Any:
    """``value`` with ``fn`` applied to every leaf; containers rebuilt as plain tuple/list/dict.

    ``leaf(v)`` true stops the descent: ``fn`` gets that container whole (to keep a named
    tuple or a ``torch.Size``, or to refuse a dict with non-string keys).

    Examples
    --------
    >>> tree_map(lambda x: x * 10, (1, [2, {"a": 3}], None))
    (10, [20, {'a': 30}], None)
    >>> tree_map(str, {"k": (1, 2)}, leaf=lambda v: isinstance(v, tuple))
    {'k': '(1, 2)'}
    """
    if leaf is not None and leaf(value):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(tree_map(fn, item, leaf=leaf) for item in value)
    if isinstance(value, list):
        return [tree_map(fn, item, leaf=leaf) for item in value]
    if isinstance(value, dict):
        return {key: tree_map(fn, item, leaf=leaf) for key, item in value.items()}
    return fn(value)


def tree_leaves(
    value: Any, *, keep: Predicate | None = None, leaf: Predicate | None = None
) -> list[Any]:
    """The leaves of ``value`` in order (dicts by insertion), those passing ``keep`` if given.

    Examples
    --------
    >>> tree_leaves((1, [2, {"a": 3}], "x"))
    [1, 2, 3, 'x']
    >>> tree_leaves((1, [2.5, "x"]), keep=lambda v: isinstance(v, int))
    [1]
    """
    found: list[Any] = []
    _leaves(value, found, keep, leaf)
    return found


def _leaves(value: Any, found: list[Any], keep: Predicate | None, leaf: Predicate | None) -> None:
    if not (leaf is not None and leaf(value)):
        if isinstance(value, tuple | list):
            for item in value:
                _leaves(item, found, keep, leaf)
            return
        if isinstance(value, dict):
            for item in value.values():
                _leaves(item, found, keep, leaf)
            return
    if keep is None or keep(value):
        found.append(value)


def tree_any(predicate: Predicate, value: Any) -> bool:
    """Whether some leaf of ``value`` passes ``predicate``.

    Examples
    --------
    >>> tree_any(lambda v: v is None, (1, [None]))
    True
    """
    return bool(tree_leaves(value, keep=predicate))


def tree_zip_map(
    fn: Callable[[Any, Any], Any], pattern: Any, value: Any, *, leaf: Predicate | None = None
) -> Any:
    """``fn(p, v)`` at each leaf ``p`` of ``pattern`` and the part ``v`` of ``value`` there.

    ``value`` must have ``pattern``'s containers; a missing key or index raises
    ``KeyError``/``IndexError``, a shorter or longer sequence ``ValueError``.

    Examples
    --------
    >>> tree_zip_map(lambda p, v: (p, v), ("a", ["b"]), (1, [2]))
    (('a', 1), [('b', 2)])
    """
    if leaf is not None and leaf(pattern):
        return fn(pattern, value)
    if isinstance(pattern, tuple | list):
        if len(value) != len(pattern):
            raise ValueError(f"expected {len(pattern)} items, got {len(value)}")
        items = [tree_zip_map(fn, p, v, leaf=leaf) for p, v in zip(pattern, value, strict=True)]
        return tuple(items) if isinstance(pattern, tuple) else items
    if isinstance(pattern, dict):
        return {k: tree_zip_map(fn, p, value[k], leaf=leaf) for k, p in pattern.items()}
    return fn(pattern, value)
