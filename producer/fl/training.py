"""The device training computation: spec, sample order, eager reference and the traced plan."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from producer.fl.aggregate import Weights

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "nll_loss": F.nll_loss,
    "mse_loss": F.mse_loss,
}
"""Native losses a training job may name (mean reduction)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSpec:
    """How a device trains each round: native loss, SGD settings, batches and epochs.

    ``momentum`` is SGD's (no dampening); its buffers live on the device for one round and
    start from zero every round, since FedAvg restarts every round from the global weights.
    Weight decay is not offered.
    """

    loss: str = "cross_entropy"
    lr: float = 0.1
    batch_size: int = 32
    epochs: int = 1
    proximal_mu: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; use one of {sorted(LOSSES)}")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.proximal_mu < 0:
            raise ValueError("lr must be > 0, batch_size and epochs >= 1, proximal_mu >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")

    def batches(self, n_examples: int) -> list[tuple[int, int]]:
        """``(start, stop)`` into the sample order for every local step, last short batch kept.

        Examples
        --------
        >>> TrainingSpec(batch_size=32).batches(70)
        [(0, 32), (32, 64), (64, 70)]
        """
        per_epoch = math.ceil(n_examples / self.batch_size)
        out = []
        for e in range(self.epochs):
            base = e * n_examples
            for b in range(per_epoch):
                start = b * self.batch_size
                out.append((base + start, base + min(start + self.batch_size, n_examples)))
        return out


def sample_order(n_examples: int, seed: int, epochs: int = 1) -> torch.Tensor:
    """The local sample order: ``epochs`` permutations drawn from ``Generator().manual_seed(seed)``.

    As the benchmark task fixes it: ``torch.randperm(n, generator=g)`` per epoch. (A
    ``DataLoader(shuffle=True, generator=g)`` does not draw this order on torch 2.13: its
    iterator first takes a base seed from ``g``.)

    Examples
    --------
    >>> g = torch.Generator().manual_seed(1005)
    >>> torch.equal(sample_order(10, 1005), torch.randperm(10, generator=g))
    True
    """
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n_examples, generator=g) for _ in range(epochs)])


def get_weights(model: nn.Module) -> Weights:
    """The model's parameters and buffers as detached clones, in ``state_dict`` order."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load ``weights`` into ``model`` in place (strict)."""
    model.load_state_dict(weights, strict=True)


def train_eager(
    model: nn.Module,
    spec: TrainingSpec,
    weights: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
) -> tuple[Weights, float]:
    """The reference local update in plain PyTorch: returns new weights and mean batch loss.

    ``model`` is used as scratch space (its weights are overwritten). This is the exact
    computation the device plan is traced from; tests compare the plan against it.
    """
    set_weights(model, weights)
    model.train()
    params = list(model.parameters())
    global_params = [weights[k].detach() for k, _ in model.named_parameters()]
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    loss_fn = LOSSES[spec.loss]
    total = 0.0
    steps = spec.batches(len(x))
    for start, stop in steps:
        idx = order[start:stop]
        loss = loss_fn(model(x[idx]), y[idx])
        if spec.proximal_mu:
            loss = loss + proximal_term(params, global_params, spec.proximal_mu)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return get_weights(model), total / len(steps)


