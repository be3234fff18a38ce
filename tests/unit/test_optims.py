"""fp.Optims: one optimizer per device, same settings, separate state."""

from __future__ import annotations

import copy

import torch
from torch import nn, optim

import producer as fp


def test_each_device_gets_its_own_optimizer_with_the_templates_settings() -> None:
    model = nn.Linear(2, 1)
    optims = fp.Optims(["bob", "alice"], optim=optim.Adam(model.parameters(), lr=0.05))
    bob, alice = optims.get_optim("bob"), optims.get_optim("alice")
    assert bob is not alice and optims.get_optim("bob") is bob
    assert isinstance(bob, optim.Adam) and bob.param_groups[0]["lr"] == 0.05
    assert bob.param_groups[0]["params"] == list(model.parameters())
    assert optims.get_optim("carol") is not bob  # made on first use


def test_per_device_state_matches_two_separate_eager_optimizers() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    eager = copy.deepcopy(model)
    optims = fp.Optims(["bob", "alice"], optim=optim.Adam(model.parameters(), lr=0.1))
    eager_optims = {w: optim.Adam(eager.parameters(), lr=0.1) for w in ("bob", "alice")}
    x = {"bob": torch.randn(3, 2), "alice": torch.randn(3, 2) + 1}
    for _ in range(3):
        for worker in ("bob", "alice"):
            for m, o in ((model, optims.get_optim(worker)), (eager, eager_optims[worker])):
                o.zero_grad()
                m(x[worker]).pow(2).sum().backward()
                o.step()
    torch.testing.assert_close(model.weight.detach(), eager.weight.detach())
