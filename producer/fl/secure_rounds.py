"""Secure-aggregation rounds (SecAgg+) over the transport: the server never sees an update.

Each sampled device runs the update plan
(:func:`~producer.fl.secure_training.build_update_plan`) on its own data; the
update ``w_k - w`` stays on the device as a private value. The runner then drives the four
SecAgg+ steps as wire commands (``secagg_advertise``, ``secagg_share``, ``secagg_mask``,
``secagg_unmask``), each stage closing when every asked device answered or at the stage
deadline; a device that misses a stage is dropped. The server's state machine
(:class:`~producer.fl.secure_aggregation.SecureAggregationRound`) unmasks only the sum of at
least ``min_survivors`` masked inputs (up to a third of the devices may drop), or fails the
round with a typed :class:`~consumer.secagg.errors.SecAggError` before anything is unmasked.
Every device gets ``secagg_end`` afterwards (its state and stored update are deleted).

Weights: without DP each device weighs its example count (FedAvg); with DP every device
weighs 1, clips its update to ``clip_norm`` and adds its share of distributed discrete
Gaussian noise, and the sum is divided by the number of sampled devices (McMahan et al.'s
fixed-denominator estimator) so that one device changes the mean by at most
``clip_norm / n``. With adaptive clipping (``target_quantile``) the update plans clip and
append the unclipped indicator, summed with the updates (:mod:`producer.fl.secure_clip`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from consumer.secagg.errors import SecAggError, SecAggProtocolError, SecAggThresholdError
from consumer.secagg.graph import (
    DEFAULT_FAILURE_PROBABILITY,
    dropout_failure_probability,
    safe_degree,
)
from consumer.secagg.messages import RoundConfig
from consumer.secagg.quantize import QuantizationParams
from consumer.secagg.wire_codec import (
    config_to_proto,
    mask_request_to_proto,
    reply_from_proto,
    share_request_to_proto,
    unmask_request_to_proto,
)
from producer.fl.aggregate import Weights
from producer.fl.dp_fedavg import DifferentialPrivacy
from producer.fl.evaluation import DeviceMetrics
from producer.fl.pace import PaceSteering
from producer.fl.participants import PlanParticipant
from producer.fl.privacy import PrivacyAccountant, secure_noise_plan
from producer.fl.rounds import RoundOutcome, RoundPolicy, sample_devices
from producer.fl.secure_aggregation import SecureAggregate, SecureAggregationRound
from producer.fl.secure_clip import SecureAdaptiveClip
from producer.fl.strategy import FitFailure, FitResult, Strategy
from producer.fl.training import flatten, sample_order, unflatten
from producer.remote.collector import PendingCommand
from schemas import command_pb2 as cmd
from schemas.errors import FedplanError

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True, kw_only=True)
class SecureAggregation:
    """SecAgg+ settings of a job (Bonawitz et al. 2017; Bell et al. 2020).

    Parameters
    ----------
    neighbours
        ``k`` of the k-regular neighbour graph (SecAgg+); ``None`` (default): the smallest
        ``k`` for which ``max_dropout`` of the sampled devices dropping fails the round with
        probability at most ``failure_probability`` (:func:`~consumer.secagg.graph.
        safe_degree`; the complete graph for small rounds); ``"complete"``: always complete.
    threshold_fraction
        Shamir threshold ``t = floor(fraction * k) + 1`` shares of a device's secrets out of
        its ``k`` neighbours; ``None``: a majority, ``floor(k/2) + 1``.
    max_dropout
        The fraction of sampled devices that may drop after masking (default a third):
        ``min_survivors = n - floor(n * max_dropout)``.
    clip
        Without DP: each coordinate of an update is clipped to ``[-clip, clip]`` before
        quantization. With DP the range is the DP clip norm.
    quantization_bits
        Fractional bits ``f`` of the fixed-point encoding (resolution ``2^-f`` per unit of
        weight); the modulus is chosen to hold the weighted sum and checked for overflow.
    max_weight
        The largest weight a device may have (without DP: its example count); ``None``:
        the largest example count among the participants.
    stage_deadline
        Seconds each of the four stages waits for replies (``None``: the round policy's
        deadline).
    failure_probability
        With ``neighbours=None``: the bound on the chance that ``max_dropout`` dropping
        (uniformly at random) leaves a device's secret short of ``t`` shares.

    The server draws each round's graph seed at random (32 bytes); every device derives the
    graph from it, ``k`` and the device list.

    Examples
    --------
    >>> s = SecureAggregation(neighbours=4)
    >>> cfg = s.round_config("r", [f"d{i}" for i in range(9)], length=3, max_weight=10)
    >>> cfg.threshold, cfg.min_survivors, len(cfg.neighbours["d0"])
    (3, 6, 4)
    >>> SecureAggregation().degree(100), SecureAggregation().degree(8)  # safe at a third
    (67, 5)
    """

    neighbours: int | Literal["complete"] | None = None
    threshold_fraction: float | None = None
    max_dropout: float = 1 / 3
    clip: float = 1.0
    quantization_bits: int = 16
    max_weight: int | None = None
    stage_deadline: float | None = None
    failure_probability: float = DEFAULT_FAILURE_PROBABILITY

    def __post_init__(self) -> None:
        if self.neighbours == "complete":
            pass
        elif self.neighbours is not None and (
            not isinstance(self.neighbours, int) or self.neighbours < 2
        ):
            raise ValueError(f"neighbours (k) must be >= 2, got {self.neighbours}")
        if self.threshold_fraction is not None and not 0 < self.threshold_fraction < 1:
            raise ValueError(f"threshold_fraction must be in (0, 1), got {self.threshold_fraction}")
        if not 0 <= self.max_dropout < 1:
            raise ValueError(f"max_dropout must be in [0, 1), got {self.max_dropout}")
        if self.stage_deadline is not None and self.stage_deadline <= 0:
            raise ValueError("stage_deadline must be > 0")
        if not 0 < self.failure_probability < 1:
            raise ValueError("failure_probability must be in (0, 1)")

    def min_survivors(self, n: int) -> int:
        """The fewest masked inputs a sum of ``n`` sampled devices may cover."""
        return n - math.floor(n * self.max_dropout)

    def degree(self, n: int) -> int:
        """The number of neighbours of each device in a round of ``n`` (``n - 1``: complete)."""
        if self.neighbours == "complete":
            return n - 1
        if self.neighbours is None:
            return safe_degree(n, max_dropout=self.max_dropout,
                               failure_probability=self.failure_probability,
                               threshold_of=self.threshold)
        return min(self.neighbours + (self.neighbours % 2) * (n % 2), n - 1)

    def threshold(self, degree: int) -> int:
        """Shamir's ``t`` for a neighbourhood of ``degree`` devices."""
        if self.threshold_fraction is None:
            return degree // 2 + 1
        return min(degree, math.floor(self.threshold_fraction * degree) + 1)

    def dropout_failure_probability(self, n: int) -> float:
        """The chance (union bound) that ``max_dropout`` of ``n`` dropping fails the round."""
        k = self.degree(n)
        return dropout_failure_probability(n, k, max_dropout=self.max_dropout,
                                           threshold=self.threshold(k))

    def round_config(
        self,
        round_id: str,
        devices: Sequence[str],
        *,
        length: int,
        max_weight: int,
        quantization: QuantizationParams | None = None,
        noise_sigma: float = 0.0,
    ) -> RoundConfig:
        """The public config of one round among ``devices``."""
        n = len(devices)
        degree = self.degree(n)
        q = quantization or QuantizationParams(
            clip=self.clip, scale_bits=self.quantization_bits, max_weight=max_weight,
            num_clients=n,
        )
        return RoundConfig.create(
            round_id, devices, length=length, quantization=q,
            k=degree if degree < n - 1 else None, graph_seed=os.urandom(32),
            threshold=self.threshold(degree), max_dropout=self.max_dropout,
            noise_sigma=noise_sigma,
        )


