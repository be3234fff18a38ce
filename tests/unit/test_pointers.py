"""Tests of PointerTensor and PointerPlan semantics on embedded devices (hand-written plans)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import producer as fp
from producer.remote.collector import ReplyCollector
from producer.remote.fleet import Fleet
from producer.transport.base import ReplyHandler
from producer.transport.local import LocalTransport
from schemas.ir import Op, PlanIR, Ref
from schemas.tensor_codec import FramedParts


@dataclass
class HandPlan:
    """The part of producer.plans.plan.Plan that devices use, over a hand-written IR."""

    ir: PlanIR
    id: str
    is_built: bool = True

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def structure(self) -> PlanIR:
        return self.ir

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.ir.state_values = {k: v.detach().clone() for k, v in state.items()}

    def bind_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return tuple(args), dict(kwargs)  # no Python signature: the call as given


def double_abs() -> HandPlan:
    ir = PlanIR(
        name="double_abs",
        inputs=(Ref(0),),
        ops=[
            Op("Tensor.__add__", (Ref(0), Ref(0)), {}, Ref(1)),
            Op("torch.abs", (Ref(1),), {}, Ref(2)),
        ],
        outputs=Ref(2),
        num_slots=3,
    )
    return HandPlan(ir, "double_abs_plan")


def scale_and_count() -> HandPlan:
    """Returns (x * w, None, [x.sum()]) and then w += 1."""
    ir = PlanIR(
        name="scale_and_count",
        inputs=(Ref(0),),
        state={"w": 1},
        state_values={"w": torch.tensor([1.0, 2.0])},
        ops=[
            Op("torch.mul", (Ref(0), Ref(1)), {}, Ref(2)),
            Op("Tensor.sum", (Ref(0),), {}, Ref(3)),
            Op("Tensor.add_", (Ref(1), 1.0), {}, Ref(4)),
        ],
        outputs=(Ref(2), None, [Ref(3)]),
        num_slots=5,
    )
    return HandPlan(ir, "scale_plan")


class HoldingTransport(LocalTransport):
    """Embedded devices whose commands wait until ``release()``."""

    def __init__(self, on_reply: ReplyHandler) -> None:
        super().__init__(on_reply)
        self.gate = threading.Event()
        self.held: list[tuple[str, bytes, str]] = []

    def publish(self, device_id: str, command: bytes | FramedParts, *, command_id: str) -> None:
        if self.gate.is_set():
            super().publish(device_id, command, command_id=command_id)
        else:
            self.held.append((device_id, command, command_id))

    def release(self) -> None:
        self.gate.set()
        for device_id, command, command_id in self.held:
            super().publish(device_id, command, command_id=command_id)


@pytest.fixture
def fleet() -> Iterator[fp.Fleet]:
    with fp.connect(timeout=30) as f:
        yield f


def test_a_pointer_repr_shows_owner_location_tags_and_shape(fleet: fp.Fleet) -> None:
    device = fleet.device("device_1", data=(fp.tag(torch.tensor([-1, 2.0]), "input_data"),))
    pointer = device.search("input_data")[0]
    pattern = r"\[PointerTensor \| me:\w+ -> device_1:(\w+)\]\n\tTags: input_data\n\tShape: (.*)"
    match = re.fullmatch(pattern, repr(pointer))
    assert match is not None
    assert match.group(1) == pointer.id
    assert match.group(2) == str(torch.Size([2]))


def test_get_returns_the_value_and_a_second_get_raises_object_not_found(
    fleet: fp.Fleet,
) -> None:
    x_ptr = fp.send(torch.tensor([1, 2, 3, 4, 5]), fleet.device("bob"))
    assert torch.equal(x_ptr.get(), torch.tensor([1, 2, 3, 4, 5]))
    with pytest.raises(fp.ObjectNotFound):
        x_ptr.get()
    assert fleet.device("bob").objects() == {}


def test_a_sent_tensor_is_a_copy_independent_of_the_local_one(fleet: fp.Fleet) -> None:
    x = torch.tensor([1.0, 2.0])
    x_ptr = fp.send(x, fleet.device("bob"))
    x.add_(10)
    assert torch.equal(x_ptr.get(), torch.tensor([1.0, 2.0]))


def test_copy_makes_an_independent_remote_tensor(fleet: fp.Fleet) -> None:
    x_ptr = fp.send(torch.tensor([1.0, 2.0]), fleet.device("bob"))
    y_ptr = x_ptr.copy()
    x_ptr.add_(5.0)
    assert y_ptr.id != x_ptr.id
    assert torch.equal(y_ptr.get(), torch.tensor([1.0, 2.0]))
    assert torch.equal(x_ptr.get(), torch.tensor([6.0, 7.0]))


def test_result_pointers_exist_before_the_device_has_run_anything() -> None:
    collector = ReplyCollector()
    transport = HoldingTransport(collector.on_reply)
    with Fleet(transport=transport, collector=collector, timeout=30) as fleet:
        device = fleet.device("device_1")
        transport.release()
        pointer_plan = device.send_plan(double_abs())
        x_ptr = fp.send(torch.tensor([1.0, -2.0]), device).wait()
        transport.gate.clear()
        result = pointer_plan(x_ptr)
        assert isinstance(result, fp.PointerTensor)
        assert not result.ready
        assert len(transport.held) == 1
        transport.release()
        assert torch.equal(result.get(), torch.abs(torch.tensor([1.0, -2.0]) * 2))


def test_a_plan_is_transferred_once_per_device(fleet: fp.Fleet) -> None:
    device = fleet.device("device_1")
    plan = double_abs()
    device.send_plan(plan)
    before = fleet.collector.in_flight, len(device.objects())
    device.send_plan(plan)
    assert device.holds_plan(plan.id)
    assert repr(device.send_plan(plan)).startswith("[PointerPlan | me:")
    assert (fleet.collector.in_flight, len(device.objects())) == before


def test_an_unbuilt_plan_cannot_be_sent(fleet: fp.Fleet) -> None:
    plan = double_abs()
    plan.is_built = False
    with pytest.raises(RuntimeError, match="A plan needs to be built before being sent"):
        fleet.device("device_1").send_plan(plan)


def test_plan_outputs_keep_their_structure_and_state_advances_like_eager(
    fleet: fp.Fleet,
) -> None:
    device = fleet.device("device_1")
    plan = scale_and_count()
    pointer_plan = device.send_plan(plan)
    x = torch.tensor([3.0, 4.0])
    x_ptr = fp.send(x, device)
    w = torch.tensor([1.0, 2.0])
    for _ in range(2):
        scaled, nothing, [total] = pointer_plan(x_ptr)
        assert nothing is None
        assert torch.equal(scaled.get(), x * w)
        assert torch.equal(total.get(), x.sum())
        w = w + 1
    assert torch.equal(pointer_plan.get().ir.state_values["w"], w)


def test_a_plan_called_with_a_pointer_from_another_device_names_both(fleet: fp.Fleet) -> None:
    pointer_plan = fleet.device("device_1").send_plan(double_abs())
    elsewhere = fp.send(torch.ones(2), fleet.device("device_2"))
    with pytest.raises(fp.PlanInputError, match=r"device_2.*device_1"):
        pointer_plan(elsewhere)


def test_calls_to_several_devices_are_in_flight_together(fleet: fp.Fleet) -> None:
    plan = double_abs()
    inputs = {f"d{i}": torch.tensor([float(i), -1.0]) for i in range(4)}
    results = {}
    for name, x in inputs.items():
        device = fleet.device(name)
        results[name] = device.send_plan(plan)(fp.send(x, device))
    for name, result in results.items():
        assert torch.equal(result.get(), torch.abs(inputs[name] + inputs[name]))


def test_a_device_error_surfaces_as_the_typed_exception_on_get(fleet: fp.Fleet) -> None:
    device = fleet.device("device_1")
    pointer_plan = device.send_plan(double_abs())
    result = pointer_plan(fp.send(torch.ones(2), device), fp.send(torch.ones(2), device))
    with pytest.raises(fp.PlanInputError) as info:
        result.get()
    assert info.value.device_id == "device_1"
    assert info.value.plan_name == "double_abs"


def test_ops_on_pointers_run_on_their_device_like_eager_torch(fleet: fp.Fleet) -> None:
    bob = fleet.device("bob")
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 4.0, 3.0])
    x_ptr, y_ptr = fp.send(x, bob), fp.send(y, bob)
    assert torch.equal((x_ptr + y_ptr).get(), x + y)
    assert torch.equal(torch.mul(x_ptr, y_ptr).get(), torch.mul(x, y))
    assert torch.equal((-x_ptr * 2).abs().sum().get(), (-x * 2).abs().sum())
    assert torch.equal(x_ptr[1:].get(), x[1:])


def test_remote_autograd_fills_grad_on_the_device(fleet: fp.Fleet) -> None:
    bob = fleet.device("bob")
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    data = torch.tensor([3.0, 4.0])
    w_ptr, data_ptr = fp.send(w, bob), fp.send(data, bob)
    loss_ptr = ((w_ptr * data_ptr) ** 2).sum()
    assert loss_ptr.backward() is None
    ((w * data) ** 2).sum().backward()
    assert torch.equal(w_ptr.grad.get(), w.grad)


def test_ops_mixing_pointers_on_two_devices_name_both(fleet: fp.Fleet) -> None:
    a = fp.send(torch.ones(2), fleet.device("bob"))
    b = fp.send(torch.ones(2), fleet.device("alice"))
    with pytest.raises(fp.PlanInputError, match=r"bob.*alice"):
        _ = a + b


def test_ops_outside_the_allow_list_are_refused_locally(fleet: fp.Fleet) -> None:
    a = fp.send(torch.ones(2), fleet.device("bob"))
    with pytest.raises(AttributeError, match="allow-list"):
        a.numpy()


def test_move_hands_the_object_to_another_device_under_the_same_id(fleet: fp.Fleet) -> None:
    bob, alice = fleet.device("bob"), fleet.device("alice")
    x_ptr = fp.send(fp.tag(torch.tensor([1, 2, 3, 4, 5]), "moved"), bob)
    object_id = x_ptr.id
    assert x_ptr.move(alice) is x_ptr
    assert x_ptr.location is alice and x_ptr.id == object_id
    assert bob.objects() == {}
    assert list(alice.objects()) == [object_id]
    assert alice.search("moved")[0].id == object_id
    assert torch.equal(x_ptr.get(), torch.tensor([1, 2, 3, 4, 5]))


def test_hook_adds_tag_and_send_to_tensors(fleet: fp.Fleet) -> None:
    fp.hook(torch)
    fp.hook(torch)  # idempotent
    x = torch.tensor([1.0, 2.0]).tag("hooked")  # type: ignore[attr-defined]
    pointer = x.send(fleet.device("bob"))  # type: ignore[attr-defined]
    assert pointer.tags == ("hooked",)
    assert torch.equal(fleet.device("bob").search("hooked")[0].get(), x)


def test_results_sent_with_the_reply_need_no_second_round_trip(fleet: fp.Fleet) -> None:
    device = fleet.device("device_1")
    pointer_plan = device.send_plan(double_abs())
    x = torch.tensor([1.0, -3.0])
    result = pointer_plan.run(fp.send(x, device), return_values=True).wait()
    calls: list[str] = []
    original = fleet.submit
    fleet.submit = lambda device_id, body, *a, **k: (
        calls.append(body)
        or original(  # type: ignore[method-assign]
            device_id, body, *a, **k
        )
    )
    assert torch.equal(result.get(), torch.abs(x + x))
    assert calls == []  # the remote copy is deleted with the next command
    with pytest.raises(fp.ObjectNotFound):
        result.get()


def test_dropped_result_pointers_are_deleted_from_the_device_but_sent_data_stays(
    fleet: fp.Fleet,
) -> None:
    bob = fleet.device("bob")
    x_ptr = fp.send(torch.tensor([1.0, -2.0]), bob)
    kept = (-x_ptr * 2).abs()
    total = kept.sum()
    del total
    assert set(bob.objects()) == {x_ptr.id, kept.id}
    found = bob.search()
    del found
    assert set(bob.objects()) == {x_ptr.id, kept.id}


def test_a_failing_in_place_op_raises_at_the_call_and_no_grad_is_mirrored(
    fleet: fp.Fleet,
) -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    w_ptr = fp.send(w, fleet.device("bob"))
    with pytest.raises(fp.PlanExecutionError, match="add_"):
        w_ptr.add_(1.0)  # eager torch refuses this too, outside no_grad
    with torch.no_grad():
        w_ptr.add_(1.0)
        w.add_(1.0)
    assert torch.equal(w_ptr.get().detach(), w.detach())
