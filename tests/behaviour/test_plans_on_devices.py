"""Plans on devices: training state, several devices in flight, and typed error replies."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import producer as fp

DeviceFactory = Callable[..., fp.Device]


class Trainer(fp.Plan):
    """One SGD step of linear regression; returns the loss before the step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ((self.fc(x) - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for p in self.fc.parameters():
                p -= 0.1 * p.grad
        return loss


def _eager_steps(fc: nn.Linear, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = ((fc(x) - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for p in fc.parameters():
                p -= 0.1 * p.grad  # type: ignore[operator]
                p.grad = None
        losses.append(loss.item())
    return losses


def test_a_training_plan_trains_on_the_device_like_eager_steps(device: DeviceFactory) -> None:
    torch.manual_seed(4)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    trainer = Trainer()
    with pytest.warns(UserWarning):
        trainer.build(x, y)
    eager = copy.deepcopy(trainer.fc)
    bob = device("bob", data=(fp.tag(x, "x"), fp.tag(y, "y")))
    pointer_plan = trainer.send(bob)
    x_ptr, y_ptr = bob.search("x")[0], bob.search("y")[0]
    losses = [pointer_plan(x_ptr, y_ptr).get().item() for _ in range(3)]
    assert losses == pytest.approx(_eager_steps(eager, x, y, 3), rel=1e-5)
    trained = pointer_plan.get()
    torch.testing.assert_close(trained.fc.weight.detach(), eager.weight.detach())
    torch.testing.assert_close(trained.fc.bias.detach(), eager.bias.detach())


def test_each_device_trains_its_own_copy_of_the_plan_state(device: DeviceFactory) -> None:
    torch.manual_seed(5)
    data = {name: (torch.randn(8, 2), torch.randn(8, 1)) for name in ("bob", "alice")}
    trainer = Trainer()
    with pytest.warns(UserWarning):
        trainer.build(*data["bob"])
    start = copy.deepcopy(trainer.fc)
    pointers = {}
    for name, (x, y) in data.items():
        handle = device(name)
        pointers[name] = (trainer.send(handle), fp.send(x, handle), fp.send(y, handle))
    in_flight = {
        name: [p(x_ptr, y_ptr) for _ in range(2)] for name, (p, x_ptr, y_ptr) in pointers.items()
    }
    for name, (x, y) in data.items():
        expected = _eager_steps(copy.deepcopy(start), x, y, 2)
        assert [r.get().item() for r in in_flight[name]] == pytest.approx(expected, rel=1e-5)


def test_a_broken_guard_on_the_device_raises_plan_guard_error(device: DeviceFactory) -> None:
    bob = device("bob")

    @fp.func2plan(args_shape=[(2,)])
    def positive_part(x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x

    pointer_plan = positive_part.send(bob)
    result = pointer_plan(fp.send(torch.tensor([-3.0, 1.0]), bob))
    with pytest.raises(fp.PlanGuardError) as info:
        result.get()
    assert info.value.device_id == bob.id
    assert info.value.plan_name == "positive_part"
    ok = pointer_plan(fp.send(torch.tensor([3.0, 1.0]), bob))
    assert torch.equal(ok.get(), torch.tensor([6.0, 2.0]))


def test_wrong_arguments_raise_typed_errors_from_the_device(device: DeviceFactory) -> None:
    bob = device("bob")

    @fp.func2plan(args_shape=[(-1, 2)])
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    pointer_plan = double.send(bob)
    with pytest.raises(fp.PlanShapeError):
        pointer_plan(fp.send(torch.ones(2, 2, 2), bob)).get()
    with pytest.raises(fp.PlanInputError):
        pointer_plan(fp.send(torch.ones(3, 2), bob), fp.send(torch.ones(3, 2), bob)).get()
    assert torch.equal(pointer_plan(fp.send(torch.ones(3, 2), bob)).get(), torch.ones(3, 2) * 2)


def test_a_failed_remote_op_reports_its_own_error_when_its_result_is_used(
    device: DeviceFactory,
) -> None:
    bob = device("bob")
    a, b = fp.send(torch.ones(2, 3), bob), fp.send(torch.ones(2, 3), bob)
    product = torch.matmul(a, b)
    with pytest.raises(fp.PlanExecutionError, match="matmul"):
        product.wait()
    with pytest.raises(fp.PlanExecutionError, match="matmul"):
        _ = product + 1


def test_a_rebuilt_plan_is_sent_again_and_the_device_runs_the_new_build(
    device: DeviceFactory,
) -> None:
    bob = device("bob")
    scale = torch.tensor([2.0])

    @fp.func2plan(args_shape=[(3,)], state=(scale,))
    def scaled(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (s,) = state.read()
        return x * s if x.dim() == 1 else x

    x = torch.tensor([1.0, 2.0, 3.0])
    x_ptr = fp.send(x, bob)
    assert torch.equal(scaled.send(bob)(x_ptr).get(), x * 2)
    scaled.build(torch.ones(2, 3))  # rebuilt: the branch taken is now the other one
    y = torch.ones(4, 3)
    assert torch.equal(scaled.send(bob)(fp.send(y, bob)).get(), y)


def test_force_pushes_locally_changed_state_and_otherwise_the_device_keeps_its_own(
    device: DeviceFactory,
) -> None:
    bob = device("bob")

    @fp.func2plan(args_shape=[(2,)], state=(torch.tensor([1.0, 1.0]),))
    def shifted(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (bias,) = state.read()
        return x + bias

    x = torch.tensor([1.0, 2.0])
    shifted.send(bob)
    shifted.load_state({"state.0": torch.tensor([10.0, 10.0])})
    assert torch.equal(shifted.send(bob)(fp.send(x, bob)).get(), x + 1)
    assert torch.equal(bob.send_plan(shifted, force=True)(fp.send(x, bob)).get(), x + 10)


def test_a_pointer_plan_binds_keyword_arguments_and_defaults_like_its_function(
    device: DeviceFactory,
) -> None:
    def blend(x: torch.Tensor, y: torch.Tensor, weight: float = 0.25) -> torch.Tensor:
        return x * (1 - weight) + y * weight

    plan = fp.func2plan(args_shape=[(-1,), (-1,)])(blend)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-4.0, 0.5, 8.0])
    carol = device("carol", data=(fp.tag(x, "x"), fp.tag(y, "y")))
    x_ptr, y_ptr = carol.search("x")[0], carol.search("y")[0]
    pointer_plan = plan.send(carol)
    torch.testing.assert_close(pointer_plan(y=y_ptr, x=x_ptr).get(), blend(x, y))
    torch.testing.assert_close(pointer_plan(x_ptr, y_ptr, weight=0.25).get(), blend(x, y))
    with pytest.raises(fp.PlanInputError, match="missing a required argument: 'y'"):
        pointer_plan(x_ptr, z=y_ptr)
    assert torch.equal(carol.search("y")[0].get(), y)  # the refused call changed nothing
