"""Example-level DP-SGD in a traced plan, against eager per-example loops and Opacus."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import rdp
from torch import nn

from producer.fl.dpsgd import (
    DPSGDSpec,
    build_dpsgd_plan,
    dpsgd_epsilon,
    noise_multiplier_for,
    train_dpsgd_eager,
)
from producer.fl.models import MLP, make_model
from producer.fl.training import flatten, get_weights, scratch_copy, unflatten
from schemas.allowlist import is_allowed
from schemas.errors import PlanBuildError, PlanGuardError


def _data(n: int, d: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, torch.randint(0, classes, (n,), generator=g)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _per_example_loop(
    model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Each row's gradient by its own backward pass (the definition)."""
    m = scratch_copy(model)
    m.load_state_dict(weights)
    out = []
    for i in range(len(x)):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        out.append([p.grad.detach().clone() for p in m.parameters()])
    return out


def _clipped_sum_reference(
    grads: list[list[torch.Tensor]], clip: float, rows: list[int]
) -> torch.Tensor:
    total = None
    for i in rows:
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads[i]))
        factor = min(1.0, clip / (norm + 1e-6))
        flat = torch.cat([g.reshape(-1) for g in grads[i]]) * factor
        total = flat if total is None else total + flat
    assert total is not None
    return total


def test_a_noiseless_full_batch_step_is_the_clipped_sum_of_per_example_gradients() -> None:
    net = _mlp()
    x, y = _data(12)
    clip, lr = 1.2, 0.3
    spec = DPSGDSpec(clip_norm=clip, noise_multiplier=0.0, sampling_rate=1.0, steps=1, lr=lr)
    w = get_weights(net)
    out = build_dpsgd_plan(net, spec, 12)(x, y, flatten(w))
    grads = _per_example_loop(net, w, x, y)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in gs)) for gs in grads]
    assert min(norms) < clip < max(norms)  # some rows are clipped, some are not
    want = flatten(w) - lr / 12 * _clipped_sum_reference(grads, clip, list(range(12)))
    assert torch.allclose(out, want, atol=1e-6)


def test_the_plan_takes_the_eager_steps_under_the_same_seed_sampling_and_noise_included() -> None:
    net = _mlp()
    x, y = _data(20)
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.3, sampling_rate=0.3, steps=4, lr=0.2)
    plan = build_dpsgd_plan(net, spec, 20)
    w = get_weights(net)
    torch.manual_seed(42)
    got = plan(x, y, flatten(w))
    torch.manual_seed(42)
    want = flatten(train_dpsgd_eager(scratch_copy(net), spec, w, x, y))
    assert torch.allclose(got, want, atol=1e-6)
    torch.manual_seed(43)
    assert not torch.allclose(plan(x, y, flatten(w)), got, atol=1e-3)  # fresh noise differs


def test_rows_left_out_of_the_poisson_sample_contribute_nothing() -> None:
    net = _mlp()
    x, y = _data(16)
    spec = DPSGDSpec(clip_norm=0.5, noise_multiplier=0.0, sampling_rate=0.4, steps=1, lr=1.0)
    w = get_weights(net)
    plan = build_dpsgd_plan(net, spec, 16)  # building draws random numbers: build first
    torch.manual_seed(7)
    sampled = torch.nonzero(torch.rand(16) < 0.4).flatten().tolist()
    assert 0 < len(sampled) < 16
    torch.manual_seed(7)
    out = plan(x, y, flatten(w))
    grads = _per_example_loop(net, w, x, y)
    want = flatten(w) - 1.0 / (0.4 * 16) * _clipped_sum_reference(grads, 0.5, sampled)
    assert torch.allclose(out, want, atol=1e-6)


def test_the_noise_is_gaussian_with_standard_deviation_sigma_times_clip_norm() -> None:
    net = _mlp()
    x, y = _data(10)
    sigma, clip, lr, q = 2.0, 0.5, 1.0, 1.0
    noisy = DPSGDSpec(clip_norm=clip, noise_multiplier=sigma, sampling_rate=q, steps=1, lr=lr)
    clean = DPSGDSpec(clip_norm=clip, noise_multiplier=0.0, sampling_rate=q, steps=1, lr=lr)
    w = flatten(get_weights(net))
    base = build_dpsgd_plan(net, clean, 10)(x, y, w)
    plan = build_dpsgd_plan(net, noisy, 10)
    # the update is -lr/(q n) * (clipped sum + noise): recover the noise of 40 calls
    noise = torch.cat([(base - plan(x, y, w)) * (q * 10 / lr) for _ in range(40)]).double()
    assert noise.numel() == 40 * w.numel()
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.03)
    kurtosis = float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2)
    assert kurtosis == pytest.approx(3.0, abs=0.15)  # Gaussian, not uniform (1.8)


def test_the_noise_has_no_plan_input_the_server_could_choose() -> None:
    net = _mlp()
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=2)
    plan = build_dpsgd_plan(net, spec, 6)
    ops = [op.target for op in plan.ir.ops]
    assert ops.count("torch.rand") == 2  # one Poisson sample per step
    assert ops.count("torch.randn_like") == 2 * 6  # one draw per parameter per step
    assert "torch.manual_seed" not in ops and all(is_allowed(name) for name in ops)
    assert [s.path for s in plan.ir.input_specs] == ["x", "y", "flat"]


def test_the_plan_returns_only_the_weights_no_loss_or_batch_size() -> None:
    net = _mlp()
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=1)
    x, y = _data(6)
    out = build_dpsgd_plan(net, spec, 6)(x, y, flatten(get_weights(net)))
    assert out.shape == flatten(get_weights(net)).shape


