"""The seed tutorials' flows (PySyft Plans tutorials), checked against eager torch."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import producer as fp

DeviceFactory = Callable[..., fp.Device]


def _seed_data() -> tuple[torch.Tensor, torch.Tensor]:
    return fp.tag(torch.tensor([-1, 2.0]), "input_data"), fp.tag(
        torch.tensor([1, -2.0]), "input_data2"
    )


class Net(fp.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


class EagerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=0)


def _eager_twin(net: Net) -> EagerNet:
    eager = EagerNet()
    eager.load_state_dict({k: v.detach().clone() for k, v in net.state_dict().items()})
    return eager


def test_a_function_plan_runs_on_searched_device_data_like_eager(device: DeviceFactory) -> None:
    x11, x12 = _seed_data()
    device_1 = device("device_1", data=(x11, x12))

    @fp.func2plan
    def plan_double_abs(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        return torch.abs(x)

    pointer_to_data = device_1.search("input_data")[0]
    assert torch.equal(plan_double_abs(pointer_to_data).get(), torch.abs(x11 + x11))
    pointer_to_data = device_1.search("input_data2")[0]
    assert torch.equal(plan_double_abs(pointer_to_data).get(), torch.abs(x12 + x12))


def test_an_unbuilt_plan_cannot_be_sent_until_built(device: DeviceFactory) -> None:
    x11, x12 = _seed_data()
    device_1 = device("device_1", data=(x11, x12))

    @fp.func2plan()
    def plan_double_abs(x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x + x)

    assert not plan_double_abs.is_built
    with pytest.raises(
        RuntimeError, match=re.escape("A plan needs to be built before being sent to a worker.")
    ):
        plan_double_abs.send(device_1)
    plan_double_abs.build(torch.tensor([1.0, -2.0]))
    pointer_plan = plan_double_abs.send(device_1)
    assert repr(pointer_plan).startswith("[PointerPlan | me:")
    assert repr(pointer_plan).endswith(f"-> {device_1.id}:{plan_double_abs.id}]")
    result = pointer_plan(device_1.search("input_data")[0])
    assert torch.equal(result.get(), torch.abs(x11 + x11))


def test_a_class_plan_runs_remotely_like_the_eager_network(device: DeviceFactory) -> None:
    x11, x12 = _seed_data()
    device_1 = device("device_1", data=(x11, x12))
    torch.manual_seed(1)
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    eager = _eager_twin(net)
    pointer_to_net = net.send(device_1)
    result = pointer_to_net(device_1.search("input_data")[0]).get()
    torch.testing.assert_close(result, eager(x11))


def test_the_same_plan_switches_between_devices(device: DeviceFactory) -> None:
    x11, x12 = _seed_data()
    x21 = fp.tag(torch.tensor([3.0, -4.0]), "input_data")
    device_1 = device("device_1", data=(x11, x12))
    device_2 = device("device_2", data=(x21,))
    torch.manual_seed(2)
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    eager = _eager_twin(net)
    pointer_to_net_1 = net.send(device_1)
    out_1 = pointer_to_net_1(device_1.search("input_data")[0]).get()
    net = pointer_to_net_1.get()
    pointer_to_net_2 = net.send(device_2)
    out_2 = pointer_to_net_2(device_2.search("input_data")[0]).get()
    torch.testing.assert_close(out_1, eager(x11))
    torch.testing.assert_close(out_2, eager(x21))


def test_plans_built_from_args_shape_run_on_remote_data(device: DeviceFactory) -> None:
    bob = device("bob")

    @fp.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.abs(x + y)

    assert plan_sum_abs.is_built
    x, y = torch.tensor([[1.0, -5.0]]), torch.tensor([[2.0, 2.0], [-3.0, 1.0], [0.5, 0.5]])
    result = plan_sum_abs.send(bob)(fp.send(x, bob), fp.send(y, bob))
    assert torch.equal(result.get(), torch.abs(x + y))


def test_a_function_plan_with_state_uses_its_state_on_the_device(device: DeviceFactory) -> None:
    device_1 = device("device_1")

    @fp.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    pointer_plan = plan_abs.send(device_1)
    x = torch.tensor([-1, 0])
    result = pointer_plan(fp.send(x, device_1))
    assert torch.equal(result.get(), x.abs() + torch.tensor([1]))


def test_a_two_argument_plan_averages_remote_tensors(device: DeviceFactory) -> None:
    alice = device("alice")

    @fp.func2plan(args_shape=[(-1,), (-1,)])
    def calcu(x_ptr: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
        z_ptr = x_ptr + y_ptr
        return z_ptr / 2

    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5])
    pointer_result = calcu.send(alice)(fp.send(x, alice), fp.send(y, alice))
    assert torch.equal(pointer_result.get(), (x + y) / 2)