def proximal_term(
    params: Sequence[torch.Tensor], global_params: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` over the parameters."""
    acc = torch.zeros(())
    for p, g in zip(params, global_params, strict=True):
        acc = acc + (p - g).pow(2).sum()
    return acc * (mu / 2)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    weights: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "cross_entropy",
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``weights`` on all of ``x, y`` in one batch (server side)."""
    set_weights(model, weights)
    model.eval()
    out = model(x)
    return float(LOSSES[loss](out, y)), float((out.argmax(dim=1) == y).float().mean())


def scratch_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to train or evaluate without touching the original."""
    return copy.deepcopy(model)


def flatten(weights: Weights) -> torch.Tensor:
    """All tensors of ``weights`` as one float32 vector, in order (one message leaf).

    Examples
    --------
    >>> flatten({"a": torch.ones(2, 2), "b": torch.zeros(1)}).tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in weights.values()])


def unflatten(flat: torch.Tensor, template: Weights) -> Weights:
    """Inverse of :func:`flatten` for weights shaped and typed like ``template``."""
    out: Weights = {}
    offset = 0
    for name, t in template.items():
        n = t.numel()
        out[name] = flat[offset : offset + n].reshape(t.shape).to(t.dtype).clone()
        offset += n
    if offset != flat.numel():
        raise ValueError(f"a flat vector of {flat.numel()} values does not fit {offset} weights")
    return out


def build_training_plan(
    model: nn.Module,
    spec: TrainingSpec,
    example_rows: int | None = None,
    *,
    feature_shape: tuple[int, ...] | None = None,
) -> Any:
    """Trace one local training step into a loop plan (``fp.LoopPlan``): one plan, any data.

    The plan is called as ``plan(x, y, flat_weights, epochs=E, batch_size=B, seed=S)``: the
    device's rows and labels (pointers to its tagged data), the global weights flattened
    with :func:`flatten`, and the round's loop settings. It loads the weights into its copy
    of ``model`` (and zeroes the momentum buffers: every round starts afresh, as
    :func:`train_eager` does), runs one SGD step (forward, native loss, FedProx term when
    ``spec.proximal_mu``, ``backward()``, ``torch.optim.SGD.step``) per batch of the
    device's own shuffled rows (:class:`~producer.plans.loop.LoopPlan`: the order of
    :func:`sample_order`, the last short batch kept), and returns one vector: the new
    weights, flattened, followed by the mean batch loss. The plan's size does not depend on
    the number of rows, epochs or batches; ``example_rows`` is only the size of the example
    traced at build. ``feature_shape`` is the shape of one row (default: the model's
    ``in_features``, or that of its first ``nn.Linear``); the CNN and GRU of
    :mod:`producer.fl.models` take flat rows and declare ``in_features``.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> plan = build_training_plan(net, TrainingSpec(batch_size=2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> w = get_weights(net)
    >>> out = plan(x, y, flatten(w), epochs=1, batch_size=2, seed=7)
    >>> ref, loss = train_eager(scratch_copy(net), TrainingSpec(batch_size=2), w, x, y,
    ...                         sample_order(5, 7))
    >>> torch.allclose(out[:-1], flatten(ref))
    True
    """
    from producer.plans.loop import LoopPlan

    loss_fn = LOSSES[spec.loss]
    mu = spec.proximal_mu

    class FederatedTraining(LoopPlan):
        def __init__(self) -> None:
            super().__init__(name="fl_train")
            self.spec = spec
            self.model = scratch_copy(model)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr, momentum=spec.momentum)

        def _live(self) -> tuple[dict[str, torch.Tensor], Weights]:
            return (
                dict(self.model.state_dict(keep_vars=True)),
                {k: t.detach() for k, t in self.model.state_dict().items()},
            )

        def setup(self, flat: torch.Tensor) -> None:
            state, template = self._live()
            given = unflatten(flat, template)
            with torch.no_grad():
                for name, t in state.items():
                    t.copy_(given[name])
                for group in self.opt.param_groups:
                    for p in group["params"]:
                        buffer = self.opt.state[p].get("momentum_buffer")
                        if buffer is not None:
                            buffer.zero_()

        def step(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(self.model(x), y)
            if mu:
                params = list(self.model.parameters())
                anchors = unflatten(flat, self._live()[1])
                loss = loss + proximal_term(
                    params, [anchors[k] for k, _ in self.model.named_parameters()], mu
                )
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return loss.detach()

        def finish(self, mean: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            self.opt.zero_grad()
            state = self._live()[0]
            new = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])
            return torch.cat([new, mean.reshape(1)])

    plan = FederatedTraining()
    rows = example_rows or 2 * spec.batch_size
    x_ex = torch.zeros(rows, *(feature_shape or _feature_shape(model)))
    y_ex = torch.zeros(rows, dtype=torch.int64)
    plan.build(x_ex, y_ex, flatten(get_weights(model)))
    return plan


def build_evaluation_plan(
    model: nn.Module,
    n_examples: int,
    *,
    loss: str = "cross_entropy",
    feature_shape: tuple[int, ...] | None = None,
) -> Any:
    """Trace the device's evaluation of global weights on its ``test`` rows into a plan.

    The plan takes ``(x, y, flat_weights)`` and returns ``[loss, accuracy]`` of the weights
    on all ``n_examples`` rows in one batch, without gradients: the computation of
    :func:`evaluate`, which tests compare it with. Built per example count.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> out = build_evaluation_plan(net, 5)(x, y, flatten(get_weights(net)))
    >>> ref = evaluate(scratch_copy(net), get_weights(net), x, y)
    >>> torch.allclose(out, torch.tensor(ref))
    True
    """
    from producer.plans.plan import Plan

    loss_fn = LOSSES[loss]

    class FederatedEvaluation(Plan):
        def __init__(self) -> None:
            super().__init__(name=f"fl_evaluate_n{n_examples}")
            self.model = scratch_copy(model).eval()

        def forward(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != n_examples:  # a guard, as in the training plan
                raise ValueError(f"this plan evaluates {n_examples} rows")
            state = dict(self.model.state_dict(keep_vars=True))
            given = unflatten(flat, {k: t.detach() for k, t in state.items()})
            with torch.no_grad():
                for name, t in state.items():
                    t.copy_(given[name])
                out = self.model(x)
                value = loss_fn(out, y)
                accuracy = (out.argmax(dim=1) == y).to(torch.float32).mean()
            return torch.stack([value, accuracy])

    plan = FederatedEvaluation()
    x_ex = torch.zeros(n_examples, *(feature_shape or _feature_shape(model)))
    plan.build(x_ex, torch.zeros(n_examples, dtype=torch.int64), flatten(get_weights(model)))
    return plan


def _feature_shape(model: nn.Module) -> tuple[int, ...]:
    """``(model.in_features,)`` when the model declares it (as ``nn.Linear`` and the models of
    :mod:`producer.fl.models` do), else the first ``nn.Linear``'s."""
    declared = model.in_features if hasattr(model, "in_features") else None
    if isinstance(declared, int):
        return (declared,)
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise ValueError(
        "the model's first layer is not nn.Linear; pass feature_shape (the shape of one row)"
    )
