"""DP-FedAvg pieces: clipping, adaptive clipping, noise, the accountant and the ε budget."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

from consumer.secagg.errors import PrivacyBudgetExhausted
from producer.fl.privacy import (
    AdaptiveClip,
    PrivacyAccountant,
    add_gaussian_noise,
    clip_update,
    secure_noise_plan,
)


def test_clipped_updates_never_exceed_the_norm_and_keep_their_direction() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        update = torch.randn(1000, generator=g) * scale
        clipped, norm = clip_update(update, clip_norm=2.0)
        assert norm == pytest.approx(float(update.double().norm()))
        assert float(clipped.double().norm()) <= 2.0 * (1 + 1e-6)
        if norm <= 2.0:
            assert torch.equal(clipped, update)
        else:
            assert float(torch.nn.functional.cosine_similarity(clipped, update, dim=0)) > 0.9999


def test_clipping_refuses_non_finite_updates() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_update(torch.tensor([float("nan"), 1.0]), clip_norm=1.0)


def test_adaptive_clipping_tracks_the_target_quantile_of_the_norms() -> None:
    rng = np.random.default_rng(1)
    clip = AdaptiveClip(clip_norm=0.1, target_quantile=0.7, learning_rate=0.2)
    for _ in range(400):
        norms = rng.lognormal(mean=1.0, sigma=0.5, size=100)
        clip = clip.update(unclipped=int((norms <= clip.clip_norm).sum()), devices=100)
    true_quantile = math.exp(1.0 + 0.5 * 0.5244)  # 70th percentile of that log-normal
    assert clip.clip_norm == pytest.approx(true_quantile, rel=0.1)


def test_the_count_noise_takes_its_share_of_the_noise_multiplier() -> None:
    clip = AdaptiveClip(clip_norm=1.0, count_stddev=5.0)
    assert clip.update_noise_multiplier(1.0) == pytest.approx((1 - 1 / 100) ** -0.5)
    with pytest.raises(ValueError):
        AdaptiveClip(clip_norm=1.0, count_stddev=0.4).update_noise_multiplier(1.0)


def test_server_gaussian_noise_has_the_calibrated_standard_deviation() -> None:
    g = torch.Generator().manual_seed(2)
    total = torch.zeros(200_000)
    noised = add_gaussian_noise(total, noise_multiplier=1.5, sensitivity=2.0, generator=g)
    assert float(noised.std()) == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta"),
    [(0.01, 1.1, 1000, 1e-5), (0.1, 0.8, 50, 1e-6), (1.0, 5.0, 10, 1e-5)],
)
def test_epsilon_equals_dp_accountings_own_computation(
    q: float, z: float, rounds: int, delta: float
) -> None:
    ours = PrivacyAccountant(noise_multiplier=z, sampling_rate=q, delta=delta)
    ours.step(rounds)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    reference = rdp.RdpAccountant()
    reference.compose(event, rounds)
    assert ours.epsilon() == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    stepwise = rdp.RdpAccountant()
    for _ in range(10):  # composed round by round, as a run would
        stepwise.compose(event)
    assert ours.epsilon_after(10) == pytest.approx(stepwise.get_epsilon(delta), rel=1e-9)
    by_pld = PrivacyAccountant(noise_multiplier=z, sampling_rate=q, delta=delta, method="pld")
    reference_pld = pld.PLDAccountant()
    reference_pld.compose(event, rounds)
    assert by_pld.epsilon_after(rounds) == pytest.approx(reference_pld.get_epsilon(delta))
    assert by_pld.epsilon_after(rounds) <= ours.epsilon() * 1.001  # PLD is the tighter one


def test_epsilon_without_sampling_matches_the_gaussian_closed_form() -> None:
    """q = 1: RDP of r Gaussian rounds is r * a / (2 z^2); ε from the conversion of
    Canonne, Kamath and Steinke (2020), minimized over the library's orders."""
    z, rounds, delta = 3.0, 20, 1e-5
    eps = min(
        rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    )
    acc = PrivacyAccountant(noise_multiplier=z, sampling_rate=1.0, delta=delta)
    assert acc.epsilon_after(rounds) == pytest.approx(eps, rel=1e-9)


def test_a_run_stops_at_its_epsilon_budget() -> None:
    acc = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.05, delta=1e-5)
    budget = acc.epsilon_after(30) + 1e-9
    ran = 0
    with pytest.raises(PrivacyBudgetExhausted, match="round 31 would spend"):
        while True:
            acc.check_budget(epsilon=budget)
            acc.step()
            ran += 1
    assert ran == 30 and acc.epsilon() <= budget
    assert PrivacyBudgetExhausted.code == "PRIVACY_BUDGET"


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    low = PrivacyAccountant(noise_multiplier=0.7, sampling_rate=0.1, delta=1e-5)
    high = PrivacyAccountant(noise_multiplier=1.4, sampling_rate=0.1, delta=1e-5)
    assert 0 < low.epsilon_after(10) < low.epsilon_after(100)
    assert high.epsilon_after(100) < low.epsilon_after(100)
    assert low.epsilon_after(0) == 0.0


def test_distributed_noise_sums_to_the_central_noise_over_min_survivors() -> None:
    plan = secure_noise_plan(noise_multiplier=1.2, clip_norm=0.5, dimension=10_000,
                             num_clients=100, min_survivors=67, max_weight=1, scale_bits=12)
    assert plan.sensitivity == pytest.approx(0.5 * 2**12 + 100.0)
    assert plan.device_sigma * math.sqrt(67) == pytest.approx(1.2 * plan.sensitivity)
    # sigma per device is large: the discrete-Gaussian sum term (tau) is negligible here
    assert plan.effective_noise_multiplier == pytest.approx(1.2, rel=1e-12)
    assert plan.effective_noise_multiplier <= 1.2
    assert plan.quantization.noise_bound >= 10 * plan.device_sigma
    assert plan.quantization.sum_bound() < 2 ** (plan.quantization.modulus_bits - 1)


def test_tiny_distributed_noise_pays_for_the_discrete_sum() -> None:
    plan = secure_noise_plan(noise_multiplier=0.01, clip_norm=1e-4, dimension=1000,
                             num_clients=10, min_survivors=10, scale_bits=0)
    assert plan.device_sigma < 0.2
    assert plan.effective_noise_multiplier < 0.01  # tau > 0 lowers the effective multiplier