def test_the_digits_mlp_of_the_benchmark_trains_with_dp_sgd() -> None:
    torch.manual_seed(0)
    net = MLP(64, 16, 10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=0.8, sampling_rate=0.25, steps=3)
    w = get_weights(net)
    plan = build_dpsgd_plan(net, spec, 40)
    torch.manual_seed(5)
    got = plan(x, y, flatten(w))
    torch.manual_seed(5)
    want = train_dpsgd_eager(scratch_copy(net), spec, w, x, y)
    for k, t in unflatten(got, w).items():
        assert torch.allclose(t, want[k], atol=1e-6), k


@pytest.mark.parametrize("name", ["cnn", "gru"])
def test_models_with_parameters_outside_linear_layers_are_refused_at_build(name: str) -> None:
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=1)
    with pytest.raises(PlanBuildError, match=r"nn\.Linear layers only"):
        build_dpsgd_plan(make_model(name, 64, 10, hidden=4), spec, 4)


def test_a_linear_layer_called_twice_is_refused_at_build() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=1)
    with pytest.raises(PlanBuildError, match="exactly once"):
        build_dpsgd_plan(Twice(), spec, 4)


def test_another_row_count_is_refused_by_the_guard() -> None:
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=1)
    net = _mlp()
    plan = build_dpsgd_plan(net, spec, 6)
    x, y = _data(7)
    with pytest.raises(PlanGuardError):
        plan(x, y, flatten(get_weights(net)))


@pytest.mark.parametrize(
    "bad",
    [
        {"clip_norm": 0.0},
        {"clip_norm": math.inf},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.nan},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"steps": 0},
        {"lr": 0.0},
        {"loss": "hinge"},
    ],
)
def test_a_spec_out_of_range_is_refused(bad: dict[str, object]) -> None:
    args: dict[str, object] = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "sampling_rate": 0.1,
        "steps": 1,
        **bad,
    }
    with pytest.raises(ValueError):
        DPSGDSpec(**args)  # type: ignore[arg-type]


def test_epsilon_is_the_accountant_librarys_poisson_sampled_gaussian() -> None:
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.1, sampling_rate=0.01, steps=10)
    ref = rdp.RdpAccountant()  # composed with count=, not as a SelfComposedDpEvent
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 500)
    assert dpsgd_epsilon(spec, delta=1e-5, total_steps=500) == pytest.approx(
        ref.get_epsilon(1e-5), rel=1e-9
    )
    assert dpsgd_epsilon(spec, delta=1e-5) < dpsgd_epsilon(spec, delta=1e-5, total_steps=500)
    no_noise = DPSGDSpec(clip_norm=1.0, noise_multiplier=0.0, sampling_rate=0.01, steps=1)
    assert dpsgd_epsilon(no_noise, delta=1e-5) == math.inf


def test_epsilon_matches_the_dp_sgd_papers_mnist_setting() -> None:
    # Abadi et al. 2016 / TF Privacy tutorial: q = 256/60000, sigma = 1.1, 60 epochs, delta 1e-5
    # gives epsilon about 3 (RDP: 2.92 in TF Privacy's compute_dp_sgd_privacy)
    spec = DPSGDSpec(clip_norm=1.0, noise_multiplier=1.1, sampling_rate=256 / 60000, steps=1)
    eps = dpsgd_epsilon(spec, delta=1e-5, total_steps=60 * 60000 // 256)
    assert 2.5 < eps < 3.3


def test_opacus_per_sample_clipped_sum_matches_the_plan() -> None:
    opacus = pytest.importorskip("opacus")
    net = _mlp()
    x, y = _data(10)
    clip = 0.8
    spec = DPSGDSpec(clip_norm=clip, noise_multiplier=0.0, sampling_rate=1.0, steps=1, lr=1.0)
    w = get_weights(net)
    out = build_dpsgd_plan(net, spec, 10)(x, y, flatten(w))

    model = opacus.GradSampleModule(scratch_copy(net))
    F.cross_entropy(model(x), y, reduction="sum").backward()
    grad_samples = [p.grad_sample for p in model.parameters()]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grad_samples], 1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    summed = torch.cat([torch.einsum("n,n...->...", factor, g).reshape(-1) for g in grad_samples])
    assert torch.allclose(out, flatten(w) - summed / 10, atol=1e-6)


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_the_calibrated_noise_multiplier_spends_at_most_the_target_epsilon(target: float) -> None:
    sigma = noise_multiplier_for(target, delta=1e-5, sampling_rate=0.18, total_steps=120)
    at = DPSGDSpec(clip_norm=1.0, noise_multiplier=sigma, sampling_rate=0.18, steps=120)
    below = DPSGDSpec(clip_norm=1.0, noise_multiplier=sigma * 0.99, sampling_rate=0.18, steps=120)
    assert dpsgd_epsilon(at, delta=1e-5) <= target < dpsgd_epsilon(below, delta=1e-5)


def test_a_regression_loss_is_taken_per_row_as_in_a_batch_of_one() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 5, generator=g), torch.randn(9, 2, generator=g)
    spec = DPSGDSpec(
        clip_norm=0.3, noise_multiplier=0.5, sampling_rate=0.6, steps=2, loss="mse_loss"
    )
    plan = build_dpsgd_plan(net, spec, 9)
    w = get_weights(net)
    torch.manual_seed(11)
    got = plan(x, y, flatten(w))
    torch.manual_seed(11)
    want = flatten(train_dpsgd_eager(scratch_copy(net), spec, w, x, y))
    assert torch.allclose(got, want, atol=1e-6)
