"""Seed 001 ported: PySyft Part 8 "Introduction to Plans" (building, sending, state)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import producer as fp


class Net(fp.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


def main(url: str | None = None) -> None:
    """Run the tutorial on embedded devices, or on Celery workers when given an amqp:// URL."""
    fleet = fp.connect(url)
    x11 = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    x12 = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    x21 = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    x22 = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    device_1 = fleet.device("device_1", data=(x11, x12))
    device_2 = fleet.device("device_2", data=(x21, x22))

    # Basic example
    @fp.func2plan()
    def plan_double_abs(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        x = torch.abs(x)
        return x

    print(plan_double_abs)
    pointer_to_data = device_1.search("input_data")[0]
    print(pointer_to_data)
    print(plan_double_abs.is_built)

    # Sending a plan that is not built fails
    try:
        plan_double_abs.send(device_1)
    except RuntimeError as error:
        print(error)

    plan_double_abs.build(torch.tensor([1.0, -2.0]))
    print(plan_double_abs.is_built)
    pointer_plan = plan_double_abs.send(device_1)
    print(pointer_plan)

    # Running a plan remotely: one command, the result is a pointer
    pointer_to_result = pointer_plan(pointer_to_data)
    print(pointer_to_result)
    print(pointer_to_result.get())

    # Towards a concrete example: a class plan
    net = Net()
    print(net)
    net.build(torch.tensor([1.0, 2.0]))
    pointer_to_net = net.send(device_1)
    print(pointer_to_net)
    pointer_to_data = device_1.search("input_data")[0]
    pointer_to_result = pointer_to_net(pointer_to_data)
    print(pointer_to_result)
    print(pointer_to_result.get())

    # Switch between workers: the same built plan, sent to another device
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    pointer_to_net_1 = net.send(device_1)
    pointer_to_data = device_1.search("input_data")[0]
    print(pointer_to_net_1(pointer_to_data).get())
    pointer_to_net_2 = net.send(device_2)
    pointer_to_data = device_2.search("input_data")[0]
    print(pointer_to_net_2(pointer_to_data).get())

    # Plans built automatically from argument shapes
    @fp.func2plan(args_shape=[(-1, 1)])
    def plan_double_abs_auto(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        x = torch.abs(x)
        return x

    print(plan_double_abs_auto.is_built)

    @fp.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = x + y
        return torch.abs(s)

    print(plan_sum_abs.is_built)

    # State elements given to a function plan
    @fp.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    pointer_plan = plan_abs.send(device_1)
    x_ptr = fp.send(torch.tensor([-1, 0]), device_1)
    p = pointer_plan(x_ptr)
    print(p.get())

    fleet.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
