"""A plan call and ``get()`` of its small outputs in one round trip, and when it falls back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import producer as fp
from producer.remote.collector import ReplyCollector
from producer.remote.fleet import Fleet
from producer.transport.base import ReplyHandler
from producer.transport.local import LocalTransport
from schemas.ir import Op, PlanIR, Ref
from schemas.tensor_codec import FramedParts
from schemas.wire import decode_command
from tests.unit.test_pointers import HandPlan, double_abs


class CountingTransport(LocalTransport):
    """Embedded devices that record the body of every command published and count replies."""

    def __init__(self, on_reply: ReplyHandler) -> None:
        self.replies = 0

        def counted(data: bytes) -> None:
            self.replies += 1
            on_reply(data)

        super().__init__(counted)
        self.bodies: list[str] = []

    def publish(self, device_id: str, command: bytes | FramedParts, *, command_id: str) -> None:
        self.bodies.append(decode_command(bytes(command)).WhichOneof("body") or "")
        super().publish(device_id, command, command_id=command_id)

    def reset(self) -> None:
        self.bodies.clear()
        self.replies = 0


@pytest.fixture
def counted() -> Iterator[tuple[Fleet, CountingTransport]]:
    collector = ReplyCollector()
    transport = CountingTransport(collector.on_reply)
    with Fleet(transport=transport, collector=collector, timeout=30) as fleet:
        yield fleet, transport


def flatten_view() -> HandPlan:
    """Returns ``x.view(-1)``: an output sharing memory with the input."""
    ir = PlanIR(
        name="flatten_view",
        inputs=(Ref(0),),
        ops=[Op("Tensor.view", (Ref(0), -1), {}, Ref(1))],
        outputs=Ref(1),
        num_slots=2,
    )
    return HandPlan(ir, "flatten_view_plan")


def test_a_plan_call_and_get_of_a_small_output_cost_one_command_and_one_reply(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, transport = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([1.0, -3.0, 2.5])
    x_ptr = fp.send(x, bob).wait()
    transport.reset()
    value = pointer_plan(x_ptr).get()
    assert torch.equal(value, torch.abs(x + x))
    assert transport.bodies == ["run_plan"]
    assert transport.replies == 1


def test_repeated_calls_send_only_run_plan_and_leave_no_outputs_behind(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, transport = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([1.0, -3.0])
    x_ptr = fp.send(x, bob).wait()
    transport.reset()
    for _ in range(3):
        assert torch.equal(pointer_plan(x_ptr).get(), torch.abs(x + x))
    assert transport.bodies == ["run_plan"] * 3  # each delete rode with the next command
    assert transport.replies == 3
    assert set(bob.objects()) == {x_ptr.id}


def test_a_second_get_raises_and_listing_no_longer_shows_the_fetched_output(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, _ = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x_ptr = fp.send(torch.tensor([1.0, -2.0]), bob)
    out = pointer_plan(x_ptr)
    out.get()
    assert set(bob.objects()) == {x_ptr.id}
    with pytest.raises(fp.ObjectNotFound):
        out.get()


@pytest.mark.parametrize("wait_first", [True, False])
def test_an_in_place_op_after_the_call_makes_get_return_the_updated_value(
    counted: tuple[Fleet, CountingTransport], wait_first: bool
) -> None:
    fleet, transport = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([1.0, -3.0])
    out = pointer_plan(fp.send(x, bob))
    if wait_first:
        out.wait()  # the value has arrived with the reply before the op names the pointer
    kept = out.add_(10.0)  # kept: dropping it would queue a delete of its id
    transport.reset()
    assert torch.equal(out.get(), torch.abs(x + x).add_(10.0))
    assert transport.bodies == ["get_object"]
    with pytest.raises(fp.ObjectNotFound):
        out.get()
    del kept


def test_an_in_place_op_through_another_pointer_to_the_output_is_seen_by_get(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, _ = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([2.0, -1.0])
    out = pointer_plan(fp.send(x, bob)).wait()
    bob.objects()[out.id].mul_(3.0)
    assert torch.equal(out.get(), torch.abs(x + x) * 3.0)


def test_passing_the_output_to_another_plan_call_keeps_both_values_right(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, _ = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([0.5, -4.0])
    first = pointer_plan(fp.send(x, bob))
    second = pointer_plan(first)
    assert torch.equal(second.get(), torch.abs(torch.abs(x + x) * 2))
    assert torch.equal(first.get(), torch.abs(x + x))


def test_a_moved_output_is_fetched_from_its_new_device(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, _ = counted
    bob, alice = fleet.device("bob"), fleet.device("alice")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([1.5, -1.0])
    out = pointer_plan(fp.send(x, bob)).wait()
    out.move(alice)
    assert out.id in alice.objects() and out.id not in bob.objects()
    assert torch.equal(out.get(), torch.abs(x + x))
    assert out.id not in alice.objects()


def test_an_output_above_the_limit_is_fetched_with_its_own_command(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, transport = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(double_abs())
    x = torch.randn(20_000)  # 80 000 bytes > 64 KiB
    x_ptr = fp.send(x, bob).wait()
    transport.reset()
    out = pointer_plan(x_ptr)
    assert torch.equal(out.get(), torch.abs(x + x))
    assert transport.bodies == ["run_plan", "get_object"]
    assert transport.replies == 2
    with pytest.raises(fp.ObjectNotFound):
        out.get()


def test_a_limit_of_zero_turns_carrying_off(counted: tuple[Fleet, CountingTransport]) -> None:
    fleet, transport = counted
    bob = fleet.device("bob")
    bob.inline_limit = 0
    pointer_plan = bob.send_plan(double_abs())
    x = torch.tensor([3.0, -3.0])
    x_ptr = fp.send(x, bob).wait()
    transport.reset()
    assert torch.equal(pointer_plan(x_ptr).get(), torch.abs(x + x))
    assert transport.bodies == ["run_plan", "get_object"]


def test_an_output_sharing_memory_with_an_input_follows_later_changes_to_the_input(
    counted: tuple[Fleet, CountingTransport],
) -> None:
    fleet, _ = counted
    bob = fleet.device("bob")
    pointer_plan = bob.send_plan(flatten_view())
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_ptr = fp.send(x, bob)
    out = pointer_plan(x_ptr).wait()
    x_ptr.add_(1.0)  # changes the output's memory on the device without naming the output
    eager = x.view(-1)
    x.add_(1.0)
    assert torch.equal(out.get(), eager)
