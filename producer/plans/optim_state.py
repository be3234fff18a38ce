"""Momentum buffers of a module's own SGD optimizers, as named plan state."""

from __future__ import annotations

import torch
from torch import nn


def _covered(optimizer: torch.optim.SGD, names: dict[int, str]) -> bool:
    """Whether a plan can carry this optimizer's state exactly (zero-started buffers)."""
    groups = optimizer.param_groups
    return all(not g.get("dampening") and not g.get("maximize") for g in groups) and all(
        id(p) in names for g in groups for p in g["params"]
    )


def optimizer_state(
    module: nn.Module,
) -> tuple[dict[str, torch.Tensor], list[torch.optim.Optimizer]]:
    """The momentum buffers of SGD optimizers held as attributes of ``module``'s tree.

    A buffer not yet created is created as zeros, which gives bitwise the same first step
    as SGD's own ``clone(grad)`` when ``dampening == 0``. Names are
    ``<attribute path>.momentum_buffer.<parameter name>`` (``opt.momentum_buffer.fc1.weight``).
    Returns the named buffers and the optimizers they cover (those may step in a plan).

    Examples
    --------
    >>> net = nn.Linear(2, 1)
    >>> net.opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> sorted(optimizer_state(net)[0])
    ['opt.momentum_buffer.bias', 'opt.momentum_buffer.weight']
    """
    names = {id(p): n for n, p in module.named_parameters()}
    buffers: dict[str, torch.Tensor] = {}
    covered: list[torch.optim.Optimizer] = []
    for prefix, owner in module.named_modules():
        for attribute, value in vars(owner).items():
            if not isinstance(value, torch.optim.SGD) or not any(
                g.get("momentum") for g in value.param_groups
            ):
                continue
            if not _covered(value, names):
                continue  # left to the tracer, which refuses it with a remedy
            path = f"{prefix}.{attribute}" if prefix else attribute
            for group in value.param_groups:
                for p in group["params"]:
                    state = value.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p).detach()
                    buffers[f"{path}.momentum_buffer.{names[id(p)]}"] = state["momentum_buffer"]
            covered.append(value)
    return buffers, covered
