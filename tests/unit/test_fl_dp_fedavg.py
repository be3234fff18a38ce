"""DP-FedAvg in a job: ε per round is dp-accounting's, the noise is calibrated to the budget,
the run stops before passing it, and server-side clipping and noise are as specified."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from torch import nn

from producer.fl.dp_fedavg import CentralDP, DifferentialPrivacy
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant
from producer.fl.rounds import RoundPolicy
from producer.fl.secure_rounds import SecureAggregation, secure_accountant
from producer.fl.strategy import FedAvg, FitResult
from producer.fl.training import TrainingSpec, get_weights
from schemas.errors import FedplanError


def reference_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting called directly: Poisson-sampled Gaussian, composed ``rounds`` times."""
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def eager_job(n: int = 8, **kw: object) -> FederatedJob:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(2)
    members = [
        EagerParticipant(f"d{i}", net, TrainingSpec(batch_size=4),
                         torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g))
        for i in range(n)
    ]
    return FederatedJob(participants=members, strategy="fedavg", **kw)  # type: ignore[arg-type]


def test_every_rounds_epsilon_is_dp_accountings_reference_for_the_same_parameters() -> None:
    dp = DifferentialPrivacy(noise_multiplier=1.1, clip_norm=0.5, delta=1e-5)
    job = eager_job(policy=RoundPolicy(fraction=0.5), privacy=dp)
    result = job.run(get_weights(nn.Linear(3, 2)), num_rounds=3)
    assert math.isnan(result.history[0].epsilon)
    for m in result.history[1:]:
        assert m.epsilon == pytest.approx(reference_epsilon(1.1, 0.5, m.round, 1e-5), rel=1e-9)


def test_the_noise_calibrated_to_a_budget_spends_it_in_the_planned_rounds() -> None:
    for eps, q, rounds in ((8.0, 1.0, 10), (1.0, 0.1, 50)):
        z = DifferentialPrivacy(target_epsilon=eps).calibrated(sampling_rate=q, rounds=rounds)
        spent = reference_epsilon(z, q, rounds, 1e-5)
        assert eps * 0.99 < spent <= eps


def test_a_run_stops_before_the_round_that_would_pass_its_epsilon_budget() -> None:
    budget = reference_epsilon(2.0, 1.0, 3, 1e-5) * 1.0001  # three rounds fit, not four
    dp = DifferentialPrivacy(noise_multiplier=2.0, target_epsilon=budget)
    result = eager_job(privacy=dp).run(get_weights(nn.Linear(3, 2)), num_rounds=10)
    assert [m.round for m in result.history] == [0, 1, 2, 3]
    assert "would spend" in result.stopped
    assert all(m.epsilon <= budget for m in result.history[1:])


def test_central_noise_has_standard_deviation_z_times_clip_over_expected_devices() -> None:
    z, clip, m = 2.0, 0.5, 4
    strategy = CentralDP(FedAvg(), noise_multiplier=z, clip_norm=clip, expected_devices=m,
                         generator=torch.Generator().manual_seed(0))
    w = {"p": torch.zeros(20_000)}
    same = [FitResult(f"d{i}", {"p": torch.zeros(20_000)}, 1) for i in range(m)]
    out = strategy.aggregate_fit(1, w, same, [])
    assert out is not None
    assert float(out["p"].std()) == pytest.approx(z * clip / m, rel=0.03)


def test_central_clipping_bounds_each_devices_update_to_the_clip_norm() -> None:
    strategy = CentralDP(FedAvg(), noise_multiplier=0.0, clip_norm=1.0, expected_devices=2)
    w = {"p": torch.zeros(2)}
    big = FitResult("a", {"p": torch.tensor([30.0, 40.0])}, 100)  # norm 50, many examples
    small = FitResult("b", {"p": torch.tensor([0.0, 0.5])}, 1)
    out = strategy.aggregate_fit(1, w, [big, small], [])
    assert out is not None
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 0.5])) / 2  # eager, by hand
    assert torch.allclose(out["p"], expected)


def test_adaptive_clipping_moves_the_clip_norm_towards_the_target_quantile() -> None:
    strategy = CentralDP(FedAvg(), noise_multiplier=0.0, clip_norm=10.0, expected_devices=4,
                         target_quantile=0.5, generator=torch.Generator().manual_seed(0))
    w = {"p": torch.zeros(1)}
    results = [FitResult(f"d{i}", {"p": torch.tensor([0.1])}, 1) for i in range(4)]
    for r in range(10):
        strategy.aggregate_fit(r + 1, w, results, [])
    assert strategy.clip_norm < 10.0 * math.exp(-0.2 * 0.3 * 10) * 1.5


def test_the_secure_accountant_meets_the_budget_with_the_distributed_noise() -> None:
    dp = DifferentialPrivacy(target_epsilon=8.0)
    z, accountant = secure_accountant(dp, SecureAggregation(), devices=8, sampled=8,
                                      dimension=2000, rounds=5)
    assert z > 0 and accountant.epsilon_after(5) <= 8.0
    assert accountant.epsilon_after(5) == pytest.approx(
        reference_epsilon(accountant.noise_multiplier, 1.0, 5, 1e-5), rel=1e-9)


def test_privacy_settings_refuse_what_they_cannot_guarantee() -> None:
    with pytest.raises(ValueError, match="noise_multiplier, a target_epsilon"):
        DifferentialPrivacy()
    with pytest.raises(ValueError, match="delta"):
        DifferentialPrivacy(noise_multiplier=1.0, delta=1.5)
    with pytest.raises(ValueError, match="count_stddev"):
        DifferentialPrivacy(noise_multiplier=1.0, target_quantile=0.5, count_stddev=0.0)
    with pytest.raises(FedplanError, match="PlanParticipant"):  # secure rounds need devices
        eager_job(secure_aggregation=SecureAggregation(),
                  privacy=DifferentialPrivacy(noise_multiplier=1.0, target_quantile=0.5)).run(
                      get_weights(nn.Linear(3, 2)), num_rounds=1)
