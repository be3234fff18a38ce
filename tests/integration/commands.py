"""Builders of encoded fedplan commands for integration tests."""

from __future__ import annotations

import torch

from schemas.command_pb2 import Command, GetObject, RunPlan, StoreObject, StorePlan
from schemas.ir import SCHEMA_VERSION, ObjectId, Op, PlanIR, Ref
from schemas.plan_codec import plan_to_proto
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_to_proto
from schemas.value_codec import value_to_proto
from schemas.wire import encode_command


def store_object(
    cid: str, device: str, object_id: str, tensor: torch.Tensor, tags: tuple[str, ...] = ()
) -> bytes:
    return encode_command(
        Command(
            schema_version=SCHEMA_VERSION,
            command_id=cid,
            device_id=device,
            store_object=StoreObject(id=object_id, tensor=tensor_to_proto(tensor), tags=list(tags)),
        )
    )


def get_object(cid: str, device: str, object_id: str) -> bytes:
    return encode_command(
        Command(
            schema_version=SCHEMA_VERSION,
            command_id=cid,
            device_id=device,
            get_object=GetObject(id=object_id),
        )
    )


def store_plan(cid: str, device: str, ir: PlanIR, plan_id: str) -> bytes:
    return encode_command(
        Command(
            schema_version=SCHEMA_VERSION,
            command_id=cid,
            device_id=device,
            store_plan=StorePlan(plan=plan_to_proto(ir, plan_id=plan_id)),
        )
    )


def run_plan(
    cid: str, device: str, plan_id: str, arg_ids: list[str], result_ids: list[str]
) -> bytes:
    args = ValueList(items=[value_to_proto(ObjectId(a)) for a in arg_ids])
    return encode_command(
        Command(
            schema_version=SCHEMA_VERSION,
            command_id=cid,
            device_id=device,
            run_plan=RunPlan(plan_id=plan_id, args=args, result_ids=result_ids, return_values=True),
        )
    )


def slow_plan(steps: int, w: torch.Tensor) -> PlanIR:
    """``x -> tanh(x @ w)`` repeated ``steps`` times with state ``w``: slow on big inputs."""
    ops: list[Op] = []
    cur = 0
    slot = 2
    for _ in range(steps):
        ops.append(Op("torch.matmul", (Ref(cur), Ref(1)), {}, Ref(slot)))
        ops.append(Op("torch.tanh", (Ref(slot),), {}, Ref(slot + 1)))
        cur, slot = slot + 1, slot + 2
    return PlanIR(
        name="slow",
        inputs=(Ref(0),),
        ops=ops,
        outputs=Ref(cur),
        num_slots=slot,
        state={"w": 1},
        state_values={"w": w},
    )


def slow_plan_eager(x: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        x = torch.tanh(x @ w)
    return x
