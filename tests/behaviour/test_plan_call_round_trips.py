"""A plan call and ``get()`` of its small outputs in one round trip, on every transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import producer as fp
from schemas.wire import decode_command

DeviceFactory = Callable[..., fp.Device]


@fp.func2plan(args_shape=[(-1,)])
def double_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.abs(x + x)


def _record_commands(fleet: fp.Fleet) -> list[str]:
    """The body names of the commands the fleet publishes from now on."""
    bodies: list[str] = []
    publish = fleet.transport.publish

    def recorded(device_id: str, command: bytes, **kwargs: Any) -> None:
        bodies.append(decode_command(command).WhichOneof("body") or "")
        publish(device_id, command, **kwargs)

    fleet.transport.publish = recorded  # type: ignore[method-assign]
    return bodies


def test_a_plan_call_and_get_of_a_small_output_send_one_command(
    fleet: fp.Fleet, device: DeviceFactory
) -> None:
    bob = device("bob")
    pointer_plan = double_abs.send(bob)
    x = torch.tensor([1.0, -2.0, 3.5])
    x_ptr = fp.send(x, bob).wait()
    bodies = _record_commands(fleet)
    out = pointer_plan(x_ptr)
    assert torch.equal(out.get(), torch.abs(x + x))
    assert bodies == ["run_plan"]
    assert set(bob.objects()) == {x_ptr.id}
    with pytest.raises(fp.ObjectNotFound):
        out.get()


def test_an_in_place_op_after_the_call_is_seen_by_get(
    fleet: fp.Fleet, device: DeviceFactory
) -> None:
    bob = device("bob")
    pointer_plan = double_abs.send(bob)
    x = torch.tensor([1.0, -2.0])
    out = pointer_plan(fp.send(x, bob)).wait()
    out.sub_(5.0)
    assert torch.equal(out.get(), torch.abs(x + x).sub_(5.0))
    with pytest.raises(fp.ObjectNotFound):
        out.get()


def test_a_large_output_is_fetched_with_its_own_command(
    fleet: fp.Fleet, device: DeviceFactory
) -> None:
    bob = device("bob")
    pointer_plan = double_abs.send(bob)
    x = torch.randn(20_000)  # 80 000 bytes, above the 64 KiB limit
    x_ptr = fp.send(x, bob).wait()
    bodies = _record_commands(fleet)
    out = pointer_plan(x_ptr)
    assert torch.equal(out.get(), torch.abs(x + x))
    assert bodies == ["run_plan", "get_object"]
    with pytest.raises(fp.ObjectNotFound):
        out.get()


def test_repeated_calls_send_only_run_plan_and_leave_no_outputs_behind(
    fleet: fp.Fleet, device: DeviceFactory
) -> None:
    bob = device("bob")
    pointer_plan = double_abs.send(bob)
    x = torch.tensor([0.5, -1.5])
    x_ptr = fp.send(x, bob).wait()
    bodies = _record_commands(fleet)
    for _ in range(3):
        assert torch.equal(pointer_plan(x_ptr).get(), torch.abs(x + x))
    assert bodies == ["run_plan"] * 3  # each delete rides with the next command
    assert set(bob.objects()) == {x_ptr.id}
