"""Models for federated jobs on flat rows: an MLP, a small CNN and a GRU sequence model.

All three take rows as the datasets hold them (``(n, 64)`` for the 8x8 digits) and reshape
inside ``forward``, so one data layout serves every model and the traced training plan
takes the same arguments. The CNN sees a ``1 x side x side`` image; the GRU reads the image
row by row as a sequence of ``side`` steps of ``side`` features and classifies from its
last hidden state.

Examples
--------
>>> import torch
>>> [tuple(make_model(name, 64, 10)(torch.zeros(3, 64)).shape) for name in MODELS]
[(3, 10), (3, 10), (3, 10)]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``fc1 -> ReLU -> fc2`` (64-64-10 on digits, as the benchmark)."""

    def __init__(self, in_features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _side(in_features: int) -> int:
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ValueError(f"{in_features} features are not a square image; use the MLP")
    return side


class DigitsCNN(nn.Module):
    """``conv 3x3 (channels) -> ReLU -> max-pool 2 -> linear``, on square one-channel images."""

    def __init__(self, in_features: int, channels: int, classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.side = _side(in_features)
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.fc = nn.Linear(channels * (self.side // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.conv(x.view(-1, 1, self.side, self.side))), 2)
        return self.fc(h.flatten(1))


class DigitsGRU(nn.Module):
    """A one-layer GRU over the image's rows (``side`` steps), then a linear classifier."""

    def __init__(self, in_features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.side = _side(in_features)
        self.gru = nn.GRU(self.side, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.view(-1, self.side, self.side))
        return self.fc(out[:, -1])


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": DigitsCNN, "gru": DigitsGRU}
"""Model classes by name, as ``fedplan demo --model`` chooses them."""


def make_model(name: str, in_features: int, classes: int, *, hidden: int = 64) -> nn.Module:
    """The model called ``name`` (``mlp``, ``cnn``, ``gru``); ``hidden`` is its width.

    For the CNN ``hidden`` is the channel count, capped at 16 to stay small.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    width = min(hidden, 16) if name == "cnn" else hidden
    return MODELS[name](in_features, width, classes)
