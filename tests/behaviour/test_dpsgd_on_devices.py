"""DP-SGD plans on devices, on every transport: the clipped step is eager torch's, the noise
is the device's own, fresh on every call and of the calibrated scale."""

from __future__ import annotations

import math

import pytest
import torch

import producer as fp
from producer.fl.dpsgd import DPSGDSpec, build_dpsgd_plan, train_dpsgd_eager
from producer.fl.models import MLP
from producer.fl.training import flatten, get_weights, scratch_copy
from tests.behaviour.conftest import DeviceFactory

N = 24


def _setup(device: DeviceFactory, name: str) -> tuple[MLP, torch.Tensor, torch.Tensor, fp.Device]:
    torch.manual_seed(0)
    net = MLP(64, 16, 10)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g)
    handle = device(name, data=(fp.tag(x, "train", "x"), fp.tag(y, "train", "y")))
    return net, x, y, handle


def _run(handle: fp.Device, plan: object, flat: torch.Tensor) -> torch.Tensor:
    x_ptr, y_ptr = handle.search("train", "x")[0], handle.search("train", "y")[0]
    pointer_plan = handle.send_plan(plan)
    return pointer_plan.run(x_ptr, y_ptr, flat, return_values=True).get(timeout=120)


def test_a_noiseless_dp_sgd_plan_on_a_device_takes_the_eager_clipped_steps(
    device: DeviceFactory,
) -> None:
    net, x, y, handle = _setup(device, "dpsgd-exact")
    spec = DPSGDSpec(clip_norm=0.5, noise_multiplier=0.0, sampling_rate=1.0, steps=3, lr=0.5)
    w = get_weights(net)
    got = _run(handle, build_dpsgd_plan(net, spec, N), flatten(w))
    want = flatten(train_dpsgd_eager(scratch_copy(net), spec, w, x, y))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, flatten(w), atol=1e-3)  # it did train


def test_device_noise_is_fresh_on_every_call_and_has_standard_deviation_sigma_c(
    device: DeviceFactory,
) -> None:
    net, _, _, handle = _setup(device, "dpsgd-noise")
    sigma, clip, lr = 1.5, 0.5, 1.0
    flat = flatten(get_weights(net))
    clean = DPSGDSpec(clip_norm=clip, noise_multiplier=0.0, sampling_rate=1.0, steps=1, lr=lr)
    noisy = DPSGDSpec(clip_norm=clip, noise_multiplier=sigma, sampling_rate=1.0, steps=1, lr=lr)
    base = _run(handle, build_dpsgd_plan(net, clean, N), flat)
    plan = build_dpsgd_plan(net, noisy, N)
    # update = -lr / N * (clipped sum + noise): the noise of each call, rescaled
    noises = [((base - _run(handle, plan, flat)) * (N / lr)).double() for _ in range(3)]
    for noise in noises:
        assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.1)
        assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(noise.numel())
    for a, b in ((0, 1), (0, 2), (1, 2)):  # independent draws, not a replayed stream
        corr = float(torch.corrcoef(torch.stack([noises[a], noises[b]]))[0, 1])
        assert abs(corr) < 0.15, (a, b, corr)
