"""Tests of the device runtime: commands in as bytes, replies out, against eager torch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from consumer.policy.tenancy import scoped
from consumer.runtime.device import DeviceRuntime
from consumer.store.memory import MemoryStore
from schemas import command_pb2 as cmd
from schemas.ir import ObjectId, Op, PlanIR, Ref
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_from_proto, tensor_to_proto
from schemas.value_codec import value_from_proto, value_to_proto
from schemas.wire import decode_reply, encode_command, new_id


def _command(body: str, msg: Any, *, command_id: str | None = None) -> bytes:
    command = cmd.Command(command_id=command_id or new_id(), device_id="d1")
    getattr(command, body).CopyFrom(msg)
    return encode_command(command)


def _send(runtime: DeviceRuntime, body: str, msg: Any) -> cmd.Reply:
    return decode_reply(runtime.handle(_command(body, msg)))


def _ok(reply: cmd.Reply) -> cmd.Ok:
    assert reply.WhichOneof("outcome") == "ok", reply.error
    return reply.ok


def _store(runtime: DeviceRuntime, tensor: torch.Tensor, *tags: str) -> str:
    object_id = new_id()
    msg = cmd.StoreObject(id=object_id, tensor=tensor_to_proto(tensor), tags=list(tags))
    _ok(_send(runtime, "store_object", msg))
    return object_id


def _store_plan(runtime: DeviceRuntime, ir: PlanIR, plan_id: str = "p1") -> cmd.Reply:
    return _send(runtime, "store_plan", cmd.StorePlan(plan=plan_to_proto(ir, plan_id=plan_id)))


def _run_plan(runtime: DeviceRuntime, plan_id: str, *object_ids: str, n: int = 1) -> cmd.Reply:
    msg = _run_plan_msg(plan_id, *object_ids, n=n)
    return _send(runtime, "run_plan", msg)


def _run_plan_msg(plan_id: str, *object_ids: str, n: int = 1) -> cmd.RunPlan:
    return cmd.RunPlan(
        plan_id=plan_id,
        args=ValueList(items=[value_to_proto(ObjectId(i)) for i in object_ids]),
        result_ids=[new_id() for _ in range(n)],
        return_values=True,
    )


def _value(reply: cmd.Reply, index: int = 0) -> torch.Tensor:
    return tensor_from_proto(_ok(reply).objects[index].value)


def _runtime() -> DeviceRuntime:
    return DeviceRuntime(device_id="d1", store=MemoryStore())


DOUBLE_ABS = PlanIR(
    name="double_abs",
    inputs=(Ref(0),),
    ops=[
        Op("Tensor.__add__", (Ref(0), Ref(0)), {}, Ref(1)),
        Op("torch.abs", (Ref(1),), {}, Ref(2)),
    ],
    outputs=Ref(2),
    num_slots=3,
)


def _counter_plan() -> PlanIR:
    """y = x * w; w += 1 (in place, under the plan's state)."""
    return PlanIR(
        name="counter",
        inputs=(Ref(0),),
        state={"w": 1},
        state_values={"w": torch.tensor([1.0, 1.0])},
        ops=[
            Op("torch.mul", (Ref(0), Ref(1)), {}, Ref(2)),
            Op("Tensor.add_", (Ref(1), 1.0), {}, Ref(3)),
        ],
        outputs=Ref(2),
        num_slots=4,
    )


def test_undecodable_bytes_get_a_decode_failed_reply_not_an_exception() -> None:
    reply = decode_reply(_runtime().handle(b"\x01\x02 not protobuf"))
    assert reply.error.code == "DECODE_FAILED"
    assert reply.command_id == ""
    assert reply.device_id == "d1"


def test_a_stored_plan_runs_on_a_stored_object_like_eager_torch() -> None:
    runtime = _runtime()
    x = torch.tensor([-1.0, 2.0])
    object_id = _store(runtime, x, "input_data")
    _ok(_store_plan(runtime, DOUBLE_ABS))
    reply = _run_plan(runtime, "p1", object_id)
    assert torch.equal(_value(reply), torch.abs(x + x))
    result_id = reply.result_ids[0]
    assert torch.equal(
        runtime.store.get_object(scoped("local", result_id)).tensor, torch.abs(x + x)
    )


def test_plan_state_persists_between_runs_like_an_eager_loop() -> None:
    runtime = _runtime()
    x = torch.tensor([2.0, 3.0])
    object_id = _store(runtime, x)
    _ok(_store_plan(runtime, _counter_plan()))
    w = torch.tensor([1.0, 1.0])
    for _ in range(3):
        expected = x * w
        w.add_(1.0)
        assert torch.equal(_value(_run_plan(runtime, "p1", object_id)), expected)
    assert torch.equal(runtime.store.get_plan(scoped("local", "p1")).ir.state_values["w"], w)


def test_a_redelivered_command_returns_the_first_reply_without_running_again() -> None:
    runtime = _runtime()
    object_id = _store(runtime, torch.tensor([2.0, 3.0]))
    _ok(_store_plan(runtime, _counter_plan()))
    data = _command("run_plan", _run_plan_msg("p1", object_id))
    first = runtime.handle(data)
    again = runtime.handle(data)
    assert first == again
    assert torch.equal(
        runtime.store.get_plan(scoped("local", "p1")).ir.state_values["w"], torch.tensor([2.0, 2.0])
    )


def test_storing_a_plan_again_keeps_its_trained_state() -> None:
    runtime = _runtime()
    object_id = _store(runtime, torch.tensor([2.0, 3.0]))
    _ok(_store_plan(runtime, _counter_plan()))
    _ok(_run_plan(runtime, "p1", object_id))
    _ok(_store_plan(runtime, _counter_plan()))
    assert torch.equal(
        runtime.store.get_plan(scoped("local", "p1")).ir.state_values["w"], torch.tensor([2.0, 2.0])
    )


def test_a_plan_with_a_forbidden_op_is_refused_before_anything_runs() -> None:
    runtime = _runtime()
    bad = PlanIR(
        name="sneaky",
        inputs=(Ref(0),),
        ops=[Op("torch.abs", (Ref(0),), {}, Ref(1)), Op("torch.load", (Ref(1),), {}, Ref(2))],
        outputs=Ref(2),
        num_slots=3,
    )
    reply = _store_plan(runtime, bad, plan_id="bad")
    assert reply.error.code == "OP_NOT_ALLOWED"
    assert "torch.load" in reply.error.message
    assert not runtime.store.has_plan(scoped("local", "bad"))
    assert _run_plan(runtime, "bad", _store(runtime, torch.ones(1))).error.code == "NOT_FOUND"


def test_a_failing_op_reports_plan_and_op_index() -> None:
    runtime = _runtime()
    ir = PlanIR(
        name="bad_matmul",
        inputs=(Ref(0), Ref(1)),
        ops=[
            Op("torch.abs", (Ref(0),), {}, Ref(2)),
            Op("torch.matmul", (Ref(2), Ref(1)), {}, Ref(3)),
        ],
        outputs=Ref(3),
        num_slots=4,
    )
    _ok(_store_plan(runtime, ir, plan_id="mm"))
    a, b = _store(runtime, torch.ones(2, 3)), _store(runtime, torch.ones(2, 3))
    reply = _run_plan(runtime, "mm", a, b)
    assert reply.error.code == "EXECUTION_FAILED"
    assert (reply.error.plan_id, reply.error.plan_name) == ("mm", "bad_matmul")
    assert reply.error.has_op_index and reply.error.op_index == 1


def test_a_python_value_returned_by_a_plan_comes_back_as_a_value() -> None:
    runtime = _runtime()
    ir = PlanIR(
        name="total",
        inputs=(Ref(0),),
        ops=[Op("Tensor.sum", (Ref(0),), {}, Ref(1)), Op("Tensor.item", (Ref(1),), {}, Ref(2))],
        outputs=(Ref(1), Ref(2)),
        num_slots=3,
    )
    _ok(_store_plan(runtime, ir, plan_id="t"))
    x = torch.tensor([1.5, 2.0])
    reply = _run_plan(runtime, "t", _store(runtime, x), n=2)
    tensor_info, value_info = _ok(reply).objects
    assert tensor_info.kind == "tensor" and torch.equal(_value(reply), x.sum())
    assert value_info.kind == "value"
    assert value_from_proto(value_info.python_value) == x.sum().item()


def test_a_wrong_number_of_result_ids_is_refused() -> None:
    runtime = _runtime()
    _ok(_store_plan(runtime, DOUBLE_ABS))
    reply = _run_plan(runtime, "p1", _store(runtime, torch.ones(2)), n=2)
    assert reply.error.code == "BAD_INPUT"


def test_run_op_runs_one_allowed_op_on_stored_objects() -> None:
    runtime = _runtime()
    x, y = torch.tensor([1, 2, 3]), torch.tensor([5, 4, 3])
    msg = cmd.RunOp(
        target="torch.add",
        args=ValueList(
            items=[
                value_to_proto(ObjectId(_store(runtime, x))),
                value_to_proto(ObjectId(_store(runtime, y))),
            ]
        ),
        result_ids=["z"],
        return_values=True,
    )
    reply = _send(runtime, "run_op", msg)
    assert torch.equal(_value(reply), torch.add(x, y))
    assert torch.equal(runtime.store.get_object(scoped("local", "z")).tensor, x + y)


def test_run_op_refuses_ops_outside_the_allow_list() -> None:
    runtime = _runtime()
    msg = cmd.RunOp(
        target="os.system", args=ValueList(items=[value_to_proto("ls")]), result_ids=["z"]
    )
    assert _send(runtime, "run_op", msg).error.code == "OP_NOT_ALLOWED"


def test_get_object_with_delete_removes_it_and_a_second_get_is_not_found() -> None:
    runtime = _runtime()
    x = torch.arange(6.0).reshape(2, 3)
    object_id = _store(runtime, x)
    reply = _send(runtime, "get_object", cmd.GetObject(id=object_id, delete=True))
    assert torch.equal(_value(reply), x)
    again = _send(runtime, "get_object", cmd.GetObject(id=object_id, delete=True))
    assert again.error.code == "NOT_FOUND"


def test_search_list_and_clear_objects() -> None:
    runtime = _runtime()
    a = _store(runtime, torch.ones(1), "input_data", "train")
    _store(runtime, torch.ones(1), "input_data2")
    found = _ok(_send(runtime, "search", cmd.Search(tags=["input_data", "train"]))).objects
    assert [o.id for o in found] == [a]
    assert list(found[0].tags) == ["input_data", "train"]
    assert len(_ok(_send(runtime, "list_objects", cmd.ListObjects())).objects) == 2
    _ok(_send(runtime, "clear_objects", cmd.ClearObjects()))
    assert _ok(_send(runtime, "list_objects", cmd.ListObjects())).objects == []


def test_get_plan_returns_the_plan_with_its_current_state() -> None:
    runtime = _runtime()
    _ok(_store_plan(runtime, _counter_plan()))
    _ok(_run_plan(runtime, "p1", _store(runtime, torch.ones(2))))
    reply = _send(runtime, "get_plan", cmd.GetPlan(plan_id="p1"))
    ir, plan_id = plan_from_proto(_ok(reply).plan)
    assert plan_id == "p1"
    assert torch.equal(ir.state_values["w"], torch.tensor([2.0, 2.0]))


def test_move_object_forwards_it_to_the_destination_and_deletes_it_here() -> None:
    destination = _runtime()
    destination.device_id = "d2"
    forwarded: list[tuple[str, bytes]] = []
    source = DeviceRuntime(
        device_id="d1", store=MemoryStore(), forward=lambda d, b: forwarded.append((d, b))
    )
    x = torch.tensor([1, 2, 3, 4, 5])
    object_id = _store(source, x, "kept")
    _ok(_send(source, "move_object", cmd.MoveObject(id=object_id, destination_device="d2")))
    assert not source.store.has_object(scoped("local", object_id))
    [(device, data)] = forwarded
    assert device == "d2"
    _ok(decode_reply(destination.handle(data)))
    moved = destination.store.get_object(scoped("local", object_id))
    assert torch.equal(moved.tensor, x) and moved.tags == ("kept",)


def test_move_object_without_a_forwarder_is_an_error_and_keeps_the_object() -> None:
    runtime = _runtime()
    object_id = _store(runtime, torch.ones(1))
    reply = _send(runtime, "move_object", cmd.MoveObject(id=object_id, destination_device="d2"))
    assert reply.error.code == "TRANSPORT"
    assert runtime.store.has_object(scoped("local", object_id))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_large_values_come_back_exactly_through_framed_replies(dtype: torch.dtype) -> None:
    runtime = _runtime()
    x = (torch.arange(100_000) % 7).to(dtype)
    reply = _send(runtime, "get_object", cmd.GetObject(id=_store(runtime, x)))
    assert torch.equal(_value(reply), x)


def test_a_command_for_another_device_is_refused() -> None:
    runtime = _runtime()
    command = cmd.Command(command_id=new_id(), device_id="d2", list_objects=cmd.ListObjects())
    reply = decode_reply(runtime.handle(encode_command(command)))
    assert reply.error.code == "DEVICE_ERROR"
    assert "d2" in reply.error.message


def test_plan_keyword_arguments_are_resolved_from_the_store() -> None:
    runtime = _runtime()
    ir = PlanIR(
        name="kw",
        inputs=(Ref(0),),
        kwinputs={"scale": Ref(1)},
        ops=[Op("torch.mul", (Ref(0), Ref(1)), {}, Ref(2))],
        outputs=Ref(2),
        num_slots=3,
    )
    _ok(_store_plan(runtime, ir, plan_id="kw"))
    x, scale = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    msg = _run_plan_msg("kw", _store(runtime, x))
    msg.kwargs.keys.append("scale")
    msg.kwargs.values.append(value_to_proto(ObjectId(_store(runtime, scale))))
    assert torch.equal(_value(_send(runtime, "run_plan", msg)), x * scale)


def test_a_missing_argument_object_is_not_found_and_nothing_runs() -> None:
    runtime = _runtime()
    _ok(_store_plan(runtime, _counter_plan()))
    reply = _run_plan(runtime, "p1", "no-such-object")
    assert reply.error.code == "NOT_FOUND"
    assert torch.equal(
        runtime.store.get_plan(scoped("local", "p1")).ir.state_values["w"], torch.ones(2)
    )


def test_run_op_honours_no_grad_like_eager_torch() -> None:
    runtime = _runtime()
    w_id = _store(runtime, torch.tensor([1.0, 2.0], requires_grad=True))
    args = ValueList(items=[value_to_proto(ObjectId(w_id)), value_to_proto(1.0)])
    refused = _send(runtime, "run_op", cmd.RunOp(target="Tensor.add_", args=args, result_ids=["a"]))
    assert refused.error.code == "EXECUTION_FAILED"  # eager torch refuses it with grad on
    msg = cmd.RunOp(target="Tensor.add_", args=args, result_ids=["b"], no_grad=True)
    _ok(_send(runtime, "run_op", msg))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with torch.no_grad():
        w.add_(1.0)
    assert torch.equal(runtime.store.get_object(scoped("local", w_id)).tensor.detach(), w.detach())
    assert torch.is_grad_enabled()
