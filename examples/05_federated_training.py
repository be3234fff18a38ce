"""Seed 003 (toy model) ported: train locally, on two devices, and average on a secure worker."""

from __future__ import annotations

import sys

import torch
from torch import nn, optim

import producer as fp

DATA = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
TARGET = torch.tensor([[0], [0], [1], [1.0]])


def train_locally(model: nn.Module) -> None:
    """Seed 1.2 "train on local machine"."""
    opt = optim.SGD(params=model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()  # 1) erase previous gradients
        pred = model(DATA)  # 2) make a prediction
        loss = ((pred - TARGET) ** 2).sum()  # 3) how much we missed
        loss.backward()  # 4) which weights caused it
        opt.step()  # 5) change those weights
        print(loss.data)  # 6) progress


def train_federated(model: nn.Module, bob: fp.Device, alice: fp.Device) -> None:
    """Seed 1.2 "train on remote machine": the model goes to the data, op by op."""
    data_bob, target_bob = DATA[0:2].send(bob), TARGET[0:2].send(bob)  # type: ignore[attr-defined]
    data_alice = DATA[2:].send(alice)  # type: ignore[attr-defined]
    target_alice = TARGET[2:].send(alice)  # type: ignore[attr-defined]
    datasets = [(data_bob, target_bob), (data_alice, target_alice)]
    optims = fp.Optims([bob, alice], optim=optim.Adam(params=model.parameters(), lr=0.1))
    for _ in range(10):
        for data, target in datasets:
            model.send(data.location)  # type: ignore[operator]  # NEW) send model to the data
            opt = optims.get_optim(data.location.id)
            opt.zero_grad()
            pred = model(data)
            loss = ((pred - target) ** 2).sum()
            loss.backward()
            opt.step()
            model.get()  # type: ignore[operator]  # NEW) get model (with gradients)
            print(loss.get())  # NEW) .get() the loss


def average_on_secure_worker(
    model: nn.Module, bob: fp.Device, alice: fp.Device, secure_worker: fp.Device
) -> None:
    """Seed 1.3 "train two models and average weights": the server sees only the average."""
    bobs_data, bobs_target = DATA[0:2].send(bob), TARGET[0:2].send(bob)  # type: ignore[attr-defined]
    alices_data = DATA[2:].send(alice)  # type: ignore[attr-defined]
    alices_target = TARGET[2:].send(alice)  # type: ignore[attr-defined]
    for _ in range(10):
        bobs_model = model.copy().send(bob)  # type: ignore[operator]
        alices_model = model.copy().send(alice)  # type: ignore[operator]
        bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=0.1)
        alices_opt = optim.SGD(params=alices_model.parameters(), lr=0.1)
        for _ in range(5):
            bobs_opt.zero_grad()  # train Bob's model
            bobs_loss = ((bobs_model(bobs_data) - bobs_target) ** 2).sum()
            bobs_loss.backward()
            bobs_opt.step()
            bobs_loss = bobs_loss.get().data

            alices_opt.zero_grad()  # train Alice's model
            alices_loss = ((alices_model(alices_data) - alices_target) ** 2).sum()
            alices_loss.backward()
            alices_opt.step()
            alices_loss = alices_loss.get().data

        alices_model.move(secure_worker)  # device to device, not through the server
        bobs_model.move(secure_worker)
        with torch.no_grad():
            model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
            model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())
        secure_worker.clear_objects()
        print("Bob:" + str(bobs_loss) + " Alice:" + str(alices_loss))


def main(url: str | None = None) -> None:
    """Run the three trainings on embedded devices, or on Celery workers given an amqp:// URL."""
    fp.hook(torch)  # Tensor.send, Module.send/get/move/copy, as in PySyft
    torch.manual_seed(0)
    train_locally(nn.Linear(2, 1))
    with fp.connect(url) as fleet:
        bob, alice = fleet.device("bob"), fleet.device("alice")
        secure_worker = fleet.device("secure_worker")
        for device in (bob, alice, secure_worker):
            device.clear_objects()
        model = nn.Linear(2, 1)
        train_federated(model, bob, alice)
        average_on_secure_worker(model, bob, alice, secure_worker)
        print("final predictions:", model(DATA).detach().flatten())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
