"""Adaptive clipping's pieces under secure aggregation: the indicator's scale gives Andrew et
al.'s joint noise multiplier, the adaptive update plan is eager training plus clipping and
the indicator, and a count noise that would spend the whole budget is refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from producer.fl.dp_fedavg import DifferentialPrivacy
from producer.fl.privacy import AdaptiveClip, default_count_stddev, indicator_scale
from producer.fl.secure_clip import SecureAdaptiveClip
from producer.fl.secure_training import build_update_plan
from producer.fl.training import (
    TrainingSpec,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
)


@pytest.mark.parametrize(("z", "clip", "sigma_b"), [(1.0, 0.5, 5.0), (0.7, 2.0, 0.4),
                                                     (12.0, 0.1, 12.0)])
def test_the_indicator_scale_makes_andrews_joint_multiplier_the_devices_z(
    z: float, clip: float, sigma_b: float
) -> None:
    s = indicator_scale(noise_multiplier=z, clip_norm=clip, count_stddev=sigma_b)
    noise = z * math.hypot(clip, s / 2)  # the devices' noise on the sum, L2 bound sqrt(C²+s²/4)
    assert noise / s == pytest.approx(sigma_b, rel=1e-6)  # the count's noise in count units
    z_delta = noise / clip
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-6)
    left = AdaptiveClip(clip_norm=clip, count_stddev=sigma_b).update_noise_multiplier(z)
    assert left == pytest.approx(z_delta, rel=1e-6)  # as the server-side path reduces z


def test_a_count_noise_that_would_spend_the_whole_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        indicator_scale(noise_multiplier=4.0, clip_norm=1.0, count_stddev=2.0)
    dp = DifferentialPrivacy(noise_multiplier=4.0, target_quantile=0.5, count_stddev=2.0)
    with pytest.raises(ValueError, match="count_stddev"):
        SecureAdaptiveClip.create(dp, noise_multiplier=4.0, expected_devices=100)
    assert default_count_stddev(100, 1.0) == 5.0  # Andrew et al.'s m / 20
    assert default_count_stddev(100, 12.0) == 12.0  # m / 20 would be below z / 2


@pytest.mark.parametrize("clip_norm", [1e-3, 10.0])
def test_the_adaptive_update_plan_is_eager_training_clipped_with_the_unclipped_bit(
    clip_norm: float,
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    spec = TrainingSpec(batch_size=3, lr=0.3, epochs=2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 5, generator=g), torch.randint(0, 3, (7,), generator=g)
    w, order = get_weights(net), sample_order(7, 11, 2)
    plan = build_update_plan(net, spec, 7, adaptive_clip=True)
    scale = 0.25
    out, _ = plan(x, y, order, flatten(w), torch.tensor([clip_norm, scale]))
    new, _ = train_eager(scratch_copy(net), spec, w, x, y, order)
    update = (flatten(new) - flatten(w)).double()
    norm = float(update.norm())
    expected = update * min(1.0, clip_norm / norm)
    assert out.shape == (update.numel() + 1,)
    assert torch.allclose(out[:-1].double(), expected, atol=1e-6)
    assert float(out[-1]) == (0.5 if norm <= clip_norm else -0.5) * scale
    assert getattr(plan, "adaptive_clip", False) is True
