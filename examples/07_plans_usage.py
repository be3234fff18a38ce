"""Seed 003 (Plans part) ported: a function plan on two remote tensors, and a class plan."""

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
    with fp.connect(url) as fleet:
        alice = fleet.device("alice")
        bob = fleet.device("bob")

        # Usage 1: create a plan, send it, invoke it on pointers.
        @fp.func2plan(args_shape=[(-1,), (-1,)])
        def calcu(x_ptr: torch.Tensor, y_ptr: torch.Tensor) -> torch.Tensor:
            z_ptr = x_ptr + y_ptr
            m_ptr = z_ptr / 2
            return m_ptr

        pointer_plan = calcu.send(alice)
        x_ptr = fp.send(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), alice)
        y_ptr = fp.send(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), alice)
        pointer_result = pointer_plan(x_ptr, y_ptr)
        print(pointer_result)
        print(pointer_result.get())

        # Usage 2: a class plan, built on an example, sent and executed.
        net = Net()
        net.build(torch.tensor([1.0, 2.0]))
        ptr_net = net.send(bob)
        input_data = fp.send(torch.tensor([1.0, 2.0]), bob)
        result_ptr = ptr_net(input_data)
        print(result_ptr.get())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
