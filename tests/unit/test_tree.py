"""Tests for schemas.tree (the one walker over nested values) and schemas.ir.to_ir_value."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch

from schemas.ir import Device, DType, EllipsisValue, MemoryFormat, Ref, Slice, to_ir_value
from schemas.tree import (
    format_path,
    tree_any,
    tree_leaves,
    tree_map,
    tree_map_with_path,
)

Pair = namedtuple("Pair", "a b")


def test_tree_map_applies_to_every_leaf_and_rebuilds_plain_containers() -> None:
    value = (1, [2, {"k": 3, "j": (4,)}], torch.Size([5, 6]))
    assert tree_map(lambda x: x * 10, value) == (10, [20, {"k": 30, "j": (40,)}], (50, 60))
    out = tree_map(lambda x: x, value)
    assert type(out[2]) is tuple and type(out[1]) is list and list(out[1][1]) == ["k", "j"]


def test_a_mapped_named_tuple_keeps_its_class() -> None:
    out = tree_map(lambda x: x + 1, [Pair(1, (2, 3))])
    assert type(out[0]) is Pair and out[0].a == 2 and out[0].b == (3, 4)


def test_a_leaf_predicate_hands_a_container_to_fn_whole() -> None:
    pair = Pair(torch.ones(1), 2)
    seen: list[Any] = []
    out = tree_map(lambda v: seen.append(v) or v, [pair, (3,)], leaf=lambda v: v is pair)
    assert out[0] is pair and seen == [pair, 3]


def test_tree_leaves_lists_leaves_in_order_and_filters_with_keep() -> None:
    value = {"b": [1, "x"], "a": (2.5, None)}
    assert tree_leaves(value) == [1, "x", 2.5, None]
    assert tree_leaves(value, keep=lambda v: isinstance(v, int)) == [1]
    assert tree_leaves(7) == [7]
    assert tree_leaves(((), [], {})) == []
    assert tree_any(lambda v: v is None, value) and not tree_any(lambda v: v == 3, value)


def test_paths_name_the_indices_and_keys_down_to_each_leaf() -> None:
    paths = tree_map_with_path(lambda p, v: format_path("x", p), ([0, {"k": 1}], 2))
    assert paths == (["x[0][0]", {"k": "x[0][1]['k']"}], "x[1]")


def test_only_tuples_lists_and_dicts_are_walked_into() -> None:
    walked = ((1,), [1], {"k": 1}, torch.Size([1]), Pair(1, None))
    assert [tree_leaves(v)[0] for v in walked] == [1, 1, 1, 1, 1]
    t = torch.ones(2)
    for leaf in ("ab", b"ab", {1}, t, None):
        assert tree_leaves(leaf) == [leaf]


def test_to_ir_value_lowers_python_constants_and_leaves_the_rest_to_the_caller() -> None:
    value = (torch.float16, torch.device("cpu"), torch.channels_last, slice(None, 3), ...)
    assert to_ir_value(value, _refuse) == (
        DType("float16"),
        Device("cpu"),
        MemoryFormat("channels_last"),
        Slice(None, 3, None),
        EllipsisValue(),
    )
    t = torch.ones(2)
    assert to_ir_value({"k": [t, 1, "s", None, True]}, lambda v: Ref(9)) == {
        "k": [Ref(9), 1, "s", None, True]
    }
    assert to_ir_value(slice(t, None), lambda v: Ref(3)) == Slice(Ref(3), None, None)


def test_to_ir_value_gives_a_dict_with_other_keys_whole_to_the_caller() -> None:
    with pytest.raises(TypeError, match="dict"):
        to_ir_value([{1: 2}], _refuse)
    with pytest.raises(TypeError, match="object"):
        to_ir_value((1, object()), _refuse)


def _refuse(value: Any) -> Any:
    raise TypeError(f"cannot lower a {type(value).__name__}")
