"""Adaptive clipping with secure aggregation (Andrew et al. 2021 under SecAgg+): the server
learns the count of unclipped updates only inside the secure sum, the count is the eager one,
the clip norm moves the right way, no message holds an update or an indicator, and ε is
dp-accounting's for the paper's effective noise multiplier."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from consumer.secagg.messages import RoundConfig
from consumer.secagg.quantize import unpack_vector
from consumer.secagg.wire_codec import config_from_proto
from producer.fl.checkpoint import load_latest
from producer.fl.dp_fedavg import DifferentialPrivacy
from producer.fl.job import FederatedJob
from producer.fl.privacy import AdaptiveClip
from producer.fl.rounds import RoundPolicy
from producer.fl.secure_clip import SecureAdaptiveClip
from producer.fl.secure_rounds import SecureAggregation, SecureRoundRunner
from producer.fl.strategy import FedAvg
from producer.fl.training import flatten
from schemas import command_pb2 as cmd
from schemas.wire import decode_command
from tests.behaviour.conftest import DeviceFactory
from tests.behaviour.test_secure_aggregation import (  # noqa: F401 - the wiretap fixture
    Setup,
    Wiretap,
    eager_updates,
    make_setup,
    wiretap,
)

pytestmark = pytest.mark.timeout(900)  # RabbitMQ rounds take minutes on a loaded machine

EMBEDDED = pytest.mark.parametrize("transport_case", ["embedded"], indirect=True)


@pytest.fixture
def tap(wiretap: Wiretap) -> Wiretap:  # noqa: F811 - the imported fixture
    """Every command and reply of the test (``test_secure_aggregation``'s wiretap)."""
    return wiretap


def assert_nowhere(vectors: list[torch.Tensor], messages: list[bytes], who: str) -> None:
    """Three changed coordinates of each vector, as float32 or float64 bytes, are in no
    message."""
    changed = int(torch.nonzero(vectors[0].abs() > 1e-6)[0])
    for vector in vectors:
        window = vector[changed : changed + 3]
        for raw in (window.float().numpy().tobytes(), window.double().numpy().tobytes()):
            assert not any(raw in m for m in messages), who


def assert_indicator_masked(value: int, scale: float, config: RoundConfig) -> None:
    """The indicator's coordinate of a masked vector is neither bit's quantized value."""
    q = config.quantization
    mod = 1 << q.modulus_bits
    for b in (-0.5 * scale, 0.5 * scale):
        near = math.floor(b * 2**q.scale_bits) % mod
        assert value not in (near, (near + 1) % mod)


def adaptive_runner(s: Setup, clip_norm: float, *, z: float = 0.0,
                    count_stddev: float = 1.0) -> SecureRoundRunner:
    """A secure DP round runner with adaptive clipping (``z = 0``: no noise, exact count)."""
    dp = DifferentialPrivacy(noise_multiplier=max(z, 1.0), clip_norm=clip_norm,
                             target_quantile=0.5, count_stddev=count_stddev)
    clip = AdaptiveClip(clip_norm=clip_norm, target_quantile=0.5, count_stddev=count_stddev)
    return SecureRoundRunner(
        s.members, FedAvg(), SecureAggregation(stage_deadline=300.0),
        RoundPolicy(deadline=300.0, max_attempts=1), privacy=dp, noise_multiplier=z,
        adaptive=SecureAdaptiveClip(clip, noise_multiplier=z))


def eager_clipped(update: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``update`` L2-clipped to ``clip_norm``, by hand in plain torch."""
    norm = float(update.double().norm())
    return update.double() * min(1.0, clip_norm / norm)


def test_the_server_learns_the_eager_count_of_unclipped_updates_within_the_quantization_error(
    device: DeviceFactory,
) -> None:
    s = make_setup(device, 4, adaptive_clip=True)
    updates = eager_updates(s)
    norms = sorted(float(u.double().norm()) for u in updates.values())
    clip_norm = (norms[2] + norms[3]) / 2  # three of the four updates are not clipped
    run = adaptive_runner(s, clip_norm)
    outcome = run.run_round(1, s.weights)
    assert outcome.committed and outcome.weights is not None
    assert run.last_aggregate is not None and run.adaptive is not None
    metrics = outcome.results[0].metrics
    eager_count = sum(float(u.double().norm()) <= clip_norm for u in updates.values())
    assert eager_count == 3
    scale = SecureAdaptiveClip(AdaptiveClip(clip_norm=clip_norm),
                               noise_multiplier=0.0).scale
    count_error = run.last_aggregate.error_bound / scale  # in units of the count
    assert abs(metrics["unclipped_fraction"] * 4 - eager_count) <= count_error + 1e-9
    assert metrics["clip_norm"] == clip_norm
    expected_norm = clip_norm * math.exp(-0.2 * (metrics["unclipped_fraction"] - 0.5))
    assert run.adaptive.clip_norm == pytest.approx(expected_norm, rel=1e-12)
    assert run.adaptive.clip_norm < clip_norm  # more than half unclipped: C shrinks
    mean = sum(eager_clipped(u, clip_norm) for u in updates.values()) / 4  # weights are 1
    got = flatten(outcome.weights).double() - flatten(s.weights).double()
    assert (got - mean).abs().max().item() <= run.last_aggregate.error_bound / 4 + 1e-6


@EMBEDDED
def test_the_clip_norm_grows_while_every_update_is_larger_and_shrinks_while_all_are_smaller(
    device: DeviceFactory,
) -> None:
    s = make_setup(device, 4, adaptive_clip=True)
    norms = [float(u.double().norm()) for u in eager_updates(s).values()]
    for start, fraction, moves in ((min(norms) / 10, 0.0, 1.0), (max(norms) * 10, 1.0, -1.0)):
        run = adaptive_runner(s, start)
        seen = [start]
        weights = s.weights
        for server_round in (1, 2, 3):
            outcome = run.run_round(server_round, weights)
            assert outcome.weights is not None and run.adaptive is not None
            assert outcome.results[0].metrics["unclipped_fraction"] == pytest.approx(
                fraction, abs=0.01)
            seen.append(run.adaptive.clip_norm)
            weights = outcome.weights
        steps = np.diff(np.log(seen))  # log C moves by -eta * (b - gamma) = +-0.1 a round
        assert np.allclose(steps, moves * 0.2 * 0.5, atol=1e-3), seen


def test_no_message_of_an_adaptive_secure_round_holds_an_update_or_an_indicator(
    device: DeviceFactory, tap: Wiretap
) -> None:
    s = make_setup(device, 4, adaptive_clip=True)
    updates = eager_updates(s)
    norms = sorted(float(u.double().norm()) for u in updates.values())
    clip_norm = (norms[1] + norms[2]) / 2
    run = adaptive_runner(s, clip_norm, z=1.0)
    assert run.adaptive is not None
    scale = run.adaptive.scale
    assert run.run_round(1, s.weights).committed
    config = run.last_config
    assert config is not None and config.noise_sigma > 0
    messages = [m for _, _, m in tap.commands] + tap.replies
    for member in s.members:
        update = updates[member.device_id]
        clipped = eager_clipped(update, clip_norm)
        assert_nowhere([update, clipped, flatten(s.weights) + update], messages,
                       member.device_id)
    masked = [cmd.Reply.FromString(r).ok.secagg.masked for r in tap.replies]
    masked = [m for m in masked if m.vector]
    assert len(masked) == len(s.members)
    q = config.quantization
    mod = 1 << q.modulus_bits
    for message in masked:
        values = unpack_vector(message.vector, config.length + 1, q.modulus_bits)[:-1]
        update = updates[message.device_id]
        bit = float(update.double().norm()) <= clip_norm
        plain = np.append(eager_clipped(update, clip_norm).numpy(), (bit - 0.5) * scale)
        floor = np.floor(plain * 2**q.scale_bits).astype(np.int64) % mod
        hits = (values == floor.astype(np.uint64)) | (
            values == ((floor + 1) % mod).astype(np.uint64))
        assert hits.mean() < 0.05
        assert_indicator_masked(int(values[-1]), scale, config)


def andrew_multiplier(noise_sum: float, clip_norm: float, scale: float) -> float:
    """Andrew et al. 2021 (arXiv:1905.03871): ``(z_delta^-2 + (2 sigma_b)^-2)^-1/2`` for a noise of
    standard deviation ``noise_sum`` on the sum of updates clipped to ``clip_norm``
    (``z_delta = noise / C``) and on the count carried at scale ``scale``
    (``sigma_b = noise / s``)."""
    z_delta = noise_sum / clip_norm
    sigma_b = noise_sum / scale
    return float((z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5)


def reference_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@EMBEDDED
def test_epsilon_after_each_round_is_dp_accountings_for_andrews_effective_multiplier(
    device: DeviceFactory, tap: Wiretap
) -> None:
    s = make_setup(device, 4, adaptive_clip=True)
    dp = DifferentialPrivacy(noise_multiplier=2.0, clip_norm=0.5, target_quantile=0.5,
                             count_stddev=3.0, delta=1e-5)
    job = FederatedJob(participants=s.members, strategy="fedavg",
                       secure_aggregation=SecureAggregation(stage_deadline=300.0),
                       privacy=dp, policy=RoundPolicy(deadline=300.0))
    result = job.run(s.weights, num_rounds=2)
    adverts = [decode_command(m).secagg_advertise.config
               for _, body, m in tap.commands if body == "secagg_advertise"]
    configs = {c.round_id: config_from_proto(c) for c in adverts}
    assert len(configs) == 2
    used: list[Any] = [o.results[0].metrics["clip_norm"] for o in result.outcomes]
    assert used[0] == 0.5 and used[1] != used[0]  # C moved between the rounds
    for (_, config), clip_norm, m in zip(sorted(configs.items()), used, result.history[1:],
                                         strict=True):
        f = 2.0**config.quantization.scale_bits
        noise = config.noise_sigma * math.sqrt(config.min_survivors) / f  # any m survivors
        scale = SecureAdaptiveClip.create(
            DifferentialPrivacy(noise_multiplier=2.0, clip_norm=clip_norm,
                                target_quantile=0.5, count_stddev=3.0),
            noise_multiplier=2.0, expected_devices=4).scale
        z = andrew_multiplier(noise, clip_norm, scale)
        assert z == pytest.approx(2.0, rel=1e-3)
        # stochastic rounding moves a vector by up to sqrt(d + 1) quantized units more:
        # charged on top of the paper's sensitivity sqrt(C^2 + s^2/4)
        bound = math.hypot(clip_norm, scale / 2) * f
        charged = z * bound / (bound + math.sqrt(config.length))
        assert m.epsilon == pytest.approx(reference_epsilon(charged, m.round, 1e-5), rel=1e-6)
        assert m.epsilon >= reference_epsilon(z, m.round, 1e-5)


@EMBEDDED
def test_a_resumed_run_continues_from_the_checkpointed_clip_norm(
    device: DeviceFactory, tmp_path: Path
) -> None:
    s = make_setup(device, 4, adaptive_clip=True)

    def job() -> FederatedJob:
        dp = DifferentialPrivacy(noise_multiplier=1.0, clip_norm=0.5, target_quantile=0.5)
        return FederatedJob(participants=s.members, strategy="fedavg",
                            secure_aggregation=SecureAggregation(stage_deadline=300.0),
                            privacy=dp, policy=RoundPolicy(deadline=300.0),
                            checkpoint_dir=tmp_path)

    first = job().run(s.weights, num_rounds=2)
    last = first.outcomes[-1].results[0].metrics
    saved = load_latest(tmp_path)
    assert saved is not None and saved.round == 2
    stepped = last["clip_norm"] * math.exp(-0.2 * (last["unclipped_fraction"] - 0.5))
    assert saved.metadata["clip_norm"] == pytest.approx(stepped, rel=1e-12)
    resumed = job().run(s.weights, num_rounds=3, resume=True)
    assert [o.server_round for o in resumed.outcomes] == [3]
    assert resumed.outcomes[0].results[0].metrics["clip_norm"] == saved.metadata["clip_norm"]
