"""The device's training for secure rounds: the traced plan that returns its *update*."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from producer.fl.training import (
    LOSSES,
    TrainingSpec,
    _feature_shape,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    unflatten,
)


def build_update_plan(
    model: nn.Module,
    spec: TrainingSpec,
    n_examples: int,
    *,
    feature_shape: tuple[int, ...] | None = None,
) -> Any:
    """Trace the device's local training into a plan that returns its *update*.

    Takes ``(x, y, order, flat_weights)`` like :func:`~producer.fl.training.build_training_plan`
    and runs the same SGD steps, but returns ``(new - flat_weights, mean loss)``: the update
    to aggregate securely, and the loss (both stay on the device as private values).

    Examples
    --------
    >>> from producer.fl.training import train_eager
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> plan = build_update_plan(net, TrainingSpec(batch_size=2), 4)
    >>> x, y, w = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), get_weights(net)
    >>> update, loss = plan(x, y, sample_order(4, 7), flatten(w))
    >>> ref, _ = train_eager(scratch_copy(net), TrainingSpec(batch_size=2), w, x, y,
    ...                      sample_order(4, 7))
    >>> torch.allclose(update, flatten(ref) - flatten(w))
    True
    """
    from producer.plans.plan import Plan

    steps = spec.batches(n_examples)
    loss_fn = LOSSES[spec.loss]
    mu = spec.proximal_mu

    class FederatedUpdate(Plan):
        def __init__(self) -> None:
            super().__init__(name=f"fl_update_n{n_examples}")
            self.model = scratch_copy(model)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr)

        def forward(
            self, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, flat: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if x.shape[0] != n_examples:  # a guard: this plan's batches are for n_examples
                raise ValueError(f"this plan trains on {n_examples} rows")
            state = dict(self.model.state_dict(keep_vars=True))
            given = unflatten(flat, {k: t.detach() for k, t in state.items()})
            with torch.no_grad():
                for name, t in state.items():
                    t.copy_(given[name])
            params = list(self.model.parameters())
            anchors = [given[k] for k, _ in self.model.named_parameters()]
            total = torch.zeros(())
            for start, stop in steps:
                idx = order[start:stop]
                loss = loss_fn(self.model(x[idx]), y[idx])
                if mu:
                    acc = torch.zeros(())
                    for p, g in zip(params, anchors, strict=True):
                        acc = acc + (p - g).pow(2).sum()
                    loss = loss + acc * (mu / 2)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                total = total + loss.detach()
            self.opt.zero_grad()
            new = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])
            return new - flat, (total / len(steps)).reshape(1)

    plan = FederatedUpdate()
    x_ex = torch.zeros(n_examples, *(feature_shape or _feature_shape(model)))
    y_ex = torch.zeros(n_examples, dtype=torch.int64)
    plan.build(x_ex, y_ex, sample_order(n_examples, 0, spec.epochs), flatten(get_weights(model)))
    return plan


__all__ = ["build_update_plan"]
