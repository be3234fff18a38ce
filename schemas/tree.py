"""Nested values (tuples, lists, dicts of leaves): one walker for the server and the devices.

The role ``torch.fx.node.map_aggregate`` plays in torch.fx: plan arguments, outputs and IR
value patterns are trees whose containers are tuples (named tuples and ``torch.Size``
included), lists and dicts; everything else is a leaf. Like ``map_aggregate``, a mapped named
tuple keeps its class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Predicate = Callable[[Any], bool]
Path = tuple[Any, ...]
"""Indices and dict keys from the root of a tree to one of its leaves."""


def tree_map(fn: Callable[[Any], Any], value: Any, *, leaf: Predicate | None = None) -> Any:
    """``value`` with ``fn`` applied to every leaf; containers rebuilt as tuple/list/dict.

    Named tuples keep their class; other tuple subclasses (``torch.Size``) become tuples.

    ``leaf(v)`` true stops the descent: ``fn`` gets that container whole (to keep a named
    tuple or a ``torch.Size``, or to refuse a dict with non-string keys).

    Examples
    --------
    >>> tree_map(lambda x: x * 10, (1, [2, {"a": 3}]))
    (10, [20, {'a': 30}])
    >>> tree_map(str, {"k": (1, 2)}, leaf=lambda v: isinstance(v, tuple))
    {'k': '(1, 2)'}
    """
    return tree_map_with_path(lambda _, v: fn(v), value, leaf=leaf)


def tree_map_with_path(
    fn: Callable[[Path, Any], Any],
    value: Any,
    path: Path = (),
    *,
    leaf: Predicate | None = None,
) -> Any:
    """Like :func:`tree_map`, but ``fn(path, leaf)`` also gets the indices and keys leading there.

    Examples
    --------
    >>> tree_map_with_path(lambda p, v: p, ("a", {"k": ["b"]}))
    ((0,), {'k': [(1, 'k', 0)]})
    >>> format_path("args", (1, "k", 0))
    "args[1]['k'][0]"
    """
    if leaf is not None and leaf(value):
        return fn(path, value)
    if isinstance(value, tuple):
        items = [tree_map_with_path(fn, v, (*path, i), leaf=leaf) for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [tree_map_with_path(fn, item, (*path, i), leaf=leaf) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {k: tree_map_with_path(fn, item, (*path, k), leaf=leaf) for k, item in value.items()}
    return fn(path, value)


def format_path(root: str, path: Path) -> str:
    """``root[0]['key']``: where a leaf is, for messages."""
    return root + "".join(f"[{key!r}]" for key in path)


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
