"""Tests for schemas.value_codec: every IR value variant <-> the Value protobuf."""

from __future__ import annotations

import math

import pytest
import torch

from schemas.errors import WireError
from schemas.ir import (
    Device,
    DType,
    EllipsisValue,
    MemoryFormat,
    ObjectId,
    Ref,
    Slice,
    SymExpr,
    Value,
)
from schemas.plan_pb2 import SliceProto, SymExprProto, ValueDict
from schemas.plan_pb2 import Value as ValueProto
from schemas.value_codec import (
    value_dict_from_proto,
    value_dict_to_proto,
    value_from_proto,
    value_list_from_proto,
    value_list_to_proto,
    value_to_proto,
)


def round_trip(value: Value) -> Value:
    return value_from_proto(ValueProto.FromString(value_to_proto(value).SerializeToString()))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        2**63 - 1,
        -(2**63),
        1.5,
        -0.0,
        float("inf"),
        float("-inf"),
        "",
        "héllo",
        Ref(0),
        Ref(2**32 - 1),
        SymExpr("floordiv", (SymExpr("mul", (Ref(1), 2)), 3)),
        DType("bfloat16"),
        Device("cpu"),
        Slice(None, Ref(4), -1),
        EllipsisValue(),
        MemoryFormat("channels_last"),
        ObjectId("0123456789abcdef"),
        (),
        (1, (2, [3, {"a": None}])),
        [Ref(1), Slice(0, None, None), EllipsisValue()],
        {},
        {"z": 1, "a": [2.0], "m": (Ref(3),)},
    ],
    ids=repr,
)
def test_every_ir_value_variant_round_trips(value: Value) -> None:
    decoded = round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_bool_stays_bool_and_int_stays_int() -> None:
    assert round_trip(True) is True
    assert type(round_trip(1)) is int
    assert value_to_proto(False).WhichOneof("kind") == "bool_value"
    assert value_to_proto(0).WhichOneof("kind") == "int_value"


def test_nan_round_trips_as_nan() -> None:
    decoded = round_trip(float("nan"))
    assert isinstance(decoded, float) and math.isnan(decoded)


def test_negative_zero_keeps_its_sign() -> None:
    decoded = round_trip(-0.0)
    assert isinstance(decoded, float) and math.copysign(1.0, decoded) == -1.0


def test_dict_order_is_kept() -> None:
    decoded = round_trip({"b": 1, "a": 2, "c": 3})
    assert isinstance(decoded, dict)
    assert list(decoded) == ["b", "a", "c"]


def test_tuples_and_lists_stay_distinct() -> None:
    decoded = round_trip(([1], (1,)))
    assert decoded == ([1], (1,))
    assert isinstance(decoded, tuple) and isinstance(decoded[0], list)


def test_an_inline_tensor_round_trips_with_its_dtype_and_grad_flag() -> None:
    original = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    decoded = round_trip({"t": original})
    assert isinstance(decoded, dict)
    tensor = decoded["t"]
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.float64 and tensor.requires_grad
    assert torch.equal(tensor.detach(), original.detach())


def test_value_lists_and_dicts_round_trip() -> None:
    assert value_list_from_proto(value_list_to_proto([1, "x", Ref(2)])) == [1, "x", Ref(2)]
    assert value_dict_from_proto(value_dict_to_proto({"k": (1, 2)})) == {"k": (1, 2)}


@pytest.mark.parametrize(
    "value",
    [
        torch.float32,
        slice(1, 2),
        ...,
        1 + 2j,
        object(),
        b"raw",
        {1, 2},
    ],
    ids=repr,
)
def test_python_objects_that_are_not_ir_values_are_refused(value: object) -> None:
    with pytest.raises(WireError, match="lower it"):
        value_to_proto(value)  # type: ignore[arg-type]


def test_integers_beyond_64_bits_are_refused() -> None:
    with pytest.raises(WireError, match="64 bits"):
        value_to_proto(2**63)


def test_dict_keys_must_be_strings() -> None:
    with pytest.raises(WireError, match="str keys"):
        value_to_proto({1: "a"})  # type: ignore[dict-item]


def test_an_empty_value_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="no kind"):
        value_from_proto(ValueProto())


def test_a_dict_with_more_keys_than_values_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="2 keys but 1 values"):
        value_dict_from_proto(ValueDict(keys=["a", "b"], values=[value_to_proto(1)]))


def test_a_dict_with_a_repeated_key_is_a_wire_error() -> None:
    one = value_to_proto(1)
    with pytest.raises(WireError, match="repeats"):
        value_dict_from_proto(ValueDict(keys=["a", "a"], values=[one, one]))


def test_a_slice_missing_a_bound_is_a_wire_error() -> None:
    proto = ValueProto(slice=SliceProto(start=value_to_proto(None), stop=value_to_proto(1)))
    with pytest.raises(WireError, match="bound"):
        value_from_proto(proto)


def test_a_symbolic_expression_over_a_string_is_a_wire_error() -> None:
    proto = ValueProto(sym=SymExprProto(op="add", args=[value_to_proto("x")]))
    with pytest.raises(WireError, match="operand"):
        value_from_proto(proto)


def test_an_unknown_dtype_value_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="unknown dtype"):
        value_from_proto(ValueProto(dtype="load"))
