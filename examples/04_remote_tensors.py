"""Seed 003 (pointers part) ported: send/get, compute remotely, move, train on remote data."""

from __future__ import annotations

import sys

import torch
from torch import nn

import producer as fp


def main(url: str | None = None) -> None:
    """Run the tutorial on embedded devices, or on Celery workers when given an amqp:// URL."""
    fp.hook(torch)  # opt-in: Tensor.send(device) and Tensor.tag(...), as in PySyft
    with fp.connect(url) as fleet:
        bob = fleet.device("bob")
        alice = fleet.device("alice")

        # Send tensors to a remote worker and get them back.
        x_ptr = torch.tensor([1, 2, 3, 4, 5]).send(bob)  # type: ignore[attr-defined]
        y_ptr = torch.tensor([1, 1, 1, 1, 1]).send(bob)  # type: ignore[attr-defined]
        print(bob.objects())
        print(x_ptr.location is bob)
        print(x_ptr.get())
        print(bob.objects())
        y_ptr.delete()

        # Compute remotely, get the result.
        x_ptr = fp.send(torch.tensor([1, 2, 3, 4, 5]), bob)
        y_ptr = fp.send(torch.tensor([5, 4, 3, 2, 1]), bob)
        z_ptr = x_ptr + y_ptr
        print(z_ptr.get())
        bob.clear_objects()

        # Move data from one device to another directly.
        x = fp.send(torch.tensor([1, 2, 3, 4, 5]), bob)
        print("  bob:", list(bob.objects()))
        print("alice:", list(alice.objects()))
        print(x)
        x = x.move(alice)
        print("  bob:", list(bob.objects()))
        print("alice:", list(alice.objects()))
        print(x)
        alice.clear_objects()

        # Send a pointer to a remote machine: alice holds a pointer to bob's tensor.
        x_ptr = torch.tensor([1, 2, 3, 4]).send(bob)  # type: ignore[attr-defined]
        pointer_to_x_ptr = x_ptr.send(alice)
        print("  bob:", bob.objects())
        print("alice:", alice.objects())  # alice: a pointer -> bob's tensor
        print(pointer_to_x_ptr.get().get())  # the pointer to bob's tensor, then the tensor
        x_ptr = torch.tensor([6, 7]).send(bob)  # type: ignore[attr-defined]
        pointer_to_x_ptr = x_ptr.send(alice)
        pointer_to_x_ptr.remote_get()  # bob publishes the tensor to alice directly
        print("  bob:", list(bob.objects()))
        print("alice:", alice.objects())
        alice.clear_objects()

        # Train a toy model on remote data, op by op (each op is one command).
        data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
        target = torch.tensor([[0], [0], [1], [1.0]])
        model = nn.Linear(2, 1)
        w_ptr = fp.send(model.weight.detach().clone().requires_grad_(True), bob)
        b_ptr = fp.send(model.bias.detach().clone().requires_grad_(True), bob)
        data_ptr, target_ptr = fp.send(data, bob), fp.send(target, bob)
        for _ in range(10):
            pred = data_ptr.mm(w_ptr.t()) + b_ptr
            loss = ((pred - target_ptr) ** 2).sum()
            loss.backward()
            with torch.no_grad():
                w_ptr.sub_(w_ptr.grad * 0.1)
                b_ptr.sub_(b_ptr.grad * 0.1)
            w_ptr.grad.zero_()
            b_ptr.grad.zero_()
            print(loss.get().item())
        with torch.no_grad():
            model.weight.copy_(w_ptr.get())
            model.bias.copy_(b_ptr.get())
        print(model(data))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
