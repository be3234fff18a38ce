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
    adaptive_clip: bool = False,
) -> Any:
    """Trace the device's local training into a plan that returns its *update*.

    Takes ``(x, y, order, flat_weights)`` like :func:`~producer.fl.training.build_training_plan`
    and runs the same SGD steps, but returns ``(new - flat_weights, mean loss)``: the update
    to aggregate securely, and the loss (both stay on the device as private values).

    ``adaptive_clip``: DP-FedAvg with adaptive clipping under secure aggregation (Andrew et
    al. 2021, Alg. 1). The plan takes a fifth argument ``clip = [C, s]`` (public, chosen by
    the server each round) and returns the update L2-clipped to ``C`` with one more value,
    ``(b - 1/2) * s``, ``b = [||update|| <= C]``: the unclipped indicator, summed securely
    with the update so the server learns only the count
    (:class:`~producer.fl.secure_clip.SecureAdaptiveClip`).

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
    >>> clipped = build_update_plan(net, TrainingSpec(batch_size=2), 4, adaptive_clip=True)
    >>> out, _ = clipped(x, y, sample_order(4, 7), flatten(w), torch.tensor([1e-3, 2.0]))
    >>> round(float(out[:-1].norm()), 6), float(out[-1])    # clipped; b = 0: -s/2
    (0.001, -1.0)
    """
    from producer.plans.plan import Plan

    steps = spec.batches(n_examples)
    loss_fn = LOSSES[spec.loss]
    mu = spec.proximal_mu

    class FederatedUpdate(Plan):
        adaptive_clip: bool  # the runner checks it matches the job's privacy

        def __init__(self) -> None:
            clip = "_clip" if adaptive_clip else ""
            super().__init__(name=f"fl_update{clip}_n{n_examples}")
            self.adaptive_clip = adaptive_clip
            self.model = scratch_copy(model)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr)

        def forward(
            self, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, flat: torch.Tensor,
            *clip: torch.Tensor,
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
            update = new - flat
            if clip:
                update = clip_with_indicator(update, clip[0])
            return update, (total / len(steps)).reshape(1)

    plan = FederatedUpdate()
    x_ex = torch.zeros(n_examples, *(feature_shape or _feature_shape(model)))
    y_ex = torch.zeros(n_examples, dtype=torch.int64)
    example = [flatten(get_weights(model))] + ([torch.ones(2)] if adaptive_clip else [])
    plan.build(x_ex, y_ex, sample_order(n_examples, 0, spec.epochs), *example)
    return plan


def clip_with_indicator(update: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """``update`` L2-clipped to ``clip[0]`` followed by ``(b - 1/2) * clip[1]``,
    ``b = [||update|| <= clip[0]]`` (traced into the adaptive update plan).

    Examples
    --------
    >>> clip_with_indicator(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 4.0])).tolist()
    [0.6000000238418579, 0.800000011920929, -2.0]
    >>> clip_with_indicator(torch.tensor([0.3, 0.4]), torch.tensor([1.0, 4.0])).tolist()
    [0.30000001192092896, 0.4000000059604645, 2.0]
    """
    bound, scale = clip[0], clip[1]
    norm = update.pow(2).sum().sqrt()
    factor = (bound / norm).clamp(max=1.0)  # norm 0: inf, clamped to 1
    unclipped = (norm <= bound).to(torch.float32)
    indicator = ((unclipped - 0.5) * scale).reshape(1)
    return torch.cat([update * factor, indicator])


__all__ = ["build_update_plan", "clip_with_indicator"]
