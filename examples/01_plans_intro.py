"""Seed 000 ported: introduction to plans on embedded devices (PySyft Part 8, Mar 2019)."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import producer as fp


def main(url: str | None = None) -> None:
    """Run the tutorial on embedded devices, or on Celery workers when given an amqp:// URL."""
    fleet = fp.connect(url)  # embedded devices, or Celery workers for an amqp:// URL

    # Devices with some tagged data.
    x11 = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    x12 = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    x21 = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    x22 = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    device_1 = fleet.device("device_1", data=(x11, x12))
    device_2 = fleet.device("device_2", data=(x21, x22))

    # Basic example: a function becomes a plan.
    @fp.func2plan
    def plan_double_abs(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        x = torch.abs(x)
        return x

    print(plan_double_abs)

    pointer_to_data = device_1.search("input_data")[0]
    print(pointer_to_data)

    # Calling the plan on a pointer builds it, sends it once and runs it remotely.
    start = time.perf_counter()
    pointer_to_result = plan_double_abs(pointer_to_data)
    print(pointer_to_result)
    print(f"first call (build + send + run): {1000 * (time.perf_counter() - start):.1f} ms")
    print(pointer_to_result.get())

    # A second call is one small command: the device already holds the plan.
    pointer_to_data = device_1.search("input_data2")[0]
    start = time.perf_counter()
    pointer_to_result = plan_double_abs(pointer_to_data)
    print(pointer_to_result.get())
    print(f"second call (run only): {1000 * (time.perf_counter() - start):.1f} ms")

    # Towards a concrete example: a network whose forward is a plan.
    class Net(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 3)
            self.fc2 = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.fc1(x))
            x = self.fc2(x)
            return F.log_softmax(x, dim=0)

    torch.manual_seed(0)
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    print(net)

    pointer_to_net = net.send(device_1)  # the weights travel with the plan
    print(pointer_to_net)
    pointer_to_data = device_1.search("input_data")[0]
    pointer_to_result = pointer_to_net(pointer_to_data)
    print(pointer_to_result)
    print(pointer_to_result.get())

    # Switch between workers: get the network back, send the same plan to another device.
    net = pointer_to_net.get()
    print(net)
    pointer_to_net_2 = net.send(device_2)
    pointer_to_data = device_2.search("input_data")[0]
    print(pointer_to_net_2(pointer_to_data).get())

    fleet.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
