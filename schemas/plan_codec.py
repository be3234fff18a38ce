"""Plans on the wire: ``PlanIR`` <-> ``PlanProto``, versioned and content-hashed.

The content hash is the sha256 (hex) of the deterministic serialization of the plan with
``id`` and ``content_hash`` cleared, so two plans with equal ops, state values and constants
hash equally whatever their ids. Decoding refuses unknown schema versions, a wrong hash,
and slot references outside ``num_slots`` (a receiving device sizes its slot table by it).

Examples
--------
>>> import torch
>>> from schemas.ir import Op, PlanIR, Ref
>>> ir = PlanIR(name="double_abs", inputs=(Ref(0),), ops=[
...     Op("Tensor.__add__", (Ref(0), Ref(0)), {}, Ref(1)),
...     Op("torch.abs", (Ref(1),), {}, Ref(2)),
... ], outputs=Ref(2), num_slots=3)
>>> proto = plan_to_proto(ir, plan_id="p1")
>>> decoded, plan_id = plan_from_proto(proto)
>>> plan_id, [op.target for op in decoded.ops], proto.content_hash == plan_content_hash(ir)
('p1', ['Tensor.__add__', 'torch.abs'], True)
"""

from __future__ import annotations

import dataclasses
import hashlib

from schemas.errors import SchemaVersionError, WireError
from schemas.ir import (
    LOOP_SCHEMA_VERSION,
    NO_EXPECT,
    SCHEMA_VERSION,
    DType,
    InputSpec,
    LoopOverBatches,
    NoExpect,
    Op,
    PlanIR,
    Ref,
    Value,
    refs_in,
)
from schemas.plan_pb2 import InputSpecProto, LoopProto, NamedTensor, OpProto, PlanProto
from schemas.tensor_codec import DTYPES, tensor_from_proto, tensor_to_proto
from schemas.value_codec import (
    value_dict_from_proto,
    value_dict_to_proto,
    value_from_proto,
    value_list_from_proto,
    value_list_to_proto,
    value_to_proto,
)

SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (SCHEMA_VERSION,)
"""Message schema versions this side can decode."""

PLAN_SCHEMA_VERSIONS: tuple[int, ...] = (SCHEMA_VERSION, LOOP_SCHEMA_VERSION)
"""Plan schema versions this side can decode: plans with a loop section are version 2."""

MAX_SLOTS = 1 << 24
"""Largest ``num_slots`` accepted from the wire (a device allocates a table of that size)."""


def plan_to_proto(ir: PlanIR, *, plan_id: str) -> PlanProto:
    """Encode a plan with its state values and constants, versioned and content-hashed.

    Examples
    --------
    >>> from schemas.ir import PlanIR, Ref
    >>> proto = plan_to_proto(PlanIR("id", (Ref(0),), [], Ref(0), 1), plan_id="p")
    >>> proto.schema_version, len(proto.content_hash)
    (1, 64)
    """
    proto = _encode(ir)
    proto.content_hash = _hash(proto)
    proto.id = plan_id
    return proto


def plan_from_proto(proto: PlanProto) -> tuple[PlanIR, str]:
    """Decode a plan and its id, after checking its schema version and content hash.

    Raises
    ------
    SchemaVersionError
        The plan was encoded by a fedplan speaking another schema version.
    WireError
        The content hash does not match, or the plan is malformed (slot references out of
        range, empty values, undecodable tensors).
    """
    check_schema_version(proto.schema_version, "plan", PLAN_SCHEMA_VERSIONS)
    if proto.HasField("loop") != (proto.schema_version == LOOP_SCHEMA_VERSION):
        raise WireError(
            f"plan {proto.id!r} has schema version {proto.schema_version} but "
            f"{'a' if proto.HasField('loop') else 'no'} loop section; encode it with "
            "plan_to_proto",
            plan_id=proto.id or None,
        )
    if not proto.content_hash:
        raise WireError(f"plan {proto.id!r} has no content hash; encode it with plan_to_proto")
    actual = _hash(proto)
    if actual != proto.content_hash:
        raise WireError(
            f"plan {proto.id!r} is corrupt or was altered: content hash {actual[:12]}... does "
            f"not match the announced {proto.content_hash[:12]}...; send it again",
            plan_id=proto.id or None,
        )
    for slots in (proto.num_slots, proto.loop.body.num_slots):
        if slots > MAX_SLOTS:
            raise WireError(f"plan {proto.id!r} asks for {slots} slots (max {MAX_SLOTS})")
    try:
        ir = _decode(proto)
        _check_slots(ir)
    except WireError as exc:
        raise WireError(
            exc.message, plan_id=proto.id or None, plan_name=proto.name, op_index=exc.op_index
        ) from None
    return ir, proto.id


