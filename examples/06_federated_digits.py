"""Seed 003 MNIST demo ported (sklearn digits): a FederatedDataLoader feeds a remote model."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

import producer as fp


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.fc1 = nn.Linear(8 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = x.view(-1, 8 * 3 * 3)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def digits(train: bool) -> TensorDataset:
    """sklearn's 8x8 digits, normalised like the seed's MNIST transform; 80% for training."""
    x, y = load_digits(return_X_y=True)
    images = (torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 - 0.3) / 0.35
    labels = torch.tensor(y, dtype=torch.long)
    cut = int(0.8 * len(labels))
    part = slice(0, cut) if train else slice(cut, None)
    return TensorDataset(images[part], labels[part])


def train(
    args: argparse.Namespace,
    model: nn.Module,
    device: torch.device,
    federated_train_loader: fp.FederatedDataLoader,
    optimizer: optim.Optimizer,
    epoch: int,
) -> None:
    model.train()
    for batch_idx, (data, target) in enumerate(federated_train_loader):  # a distributed dataset
        model.send(data.location)  # type: ignore[operator]  # NEW: send the model to the data
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        model.get()  # type: ignore[operator]  # NEW: get the model back
        if batch_idx % args.log_interval == 0:
            loss = loss.get()  # NEW: get the loss back
            done = 100.0 * batch_idx / len(federated_train_loader)
            print(
                f"Train Epoch: {epoch} [{batch_idx * args.batch_size}/"
                f"{len(federated_train_loader) * args.batch_size} ({done:.0f}%)]"
                f"\tLoss: {loss.item():.6f}"
            )


def test(model: nn.Module, device: torch.device, test_loader: DataLoader) -> float:
    """Unchanged from the seed: the test data is local."""
    model.eval()
    test_loss = 0.0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    n = len(test_loader.dataset)  # type: ignore[arg-type]
    test_loss /= n
    print(
        f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{n} "
        f"({100.0 * correct / n:.0f}%)\n"
    )
    return correct / n


def main(url: str | None = None, epochs: int = 1) -> None:
    """Train on embedded devices, or on Celery workers when given an amqp:// URL."""
    fp.hook(torch)
    args = argparse.Namespace(batch_size=32, lr=0.3, log_interval=10, epochs=epochs)
    torch.manual_seed(1)
    device = torch.device("cpu")
    with fp.connect(url) as fleet:
        bob, alice = fleet.device("bob"), fleet.device("alice")
        for worker in (bob, alice):
            worker.clear_objects()
        federated_train_loader = fp.FederatedDataLoader(  # <-- a FederatedDataLoader
            digits(train=True).federate((bob, alice)),  # type: ignore[attr-defined]
            batch_size=args.batch_size,
            shuffle=True,
        )
        test_loader = DataLoader(digits(train=False), batch_size=256, shuffle=True)
        model = Net().to(device)
        optimizer = optim.SGD(model.parameters(), lr=args.lr)
        for epoch in range(1, args.epochs + 1):
            train(args, model, device, federated_train_loader, optimizer, epoch)
            test(model, device, test_loader)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
