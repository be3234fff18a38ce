"""Seed 002 ported: plans reduce communication; one command per call once the plan is sent."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import producer as fp


class CountingFleet:
    """Counts the commands the fleet publishes, by kind (to show what a plan saves)."""

    def __init__(self, fleet: fp.Fleet) -> None:
        self.counts: dict[str, int] = {}
        submit = fleet.submit

        def counted(device_id: str, body: str, *args: object, **kwargs: object) -> object:
            self.counts[body] = self.counts.get(body, 0) + 1
            return submit(device_id, body, *args, **kwargs)  # type: ignore[arg-type]

        fleet.submit = counted  # type: ignore[method-assign]


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
    counter = CountingFleet(fleet)
    x11 = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    x12 = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    x21 = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    x22 = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    device_1 = fleet.device("device_1", data=(x11, x12))
    device_2 = fleet.device("device_2", data=(x21, x22))

    # 1. A plan function: build it, send it once, run it many times.
    @fp.func2plan()
    def plan_double_abs(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        x = torch.abs(x)
        return x

    print(plan_double_abs)
    print(plan_double_abs.code)
    pointer_to_data = device_1.search("input_data")[0]
    print(pointer_to_data)
    print(plan_double_abs.is_built)
    try:
        plan_double_abs.send(device_1)
    except RuntimeError as error:
        print(error)
    plan_double_abs.build(torch.tensor([1.0, -2.0]))
    print(plan_double_abs.is_built)
    print(plan_double_abs.code)
    pointer_plan = plan_double_abs.send(device_1)
    print(pointer_plan)
    before = dict(counter.counts)
    results = [pointer_plan(pointer_to_data) for _ in range(5)]
    print(results[0])
    print(results[-1].get())
    sent = {k: v - before.get(k, 0) for k, v in counter.counts.items() if v != before.get(k, 0)}
    print(f"5 calls of a {len(plan_double_abs.ir.ops)}-op plan sent: {sent}")

    # 2. A concrete example: a network plan.
    net = Net()
    print(net)
    net.build(torch.tensor([1.0, 2.0]))
    pointer_to_net = net.send(device_1)
    print(pointer_to_net)
    pointer_to_data = device_1.search("input_data")[0]
    pointer_to_result = pointer_to_net(pointer_to_data)
    print(pointer_to_result)
    print(pointer_to_result.get())

    # 3. Switching between workers.
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    pointer_to_net_1 = net.send(device_1)
    print(pointer_to_net_1(device_1.search("input_data")[0]).get())
    pointer_to_net_2 = net.send(device_2)
    print(pointer_to_net_2(device_2.search("input_data")[0]).get())

    # 4. Building plans automatically.
    @fp.func2plan(args_shape=[(-1, 1)])
    def plan_double_abs_auto(x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x + x)

    print(plan_double_abs_auto.is_built)

    @fp.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = x + y
        return torch.abs(s)

    print(plan_sum_abs.is_built)

    @fp.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    pointer_plan = plan_abs.send(device_1)
    x_ptr = fp.send(torch.tensor([-1, 0]), device_1)
    print(pointer_plan(x_ptr).get())
    fleet.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