def plan_content_hash(ir: PlanIR) -> str:
    """The content hash ``plan_to_proto`` would give this plan (sha256 hex)."""
    return _hash(_encode(ir))


def plan_op_count(proto: PlanProto) -> int:
    """Ops of an encoded plan, its loop body's included (size limits count both).

    Examples
    --------
    >>> plan_op_count(PlanProto(ops=[OpProto()], loop=LoopProto(body=PlanProto(ops=[OpProto()]))))
    2
    """
    return len(proto.ops) + len(proto.loop.body.ops)


def check_schema_version(
    version: int, what: str, supported_versions: tuple[int, ...] = SUPPORTED_SCHEMA_VERSIONS
) -> None:
    """Raise ``SchemaVersionError`` unless ``version`` is one this side speaks."""
    if version not in supported_versions:
        supported = ", ".join(str(v) for v in supported_versions)
        raise SchemaVersionError(
            f"{what} has schema version {version}, this side supports {supported}; "
            "run the same fedplan version on the server and the devices"
        )


def _hash(proto: PlanProto) -> str:
    """sha256 of the deterministic bytes with id and hash cleared (restored afterwards;
    cheaper than copying a plan whose state may be large)."""
    plan_id, content_hash = proto.id, proto.content_hash
    proto.ClearField("id")
    proto.ClearField("content_hash")
    try:
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    finally:
        proto.id, proto.content_hash = plan_id, content_hash


def _encode(ir: PlanIR) -> PlanProto:
    proto = PlanProto(
        schema_version=SCHEMA_VERSION if ir.loop is None else LOOP_SCHEMA_VERSION,
        name=ir.name,
        inputs=value_list_to_proto(ir.inputs),
        kwinputs=value_dict_to_proto(ir.kwinputs),
        input_specs=[_spec_to_proto(s) for s in ir.input_specs],
        ops=[_op_to_proto(op) for op in ir.ops],
        outputs=value_to_proto(ir.outputs),
        num_slots=ir.num_slots,
    )
    for name, slot in ir.state.items():
        entry = NamedTensor(name=name, slot=slot)
        if name in ir.state_values:
            entry.tensor.CopyFrom(tensor_to_proto(ir.state_values[name]))
        proto.state.append(entry)
    for slot, tensor in ir.constants.items():
        proto.constants.append(NamedTensor(slot=slot, tensor=tensor_to_proto(tensor)))
    if ir.loop is not None:
        proto.loop.CopyFrom(_loop_to_proto(ir.loop))
    return proto


def _loop_to_proto(loop: LoopOverBatches) -> LoopProto:
    if loop.body.loop is not None:
        raise WireError(f"the loop body {loop.body.name!r} has a loop of its own; not supported")
    return LoopProto(
        body=_encode(dataclasses.replace(loop.body, state_values={})),
        at=loop.at,
        data=[r.slot for r in loop.data],
        extras=[r.slot for r in loop.extras],
        epochs=loop.epochs.slot,
        batch_size=loop.batch_size.slot,
        seed=loop.seed.slot,
        out=loop.out.slot,
        drop_last=loop.drop_last,
    )


def _loop_from_proto(proto: LoopProto) -> LoopOverBatches:
    body = proto.body
    if body.HasField("loop"):
        raise WireError("the loop body has a loop of its own; a device runs one loop level")
    if body.schema_version != SCHEMA_VERSION or any(e.HasField("tensor") for e in body.state):
        raise WireError("the loop body must be a version-1 plan naming its state without values")
    if not proto.data:
        raise WireError("the loop names no dataset slots")
    return LoopOverBatches(
        body=_decode(body),
        at=proto.at,
        data=tuple(Ref(s) for s in proto.data),
        extras=tuple(Ref(s) for s in proto.extras),
        epochs=Ref(proto.epochs),
        batch_size=Ref(proto.batch_size),
        seed=Ref(proto.seed),
        out=Ref(proto.out),
        drop_last=proto.drop_last,
    )


