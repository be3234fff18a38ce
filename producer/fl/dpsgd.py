"""Example-level DP-SGD (Abadi et al. 2016) traced into a device plan, for Linear models.

Each local step samples the device's rows with Poisson rate ``q`` (drawn on the device),
computes every sampled row's own gradient, clips it to L2 norm ``C``, sums the clipped
gradients, adds Gaussian noise ``N(0, (sigma * C)^2)`` drawn on the device, divides by the
expected batch size ``q * n`` and takes an SGD step. The per-example gradients come from
the Opacus recipe, traced as ordinary allow-listed ops: one backward pass of the summed
loss to the outputs of every ``nn.Linear`` (``torch.autograd.grad``) gives each row's
backprop ``g_i``; the row's weight gradient is ``g_i a_i^T`` (``torch.einsum``) with the
layer's input ``a_i``, its bias gradient ``g_i``. That is exact for any model whose
parameters all belong to ``nn.Linear`` layers each called once per forward (MLPs with any
activation); other layers are refused at build. ``torch.func.vmap`` is not traceable
(``docs/dp_sgd.md`` says why and what the tracer would need).

The plan returns only the new weights: the loss and the sampled batch sizes depend on the
data without noise and would void the guarantee. :func:`dpsgd_epsilon` accounts the
steps with Google's ``dp-accounting`` (Poisson-sampled Gaussian, RDP).

Examples
--------
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.1, sampling_rate=0.5, steps=2)
>>> plan = build_dpsgd_plan(net, spec, 6)
>>> x, y = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
>>> w = flatten(get_weights(net))
>>> torch.manual_seed(1) and None
>>> out = plan(x, y, w)
>>> torch.manual_seed(1) and None
>>> ref = train_dpsgd_eager(scratch_copy(net), spec, get_weights(net), x, y)
>>> torch.allclose(out, flatten(ref), atol=1e-6)
True
>>> round(dpsgd_epsilon(spec, delta=1e-5, total_steps=100), 2) > 0
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dp_accounting
import torch
from dp_accounting import rdp
from torch import nn

from producer.fl.aggregate import Weights
from producer.fl.training import (
    LOSSES,
    flatten,
    get_weights,
    scratch_copy,
    set_weights,
    unflatten,
)
from schemas.errors import PlanBuildError

__all__ = [
    "DPSGDSpec",
    "build_dpsgd_plan",
    "dpsgd_epsilon",
    "flatten",
    "get_weights",
    "noise_multiplier_for",
    "scratch_copy",
    "train_dpsgd_eager",
]

_EPS = 1e-6
"""Added to a row's gradient norm before dividing, as Opacus does."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DPSGDSpec:
    """One device call of DP-SGD: ``steps`` Poisson-sampled, clipped, noised SGD steps.

    Parameters
    ----------
    clip_norm
        ``C``: every example's gradient is scaled to L2 norm at most ``C``.
    noise_multiplier
        ``sigma``: the summed clipped gradient gets ``N(0, (sigma * C)^2)`` per coordinate.
    sampling_rate
        ``q``: each row joins a step's batch independently with probability ``q``.
    steps
        Local steps per call (unrolled in the plan).
    lr
        SGD learning rate; the step is ``lr * (sum + noise) / (q * n)``.
    loss
        A native loss of :data:`producer.fl.training.LOSSES`, applied per row.

    Examples
    --------
    >>> DPSGDSpec(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.1, steps=10).lr
    0.1
    """

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    lr: float = 0.1
    loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; use one of {sorted(LOSSES)}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be a positive number, not {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0, not {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], not {self.sampling_rate}")
        if self.steps < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 1 and lr > 0")


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The model's ``nn.Linear`` layers, after checking they hold every parameter."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for m in layers for p in m.parameters()}
    others = [n for n, p in model.named_parameters() if id(p) not in covered]
    if others or not layers:
        raise PlanBuildError(
            "DP-SGD plans compute per-example gradients for nn.Linear layers only; "
            f"parameters outside them: {others or 'the model has no nn.Linear'} "
            "(see docs/dp_sgd.md)"
        )
    if any(b.numel() for b in model.buffers()):
        raise PlanBuildError("DP-SGD plans refuse models with buffers (BatchNorm mixes rows)")
    return layers


class _Capture:
    """Forward hooks that keep each Linear layer's input and output of the current pass."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.layers = layers
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: dict[int, int] = {}
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Any:
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.calls[i] = self.calls.get(i, 0) + 1
            self.seen[i] = (inputs[0], output)

        return hook

    def check_once(self, model: nn.Module, in_features: int) -> None:
        """Run ``model`` on one zero row (outside any trace): every Linear layer must run
        exactly once, else its per-example gradient would need a sum over its calls."""
        with torch.no_grad():
            model(torch.zeros(1, in_features))
        counts = [self.calls.get(i, 0) for i in range(len(self.layers))]
        self.seen, self.calls = {}, {}
        if any(c != 1 for c in counts):
            raise PlanBuildError(
                f"every nn.Linear must run exactly once per forward (calls: {counts}); "
                "shared or unused layers are not supported by DP-SGD plans"
            )

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = [self.seen[i] for i in range(len(self.layers))]
        self.seen, self.calls = {}, {}
        return out


def _per_example_grads(
    captured: list[tuple[torch.Tensor, torch.Tensor]], loss: torch.Tensor, with_bias: list[bool]
) -> list[torch.Tensor]:
    """Each row's gradient of ``loss`` (a sum over rows) for every weight and bias, in
    ``[w1, b1, w2, b2...]`` order (biases only where the layer has one), shaped ``(n, *p)``."""
    backprops = torch.autograd.grad(loss, [out for _, out in captured])
    grads: list[torch.Tensor] = []
    for (a, _), g, bias in zip(captured, backprops, with_bias, strict=True):
        grads.append(torch.einsum("n...o,n...i->noi", g, a.detach()))
        if bias:
            grads.append(torch.einsum("n...o->no", g))
    return grads


def _clip_and_sum(grads: list[torch.Tensor], clip_norm: float) -> list[torch.Tensor]:
    """``sum_i g_i * min(1, C / (||g_i|| + 1e-6))`` for every parameter."""
    squares = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads], dim=1).sum(1)
    factor = (clip_norm / (squares.sqrt() + _EPS)).clamp(max=1.0)
    return [torch.einsum("n,n...->...", factor, g) for g in grads]


def build_dpsgd_plan(model: nn.Module, spec: DPSGDSpec, n_examples: int) -> Any:
    """Trace ``spec.steps`` DP-SGD steps on a device's ``n_examples`` rows into one plan.

    The plan takes ``(x, y, flat_weights)`` (the device's rows and labels, and the global
    weights flattened with :func:`producer.fl.training.flatten`) and returns the new weights,
    flattened. Every step draws its Poisson sample (``torch.rand(n) < q``) and its noise
    (``torch.randn_like``) from the device's own generator: no plan input feeds them, so
    the server cannot choose or cancel them (``docs/dp_sgd.md`` §3: a worker reseeds that
    generator from the OS before every command). Rows outside the sample contribute a zero
    gradient.

    Parameters
    ----------
    model
        A model whose parameters all belong to ``nn.Linear`` layers, each run once per
        forward (else :class:`~schemas.errors.PlanBuildError`).
    spec
        Clip norm, noise multiplier, sampling rate, steps, learning rate and loss.
    n_examples
        The device's row count (a guard refuses other counts).

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> spec = DPSGDSpec(clip_norm=0.5, noise_multiplier=0.0, sampling_rate=1.0, steps=1)
    >>> out = build_dpsgd_plan(net, spec, 4)(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]),
    ...                                      flatten(get_weights(net)))
    >>> out.shape
    torch.Size([8])
    """
    from producer.plans.plan import Plan

    loss_fn = LOSSES[spec.loss]
    clip, sigma, q, lr = spec.clip_norm, spec.noise_multiplier, spec.sampling_rate, spec.lr
    expected_batch = q * n_examples

    class DPSGDTraining(Plan):
        def __init__(self) -> None:
            super().__init__(name=f"fl_dpsgd_n{n_examples}")
            self.model = scratch_copy(model)
            layers = _linear_layers(self.model)
            self._with_bias = [layer.bias is not None for layer in layers]
            capture = _Capture(layers)  # holds modules only: no extra reference to a parameter
            capture.check_once(self.model, _in_features(model))
            self._take = capture.take

        def forward(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != n_examples:  # a guard: this plan's sampling is for n_examples
                raise ValueError(f"this plan trains on {n_examples} rows")
            state = dict(self.model.state_dict(keep_vars=True))
            given = unflatten(flat, {k: t.detach() for k, t in state.items()})
            with torch.no_grad():
                for name, t in state.items():
                    t.copy_(given[name])
            params = [
                p for m in self.model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
            ]
            for _ in range(spec.steps):
                sampled = (torch.rand(n_examples) < q).to(x.dtype)
                # each row's own loss (mean over its outputs, as the eager batch of one)
                per_row = loss_fn(self.model(x), y, reduction="none").reshape(n_examples, -1)
                per_row = per_row.mean(1)
                grads = _per_example_grads(self._take(), (per_row * sampled).sum(), self._with_bias)
                summed = _clip_and_sum(grads, clip)
                with torch.no_grad():
                    for p, s in zip(params, summed, strict=True):
                        noisy = s + torch.randn_like(s) * (sigma * clip)
                        p.sub_(noisy * (lr / expected_batch))
            return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])

    plan = DPSGDTraining()
    x_ex = torch.zeros(n_examples, _in_features(model))
    if spec.loss == "mse_loss":  # float targets shaped like the last layer's output
        y_ex = torch.zeros(n_examples, _linear_layers(model)[-1].out_features)
    else:  # class indices
        y_ex = torch.zeros(n_examples, dtype=torch.int64)
    plan.build(x_ex, y_ex, flatten(get_weights(model)))
    return plan


def _in_features(model: nn.Module) -> int:
    declared = getattr(model, "in_features", None)
    if isinstance(declared, int):
        return declared
    return _linear_layers(model)[0].in_features


def train_dpsgd_eager(
    model: nn.Module, spec: DPSGDSpec, weights: Weights, x: torch.Tensor, y: torch.Tensor
) -> Weights:
    """The reference: the same steps in plain PyTorch, one backward pass per sampled row.

    Draws from torch's global generator in the plan's order (per step: the ``rand(n)``
    sample, then one ``randn_like`` per parameter in ``[w1, b1, w2, b2...]`` order), so
    under the same seed it takes the plan's steps; tests compare the two.
    """
    set_weights(model, weights)
    layers = _linear_layers(model)
    params = [p for layer in layers for p in layer.parameters()]
    loss_fn = LOSSES[spec.loss]
    n = len(x)
    clip, sigma = spec.clip_norm, spec.noise_multiplier
    for _ in range(spec.steps):
        sampled = torch.rand(n) < spec.sampling_rate
        total = [torch.zeros_like(p) for p in params]
        for i in torch.nonzero(sampled).flatten().tolist():
            grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
            norm = torch.sqrt(sum((g.pow(2).sum() for g in grads), torch.zeros(())))
            factor = min(1.0, clip / (float(norm) + _EPS))
            for acc, g in zip(total, grads, strict=True):
                acc.add_(g * factor)
        step = spec.lr / (spec.sampling_rate * n)
        with torch.no_grad():
            for p, s in zip(params, total, strict=True):
                p.sub_((s + torch.randn_like(s) * (sigma * clip)) * step)
    return get_weights(model)


def dpsgd_epsilon(spec: DPSGDSpec, *, delta: float, total_steps: int | None = None) -> float:
    """ε at ``delta`` after ``total_steps`` DP-SGD steps (default ``spec.steps``).

    Each step is a Poisson-sampled Gaussian mechanism with rate ``q`` and noise multiplier
    ``sigma``, composed with ``dp-accounting``'s RDP accountant (example-level, add/remove
    one row, for one device's data). ``sigma = 0`` gives infinity.

    Examples
    --------
    >>> spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.1, sampling_rate=256 / 60000,
    ...                  steps=1)
    >>> 1.0 < dpsgd_epsilon(spec, delta=1e-5, total_steps=60 * 234) < 3.0
    True
    """
    steps = spec.steps if total_steps is None else total_steps
    if steps < 0 or not 0 < delta < 1:
        raise ValueError("total_steps must be >= 0 and delta in (0, 1)")
    if spec.noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            spec.sampling_rate, dp_accounting.GaussianDpEvent(spec.noise_multiplier)
        ),
        steps,
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    epsilon: float, *, delta: float, sampling_rate: float, total_steps: int
) -> float:
    """The smallest ``sigma`` (to 0.1 %) whose :func:`dpsgd_epsilon` after ``total_steps``
    Poisson-sampled steps at rate ``sampling_rate`` is at most ``epsilon`` at ``delta``.

    Examples
    --------
    >>> sigma = noise_multiplier_for(8.0, delta=1e-5, sampling_rate=0.2, total_steps=120)
    >>> spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=sigma, sampling_rate=0.2, steps=120)
    >>> 7.9 < dpsgd_epsilon(spec, delta=1e-5) <= 8.0
    True
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive number, not {epsilon}")

    def eps(sigma: float) -> float:
        spec = DPSGDSpec(
            clip_norm=1.0, noise_multiplier=sigma, sampling_rate=sampling_rate, steps=1
        )
        return dpsgd_epsilon(spec, delta=delta, total_steps=total_steps)

    low, high = 0.0, 1.0
    while eps(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {epsilon}")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > epsilon else (low, mid)
    return high