@dataclass(slots=True)
class SecureRoundOutcome(RoundOutcome):
    """A secure round's outcome: ``results`` holds the one aggregate the server learned;
    ``survivors`` the devices whose masked input the sum covers (with their example counts,
    which the server chose as their weights)."""

    survivors: dict[str, int] = field(default_factory=dict)

    def device_rows(self) -> list[DeviceMetrics]:
        """One ``fit`` row per device asked: ``ok`` (in the sum; its loss stays private) or
        why it dropped."""
        rows = [
            DeviceMetrics(self.server_round, d, "fit", "ok", n, attempt=self.attempt)
            for d, n in sorted(self.survivors.items())
        ]
        rows += [
            DeviceMetrics(self.server_round, f.device_id, "fit", f.kind, attempt=self.attempt,
                          error=f.message)
            for f in self.failures
        ]
        rows += [
            DeviceMetrics(self.server_round, d, "fit", "skipped", attempt=self.attempt, error=why)
            for d, why in self.skipped.items()
        ]
        return rows


@dataclass(slots=True)
class _Stage:
    """The replies of one stage: messages by device, and why the others dropped."""

    messages: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SecureRoundRunner:
    """Runs secure-aggregation rounds over :class:`PlanParticipant` devices.

    The same interface as :class:`~producer.fl.rounds.RoundRunner` (``run_round``); built
    by :class:`~producer.fl.job.FederatedJob` when it has ``secure_aggregation``. The
    participants' plans must come from :func:`~producer.fl.secure_training.build_update_plan`
    (with ``adaptive_clip=True`` when ``adaptive`` is set: each round's result then carries
    the noised unclipped fraction and the clip norm used in its metrics).
    """

    participants: Sequence[PlanParticipant]
    strategy: Strategy
    secure: SecureAggregation
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    privacy: DifferentialPrivacy | None = None
    noise_multiplier: float = 0.0
    seed: int = 0
    pace: PaceSteering | None = None
    adaptive: SecureAdaptiveClip | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    on_stage: Callable[[str, Mapping[str, Any]], None] | None = None
    """Called with each stage's name and replies (tests and tracing)."""
    last_aggregate: SecureAggregate | None = None
    last_config: RoundConfig | None = None

    def run_round(self, server_round: int, weights: Weights) -> RoundOutcome:
        """One round: attempts until one commits; the last attempt's error otherwise."""
        last: RoundOutcome | None = None
        error: FedplanError | None = None
        for attempt in range(1, self.policy.max_attempts + 1):
            last, error = self._attempt(server_round, attempt, weights)
            if last.committed:
                return last
        assert last is not None
        cls = type(error) if isinstance(error, SecAggError) else SecAggError
        raise cls(
            f"secure round {server_round} failed {self.policy.max_attempts} times (last: "
            f"{last.reason}); nothing was unmasked. Lower max_dropout's risk with more "
            "devices, raise the stage deadline, or check the devices"
        )

    def run_attempt(self, server_round: int, attempt: int, weights: Weights) -> RoundOutcome:
        """One attempt of a secure round (its error, if any, is in ``reason``)."""
        return self._attempt(server_round, attempt, weights)[0]

    def _attempt(
        self, server_round: int, attempt: int, weights: Weights
    ) -> tuple[RoundOutcome, FedplanError | None]:
        start = time.monotonic()
        eligible, skipped = self._eligible()
        available = len(eligible)
        if available < max(2, self.policy.min_available):
            raise FedplanError(
                f"{available} devices are available; a secure round needs at least "
                f"{max(2, self.policy.min_available)}"
            )
        picked = sample_devices(
            [self.participants[i].device_id for i in eligible],
            max(2, self.policy.selected(available)),
            seed=self.seed, server_round=server_round, attempt=attempt,
        )
        chosen = [eligible[i] for i in picked]
        parts = {self.participants[i].device_id: (i, self.participants[i]) for i in chosen}
        outcome = SecureRoundOutcome(server_round, attempt, list(parts), [], [], None,
                                     skipped=skipped)
        round_id = f"{self.run_id}-r{server_round}a{attempt}"
        flat = flatten(weights)
        config = self._config(round_id, sorted(parts), flat.numel() + bool(self.adaptive))
        self.last_config = config
        instructions = self.strategy.configure_fit(server_round, weights)
        updates: dict[str, Any] = {}
        error: FedplanError | None = None
        stage = _Stage()
        try:
            stage = self._train_and_advertise(server_round, parts, instructions, flat,
                                              config, updates)
            server = SecureAggregationRound(config)
            share_requests = server.collect_adverts(stage.messages.values())
            stage = self._stage("shares", {
                d: ("secagg_share", share_request_to_proto(r)) for d, r in share_requests.items()
            }, stage)
            mask_requests = server.collect_shares(stage.messages.values())
            for device_id in list(mask_requests):
                try:  # a device whose training failed has nothing to mask: it drops
                    updates[device_id].raise_if_failed()
                except Exception as exc:
                    del mask_requests[device_id]
                    stage.dropped[device_id] = f"{type(exc).__name__}: {exc}"
            weights_of = {d: self._weight(parts[d][1]) for d in mask_requests}
            stage = self._stage("masked", {
                d: ("secagg_mask", mask_request_to_proto(
                    r, input_id=updates[d].id, weight=weights_of[d]))
                for d, r in mask_requests.items()
            }, stage, clip_norm=self._clip_norm())
            unmask_requests = server.collect_masked_inputs(stage.messages.values())
            stage = self._stage("unmask", {
                d: ("secagg_unmask", unmask_request_to_proto(r))
                for d, r in unmask_requests.items()
            }, stage)
            aggregate = server.collect_unmask_responses(stage.messages.values())
        except FedplanError as exc:
            error = exc
            outcome.reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._end(round_id, parts, updates)
        outcome.failures = [
            FitFailure(d, "dropped", why) for d, why in sorted(stage.dropped.items())
        ]
        outcome.seconds = time.monotonic() - start
        if error is not None:
            return outcome, error
        self.last_aggregate = aggregate
        survivors = len(aggregate.survivors)
        outcome.survivors = {d: parts[d][1].num_examples for d in aggregate.survivors}
        metrics = {"survivors": float(survivors)}
        if self.adaptive is not None:
            metrics["clip_norm"] = self.adaptive.clip_norm
            summed, metrics["unclipped_fraction"] = self.adaptive.commit(
                aggregate.weighted_sum, survivors=survivors)
            mean = torch.as_tensor(summed) / len(parts)
        elif self.privacy is not None:
            mean = torch.as_tensor(aggregate.weighted_sum) / len(parts)
        else:
            mean = torch.as_tensor(aggregate.mean())
        new = unflatten((flat.double() + mean).float(), weights)
        result = FitResult("secure-aggregate", new, aggregate.total_weight, metrics)
        outcome.results = [result]
        outcome.weights = self.strategy.aggregate_fit(server_round, weights, [result], [])
        if outcome.weights is None:
            outcome.reason = f"{self.strategy.name} refused the round's results"
        return outcome, None

    # -- stages -------------------------------------------------------------------------

    def _train_and_advertise(
        self,
        server_round: int,
        parts: Mapping[str, tuple[int, PlanParticipant]],
        instructions: Any,
        flat: torch.Tensor,
        config: RoundConfig,
        updates: dict[str, Any],
    ) -> _Stage:
        """Run the update plan on every device (its update stays there), then step 1.

        A device runs its commands in order, so its advert comes after its training."""
        mu = instructions.config.get("proximal_mu", 0.0)
        clip = [self.adaptive.argument()] if self.adaptive is not None else []
        pending: dict[str, PendingCommand] = {}
        stage = _Stage()
        proto = config_to_proto(config)
        for device_id, (index, part) in parts.items():
            try:
                if part.proximal_mu is not None and mu != part.proximal_mu:
                    raise FedplanError(f"the plan of {device_id!r} was built with "
                                       f"proximal_mu={part.proximal_mu}, the strategy asks {mu}")
                if getattr(part.plan, "adaptive_clip", False) != bool(clip):
                    raise FedplanError(f"the update plan of {device_id!r} must be built with "
                                       f"adaptive_clip={bool(clip)} for this job's privacy")
                order = sample_order(part.num_examples, 1000 * server_round + index, part.epochs)
                part.device.send_plan(part.plan, wait=False)
                update, _loss = part.device.run_plan(  # no output rides in the reply
                    part.plan, [part.x, part.y, order, flat, *clip], inline_limit=0)
                updates[device_id] = update
                pending[device_id] = part.device.fleet.submit(
                    device_id, "secagg_advertise", cmd.SecAggAdvertise(config=proto))
            except Exception as exc:  # a device that cannot even be asked has dropped
                stage.dropped[device_id] = f"{type(exc).__name__}: {exc}"
        return self._replies("adverts", pending, stage)

    def _stage(
        self,
        name: str,
        commands: Mapping[str, tuple[str, Any]],
        previous: _Stage,
        *,
        clip_norm: float = 0.0,
    ) -> _Stage:
        """Send one stage's commands and collect the replies until the stage deadline."""
        stage = _Stage(dropped=dict(previous.dropped))
        for device_id in set(previous.messages) - set(commands):
            stage.dropped.setdefault(device_id, f"left out of the {name} stage by the server")
        pending: dict[str, PendingCommand] = {}
        for device_id, (body, msg) in commands.items():
            if clip_norm:
                msg.clip_norm = clip_norm
            device = next(p.device for p in self.participants if p.device_id == device_id)
            try:
                pending[device_id] = device.fleet.submit(device_id, body, msg)
            except Exception as exc:
                stage.dropped[device_id] = f"{type(exc).__name__}: {exc}"
        return self._replies(name, pending, stage)

    def _replies(self, name: str, pending: dict[str, PendingCommand], stage: _Stage) -> _Stage:
        replies = self._gather(pending, self._deadline(), stage)
        for device_id, reply in replies.items():
            try:
                message = reply_from_proto(reply.ok.secagg)
                if message.device_id != device_id:  # a device speaks for itself only
                    raise SecAggProtocolError(
                        f"device {device_id!r} answered as {message.device_id!r}",
                        device_id=device_id,
                    )
                stage.messages[device_id] = message
            except FedplanError as exc:
                stage.dropped[device_id] = f"{type(exc).__name__}: {exc}"
        if self.on_stage is not None:
            self.on_stage(name, dict(stage.messages))
        return stage

    def _gather(
        self, pending: Mapping[str, PendingCommand], deadline: float, stage: _Stage
    ) -> dict[str, cmd.Reply]:
        """The replies that arrived by ``deadline``; the rest are recorded as dropped."""
        wait(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
        out: dict[str, cmd.Reply] = {}
        for device_id, future in pending.items():
            if not future.done():
                stage.dropped[device_id] = "no reply before the stage deadline"
                continue
            try:
                out[device_id] = future.reply(0)
            except Exception as exc:
                stage.dropped[device_id] = f"{type(exc).__name__}: {exc}"
            finally:
                future_id = getattr(future, "command_id", None)
                device = self._device(device_id)
                if future_id and device is not None:
                    device.release(future_id)
        return out

    def _end(self, round_id: str, parts: Mapping[str, tuple[int, PlanParticipant]],
             updates: Mapping[str, Any]) -> None:
        """Tell every device the round is over (best effort; no reply awaited)."""
        for device_id, (_, part) in parts.items():
            update = updates.get(device_id)
            msg = cmd.SecAggEnd(round_id=round_id, input_id=update.id if update is not None else "")
            try:
                done = part.device.fleet.submit(device_id, "secagg_end", msg)
            except Exception as exc:  # the device's state expires on it anyway
                log.warning("could not end round %s on %s: %s", round_id, device_id, exc)
                continue
            done.add_done_callback(_releaser(part.device))

    # -- helpers ------------------------------------------------------------------------

    def _deadline(self) -> float:
        return time.monotonic() + (self.secure.stage_deadline or self.policy.deadline)

    def _device(self, device_id: str) -> Any:
        return next((p.device for p in self.participants if p.device_id == device_id), None)

    def _clip_norm(self) -> float:
        """The L2 bound of a device's vector (0: no DP, no clipping)."""
        if self.adaptive is not None:
            return self.adaptive.vector_norm
        return self.privacy.clip_norm if self.privacy is not None else 0.0

    def _weight(self, part: PlanParticipant) -> int:
        return 1 if self.privacy is not None else part.num_examples

    def _config(self, round_id: str, devices: list[str], length: int) -> RoundConfig:
        n = len(devices)
        if self.privacy is None:
            most = self.secure.max_weight or max(p.num_examples for p in self.participants)
            return self.secure.round_config(round_id, devices, length=length, max_weight=most)
        if self.noise_multiplier <= 0:  # clipping only (tests)
            q = QuantizationParams(clip=self._clip_norm(), scale_bits=self.secure.quantization_bits,
                                   num_clients=n)
            return self.secure.round_config(round_id, devices, length=length, max_weight=1,
                                            quantization=q)
        noise = secure_noise_plan(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self._clip_norm(),
            dimension=length,
            num_clients=n,
            min_survivors=self.secure.min_survivors(n),
            scale_bits=self.secure.quantization_bits,
        )
        return self.secure.round_config(round_id, devices, length=length, max_weight=1,
                                        quantization=noise.quantization,
                                        noise_sigma=noise.device_sigma)

    def _eligible(self) -> tuple[list[int], dict[str, str]]:
        everyone = list(range(len(self.participants)))
        if self.pace is None:
            return everyone, {}
        ok, skipped = self.pace.eligible([p.device_id for p in self.participants])
        allowed = set(ok)
        return [i for i in everyone if self.participants[i].device_id in allowed], skipped


def _releaser(device: Any) -> Callable[[Any], None]:
    """A done-callback that lets the collector forget a command whose reply is not read."""

    def release(future: Any) -> None:
        device.release(future.command_id)

    return release


def secure_accountant(
    privacy: DifferentialPrivacy,
    secure: SecureAggregation,
    *,
    devices: int,
    sampled: int,
    dimension: int,
    rounds: int,
) -> tuple[float, PrivacyAccountant]:
    """The noise multiplier the devices calibrate to, and the accountant of the run.

    The accountant composes the *effective* multiplier of the distributed discrete Gaussian
    (Kairouz et al. 2021; :func:`~producer.fl.privacy.secure_noise_plan`), which is slightly
    below ``z``. With adaptive clipping the vector is ``dimension + 1`` long (the
    indicator) and its L2 bound is ``C'`` (:mod:`producer.fl.secure_clip`): ``z`` covers the
    update and the count together, as Andrew et al. 2021 account them.
    """
    rate = sampled / devices

    def plan(z: float) -> float:
        clip, dim = privacy.clip_norm, dimension
        if privacy.target_quantile is not None:
            clip = SecureAdaptiveClip.create(privacy, noise_multiplier=z,
                                             expected_devices=sampled).vector_norm
            dim += 1
        return secure_noise_plan(
            noise_multiplier=z, clip_norm=clip, dimension=dim, num_clients=sampled,
            min_survivors=secure.min_survivors(sampled), scale_bits=secure.quantization_bits,
        ).effective_noise_multiplier

    z = privacy.calibrated(sampling_rate=rate, rounds=rounds)
    effective = plan(z)
    if effective < z * (1 - 1e-3) and privacy.noise_multiplier is None:
        z = z * z / effective  # raise z so that the effective multiplier meets the budget
        effective = plan(z)
    return z, privacy.accountant(sampling_rate=rate, rounds=rounds,
                                 noise_multiplier=effective)


__all__ = [
    "SecAggThresholdError",
    "SecureAggregation",
    "SecureRoundOutcome",
    "SecureRoundRunner",
    "secure_accountant",
]
