"""Tests for schemas.plan_codec: PlanIR <-> PlanProto, schema versions and content hashes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from schemas.errors import SchemaVersionError, WireError
from schemas.ir import (
    NO_EXPECT,
    SCHEMA_VERSION,
    DType,
    InputSpec,
    Op,
    PlanIR,
    Ref,
    Slice,
    SymExpr,
)
from schemas.plan_codec import (
    PLAN_SCHEMA_VERSIONS,
    plan_content_hash,
    plan_from_proto,
    plan_to_proto,
)
from schemas.plan_pb2 import PlanProto


def linear_plan() -> PlanIR:
    """A small training-like plan exercising every IR field."""
    x, w, b, c = Ref(0), Ref(1), Ref(2), Ref(3)
    return PlanIR(
        name="linear",
        inputs=((x,), {"scale": 2.0}),
        kwinputs={"flag": Ref(4)},
        ops=[
            Op("Tensor.size", (x, 0), {}, Ref(5)),
            Op("Tensor.view", (x, SymExpr("mul", (Ref(5), 1)), -1), {}, Ref(6)),
            Op("torch.nn.functional.linear", (Ref(6), w), {"bias": b}, Ref(7)),
            Op("Tensor.__getitem__", (Ref(7), (Slice(None, None, None), 0)), {}, Ref(8)),
            Op("Tensor.__bool__", (Ref(4),), {}, None, expect=True, source="f.py:3: if flag:"),
            Op("torch.split", (Ref(7), 1), {"dim": 1}, (Ref(9), Ref(10))),
            Op("Tensor.add_", (Ref(8), c), {}, None),
        ],
        outputs={"y": Ref(7), "parts": [Ref(9), Ref(10)]},
        num_slots=11,
        input_specs=[
            InputSpec(slot=0, path="x", ndim=2, dtype=DType("float32"), sizes={1: 3}),
            InputSpec(slot=4, path="kw['flag']", ndim=0),
        ],
        state={"fc.weight": 1, "fc.bias": 2},
        state_values={
            "fc.weight": torch.randn(2, 3, requires_grad=True),
            "fc.bias": torch.zeros(2, requires_grad=True),
        },
        constants={3: torch.tensor([1.0, 2.0])},
    )


def decode(ir: PlanIR, plan_id: str = "plan-1") -> tuple[PlanIR, str]:
    wire = plan_to_proto(ir, plan_id=plan_id).SerializeToString()
    return plan_from_proto(PlanProto.FromString(wire))


def test_a_plan_round_trips_through_bytes_with_every_field() -> None:
    ir = linear_plan()
    decoded, plan_id = decode(ir)
    assert plan_id == "plan-1"
    assert decoded.name == ir.name
    assert decoded.inputs == ir.inputs
    assert decoded.kwinputs == ir.kwinputs
    assert decoded.outputs == ir.outputs
    assert decoded.num_slots == ir.num_slots
    assert decoded.input_specs == ir.input_specs
    assert decoded.state == ir.state and list(decoded.state) == list(ir.state)
    assert [(o.target, o.args, o.kwargs, o.out, o.expect, o.source) for o in decoded.ops] == [
        (o.target, o.args, o.kwargs, o.out, o.expect, o.source) for o in ir.ops
    ]
    for name, value in ir.state_values.items():
        assert torch.equal(decoded.state_values[name].detach(), value.detach())
        assert decoded.state_values[name].requires_grad
    assert torch.equal(decoded.constants[3], ir.constants[3])


def test_guards_keep_their_expected_value_and_ordinary_ops_have_none() -> None:
    decoded, _ = decode(linear_plan())
    guards = [op for op in decoded.ops if op.is_guard]
    assert [(g.target, g.expect) for g in guards] == [("Tensor.__bool__", True)]
    assert decoded.ops[0].expect is NO_EXPECT


def test_a_guard_expecting_none_stays_a_guard() -> None:
    ir = PlanIR(
        "g", (Ref(0),), [Op("Tensor.grad.__get__", (Ref(0),), {}, None, expect=None)], None, 1
    )
    decoded, _ = decode(ir)
    assert decoded.ops[0].is_guard and decoded.ops[0].expect is None


def test_state_without_a_value_round_trips_without_one() -> None:
    ir = linear_plan()
    del ir.state_values["fc.bias"]
    decoded, _ = decode(ir)
    assert "fc.bias" in decoded.state and "fc.bias" not in decoded.state_values


def test_the_proto_carries_the_schema_version_and_a_sha256_content_hash() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="p")
    assert proto.schema_version == SCHEMA_VERSION
    assert len(proto.content_hash) == 64
    int(proto.content_hash, 16)


def test_the_content_hash_ignores_the_plan_id() -> None:
    ir = linear_plan()
    one = plan_to_proto(ir, plan_id="a").content_hash
    other = plan_to_proto(ir, plan_id="b").content_hash
    assert one == other == plan_content_hash(ir)


def test_the_content_hash_does_not_depend_on_dict_insertion_order_of_sizes() -> None:
    ir = linear_plan()
    ir.input_specs[0].sizes = {0: 4, 1: 3}
    first = plan_content_hash(ir)
    ir.input_specs[0].sizes = {1: 3, 0: 4}
    assert plan_content_hash(ir) == first


def test_the_content_hash_changes_with_state_values_and_ops() -> None:
    ir = linear_plan()
    before = plan_content_hash(ir)
    with torch.no_grad():
        ir.state_values["fc.bias"].add_(1)
    after_state = plan_content_hash(ir)
    ir.ops[2].target = "torch.nn.functional.bilinear"
    assert len({before, after_state, plan_content_hash(ir)}) == 3


def test_decoding_leaves_the_received_proto_unchanged() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="keep")
    wire = proto.SerializeToString()
    plan_from_proto(proto)
    assert proto.SerializeToString() == wire


def test_a_tampered_plan_is_refused_by_its_content_hash() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="p")
    proto.ops[2].target = "torch.load"
    with pytest.raises(WireError, match="content hash") as info:
        plan_from_proto(proto)
    assert info.value.plan_id == "p"


def test_a_plan_without_a_content_hash_is_refused() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="p")
    proto.content_hash = ""
    with pytest.raises(WireError, match="no content hash"):
        plan_from_proto(proto)


def test_an_unknown_schema_version_is_refused_naming_the_supported_ones() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="p")
    proto.schema_version = max(PLAN_SCHEMA_VERSIONS) + 1
    with pytest.raises(SchemaVersionError, match=f"supports {SCHEMA_VERSION}, 2"):
        plan_from_proto(proto)


def test_a_slot_reference_beyond_num_slots_is_refused_with_the_op_index() -> None:
    ir = linear_plan()
    ir.ops[1].args = (Ref(0), Ref(99))
    with pytest.raises(WireError, match="slot 99") as info:
        decode(ir)
    assert info.value.op_index == 1


def test_an_absurd_number_of_slots_is_refused() -> None:
    ir = linear_plan()
    ir.num_slots = 2**30
    with pytest.raises(WireError, match="slots"):
        decode(ir)


def test_a_guard_flag_without_an_expected_value_is_refused() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="p")
    proto.ops[0].is_guard = True
    proto.content_hash = _rehash(proto)
    with pytest.raises(WireError, match="is_guard") as info:
        plan_from_proto(proto)
    assert info.value.op_index == 0


def test_a_repeated_state_name_is_refused() -> None:
    proto = plan_to_proto(linear_plan(), plan_id="p")
    proto.state[1].name = proto.state[0].name
    proto.content_hash = _rehash(proto)
    with pytest.raises(WireError, match="twice"):
        plan_from_proto(proto)


def _rehash(proto: PlanProto) -> str:
    """The hash of a hand-modified proto (through an independent sha256)."""
    bare = PlanProto()
    bare.CopyFrom(proto)
    bare.ClearField("id")
    bare.ClearField("content_hash")
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()