def _decode(proto: PlanProto) -> PlanIR:
    state: dict[str, int] = {}
    state_values = {}
    for entry in proto.state:
        if entry.name in state:
            raise WireError(f"plan state {entry.name!r} appears twice")
        state[entry.name] = entry.slot
        if entry.HasField("tensor"):
            state_values[entry.name] = tensor_from_proto(entry.tensor)
    constants = {}
    for entry in proto.constants:
        if not entry.HasField("tensor"):
            raise WireError(f"plan constant in slot {entry.slot} has no tensor")
        constants[entry.slot] = tensor_from_proto(entry.tensor)
    if not proto.HasField("outputs"):
        raise WireError("plan has no outputs value")
    return PlanIR(
        name=proto.name,
        inputs=tuple(value_list_from_proto(proto.inputs)),
        kwinputs=value_dict_from_proto(proto.kwinputs),
        input_specs=[_spec_from_proto(s) for s in proto.input_specs],
        ops=[_op_from_proto(op, i) for i, op in enumerate(proto.ops)],
        outputs=value_from_proto(proto.outputs),
        num_slots=proto.num_slots,
        state=state,
        state_values=state_values,
        constants=constants,
        loop=_loop_from_proto(proto.loop) if proto.HasField("loop") else None,
    )


def _op_to_proto(op: Op) -> OpProto:
    proto = OpProto(
        target=op.target,
        args=[value_to_proto(a) for a in op.args],
        kwargs=value_dict_to_proto(op.kwargs),
        out=value_to_proto(op.out),
        is_guard=op.is_guard,
        source=op.source,
    )
    if not isinstance(op.expect, NoExpect):
        proto.expect.CopyFrom(value_to_proto(op.expect))
    return proto


def _op_from_proto(proto: OpProto, index: int) -> Op:
    if not proto.HasField("out"):
        raise WireError(f"plan op {index} ({proto.target}) has no out pattern", op_index=index)
    if proto.is_guard != proto.HasField("expect"):
        raise WireError(
            f"plan op {index} ({proto.target}) is_guard={proto.is_guard} disagrees with "
            "its expected value",
            op_index=index,
        )
    expect: Value | NoExpect = value_from_proto(proto.expect) if proto.is_guard else NO_EXPECT
    return Op(
        target=proto.target,
        args=tuple(value_from_proto(a) for a in proto.args),
        kwargs=value_dict_from_proto(proto.kwargs),
        out=value_from_proto(proto.out),
        expect=expect,
        source=proto.source,
    )


def _spec_to_proto(spec: InputSpec) -> InputSpecProto:
    return InputSpecProto(
        slot=spec.slot,
        path=spec.path,
        ndim=spec.ndim,
        dtype=spec.dtype.name if spec.dtype is not None else "",
        sizes=spec.sizes,
    )


def _spec_from_proto(proto: InputSpecProto) -> InputSpec:
    if proto.dtype and proto.dtype not in DTYPES:
        raise WireError(f"input {proto.path!r} names an unknown dtype {proto.dtype!r}")
    return InputSpec(
        slot=proto.slot,
        path=proto.path,
        ndim=proto.ndim,
        dtype=DType(proto.dtype) if proto.dtype else None,
        sizes=dict(sorted(proto.sizes.items())),
    )


def _check_slots(ir: PlanIR) -> None:
    """Every slot the plan names lies below ``num_slots``."""
    limit = ir.num_slots

    def check(slot: int, where: str, op_index: int | None = None) -> None:
        if slot >= limit:
            raise WireError(
                f"plan {ir.name!r}: {where} uses slot {slot} but the plan has {limit} slots",
                plan_name=ir.name,
                op_index=op_index,
            )

    for ref in refs_in((ir.inputs, ir.kwinputs, ir.outputs)):
        check(ref.slot, "inputs/outputs")
    for name, slot in ir.state.items():
        check(slot, f"state {name!r}")
    for slot in ir.constants:
        check(slot, "a constant")
    for spec in ir.input_specs:
        check(spec.slot, f"input spec {spec.path!r}")
    for index, op in enumerate(ir.ops):
        for ref in refs_in((op.args, op.kwargs, op.out)):
            check(ref.slot, f"op {index} ({op.target})", index)
    if ir.loop is not None:
        for ref in (*ir.loop.reads(), ir.loop.out):
            check(ref.slot, "the loop")
        _check_slots(ir.loop.body)
