"""Seed 003's MNIST-style loop over a FederatedDataLoader (sklearn digits), against eager."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn, optim
from torch.utils.data import Dataset, TensorDataset

import producer as fp

DeviceFactory = Callable[..., fp.Device]


def digits(n: int = 96) -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x[:n], dtype=torch.float32).reshape(n, 1, 8, 8) / 16.0
    return TensorDataset(images, torch.tensor(y[:n], dtype=torch.long))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.fc1 = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = x.view(-1, 4 * 3 * 3)
        return F.log_softmax(self.fc1(x), dim=1)


def test_the_seeds_federated_training_loop_runs_unchanged_and_matches_eager(
    device: DeviceFactory,
) -> None:
    fp.hook(torch)
    bob, alice = device("bob"), device("alice")
    dataset = digits()
    federated_train_loader = fp.FederatedDataLoader(
        dataset.federate((bob, alice)),  # type: ignore[attr-defined]
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(7),
    )
    torch.manual_seed(0)
    model = Net()
    eager = copy.deepcopy(model)
    optimizer = optim.SGD(model.parameters(), lr=0.5)
    eager_optimizer = optim.SGD(eager.parameters(), lr=0.5)
    cpu = torch.device("cpu")

    losses = []
    model.train()
    for data, target in federated_train_loader:
        model.send(data.location)  # type: ignore[operator]
        data, target = data.to(cpu), target.to(cpu)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        model.get()  # type: ignore[operator]
        losses.append(loss.get().item())

    eager_losses = []
    images, labels = dataset.tensors
    g = torch.Generator().manual_seed(7)
    for shard in (slice(0, 48), slice(48, 96)):
        order = torch.randperm(48, generator=g)
        for b in range(3):
            index = order[b * 16 : (b + 1) * 16]
            eager_optimizer.zero_grad()
            e_loss = F.nll_loss(eager(images[shard][index]), labels[shard][index])
            e_loss.backward()
            eager_optimizer.step()
            eager_losses.append(e_loss.item())

    assert len(federated_train_loader) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses))
    for remote, local in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(remote.detach(), local.detach())
    assert losses[-1] < losses[0]


def test_batches_come_from_the_device_holding_them_in_order_without_shuffle(
    device: DeviceFactory,
) -> None:
    bob, alice = device("bob"), device("alice")
    data = torch.arange(20.0).reshape(10, 2)
    targets = torch.arange(10)
    loader = fp.FederatedDataLoader(
        fp.federate(TensorDataset(data, targets), (bob, alice)), batch_size=4
    )
    got = [(d.location, d.get(), t.get()) for d, t in loader]
    assert [loc for loc, _, _ in got] == [bob, bob, alice, alice]
    assert torch.equal(torch.cat([d for _, d, _ in got]), data)
    assert torch.equal(torch.cat([t for _, _, t in got]), targets)
    assert len(bob.objects()) == len(alice.objects()) == 2  # the shards stay


class Pairs(Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset of (image, label) items, like torchvision's."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2, 2), float(i)), i % 3


def test_any_dataset_of_pairs_can_be_federated(device: DeviceFactory) -> None:
    bob, alice = device("bob"), device("alice")
    fed = fp.federate(Pairs(), (bob, alice))
    assert [(s.location, len(s)) for s in fed.shards] == [(bob, 3), (alice, 2)]
    assert len(fed) == 5
    assert torch.equal(fed[alice.id].targets.get(), torch.tensor([0, 1]))
    loader = fp.FederatedDataLoader(fed, batch_size=2, drop_last=True)
    assert len(loader) == 2
    [(first, _), (second, _)] = list(loader)  # bob's third item is dropped
    assert torch.equal(first.get()[:, 0, 0], torch.tensor([0.0, 1.0]))
    assert second.location is alice
    assert torch.equal(second.get()[:, 0, 0], torch.tensor([3.0, 4.0]))
    with pytest.raises(KeyError, match="no shard"):
        fed["carol"]


def test_pointer_pairs_already_on_devices_make_a_federated_dataset(
    device: DeviceFactory,
) -> None:
    bob, alice = device("bob"), device("alice")
    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([1, 0, 1])
    fed = fp.FederatedDataset(
        [(fp.send(x[:2], bob), fp.send(y[:2], bob)), (fp.send(x[2:], alice), fp.send(y[2:], alice))]
    )
    assert fed.workers == [bob.id, alice.id] and len(fed) == 3
    batches = [(d.get(), t.get()) for d, t in fp.FederatedDataLoader(fed, batch_size=8)]
    assert torch.equal(torch.cat([d for d, _ in batches]), x)
    assert torch.equal(torch.cat([t for _, t in batches]), y)
    with pytest.raises(fp.PlanInputError, match="move one of them"):
        fp.FederatedDataset([(fp.send(x, bob), fp.send(y, alice))])
