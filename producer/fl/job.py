"""A federated training job: rounds, server evaluation, checkpoints, resume and progress."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from producer.fl.aggregate import Weights
from producer.fl.buffered import BufferState, FedBuff, StalenessPolicy
from producer.fl.buffered_runner import BufferedRunner, VersionOutcome
from producer.fl.checkpoint import Checkpoint, load_latest, save_checkpoint
from producer.fl.dp_fedavg import CentralDP, DifferentialPrivacy
from producer.fl.evaluation import DeviceMetrics, EvaluationOutcome, EvaluationRunner
from producer.fl.pace import PaceSteering
from producer.fl.participants import PlanParticipant
from producer.fl.privacy import PrivacyAccountant, PrivacyBudgetExhausted
from producer.fl.progress import RoundMetrics
from producer.fl.rounds import Participant, RoundOutcome, RoundPolicy, RoundRunner
from producer.fl.secure_clip import SecureAdaptiveClip
from producer.fl.secure_rounds import (
    SecureAggregation,
    SecureRoundOutcome,
    SecureRoundRunner,
    secure_accountant,
)
from producer.fl.strategy import FedAvg, Strategy, make_strategy
from producer.fl.tracking import Tracker
from schemas.errors import FedplanError

Evaluate = Callable[[Weights], tuple[float, float]]
"""Server-side evaluation of global weights: ``(loss, accuracy)`` on held-out data."""


@dataclass(slots=True)
class JobResult:
    """The final global weights, one metrics row per round (0 = before training), outcomes.

    ``devices`` holds one :class:`DeviceMetrics` row per device, round and phase (fit,
    evaluate), kept across a resume.
    """

    weights: Weights
    history: list[RoundMetrics]
    outcomes: list[RoundOutcome] = field(default_factory=list)
    resumed_from: int = 0
    devices: list[DeviceMetrics] = field(default_factory=list)
    arrivals: list[list[Any]] = field(default_factory=list)
    """FedBuff: ``[task number, kind]`` per event in the order processed (the arrival log)."""
    stopped: str = ""
    """Why the run stopped before ``num_rounds`` (the ε budget), else empty."""
    delta: float = float("nan")
    """The δ of the run's (ε, δ) guarantee (NaN: no differential privacy)."""


@dataclass(slots=True)
class _Clock:
    """Wall-clock bookkeeping of a run: time since start (plus resumed time), per round."""

    offset: float = 0.0
    start: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def lap(self) -> tuple[float, float]:
        """``(seconds since the last lap, seconds elapsed in the whole job)``."""
        now = time.monotonic()
        since, self.last = now - self.last, now
        return since, self.offset + now - self.start


@dataclass(kw_only=True, slots=True)
class FederatedJob:
    """Runs ``num_rounds`` committed rounds; after each, evaluates and checkpoints.

    ``strategy`` is a :class:`Strategy` or the name of a registered one
    (``producer.fl.strategy.STRATEGIES``: ``"fedavg"``, ``"fedprox"``, ``"fedadam"``), built
    from ``strategy_options`` (``proximal_mu``, ``server_lr``). ``settings`` describes the
    job (model, data, strategy, seeds); it is stored in every checkpoint and a resume with
    different settings is refused.

    ``evaluate`` is server-side evaluation on held-out data (optional); with
    ``evaluate_on_devices`` the devices that hold ``test`` data evaluate each round's global
    weights themselves (:mod:`producer.fl.evaluation`) and the strategy weighs their
    results into ``device_loss`` / ``device_accuracy``. ``trackers`` receive every round's
    metrics and device rows (TensorBoard, MLflow: :mod:`producer.fl.tracking`). ``pace``
    keeps offline and backlogged devices out of sampling (:mod:`producer.fl.pace`).

    ``mode="fedbuff"`` (or ``strategy="fedbuff"``) runs buffered asynchronous aggregation
    instead of rounds (:mod:`producer.fl.buffered`): ``concurrency`` devices train at once,
    every ``buffer_size`` updates fold into a new model version, weighted by ``staleness``;
    ``num_rounds`` then counts versions, each evaluated and checkpointed like a round, and
    ``arrival_log`` replays another run's arrival order (``JobResult.arrivals``).
    ``secure_aggregation`` (:class:`~producer.fl.secure_rounds.SecureAggregation`) runs every
    round as SecAgg+ over the participants, which must be
    :class:`~producer.fl.participants.PlanParticipant` devices holding update plans
    (:func:`~producer.fl.secure_training.build_update_plan`): the server only learns the sum.
    ``privacy`` (:class:`~producer.fl.dp_fedavg.DifferentialPrivacy`) makes it DP-FedAvg:
    noise on the server (:class:`~producer.fl.dp_fedavg.CentralDP`), or on the devices with
    secure aggregation; every round's ε at δ is in the metrics, and the run stops before a
    round that would pass ``target_epsilon`` (``JobResult.stopped`` says so).

    Examples
    --------
    >>> import torch
    >>> job = FederatedJob(participants=[], strategy="fedavg", evaluate=lambda w: (0.0, 1.0))
    >>> job.run({"w": torch.zeros(1)}, num_rounds=0).history[0].test_accuracy
    1.0
    """

    participants: Sequence[Participant]
    strategy: Strategy | str
    evaluate: Evaluate | None = None
    evaluate_on_devices: bool = False
    evaluation_deadline: float | None = None
    trackers: Sequence[Tracker] = ()
    pace: PaceSteering | None = None
    strategy_options: dict[str, float] = field(default_factory=dict)
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    seed: int = 0
    checkpoint_dir: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    on_round: Callable[[RoundMetrics], None] | None = None
    mode: str = "sync"
    buffer_size: int = 8
    concurrency: int | None = None
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)
    arrival_log: Sequence[Sequence[object]] = ()
    secure_aggregation: SecureAggregation | None = None
    privacy: DifferentialPrivacy | None = None
    accountant: PrivacyAccountant | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "fedbuff"):
            raise ValueError(f"mode is 'sync' or 'fedbuff', got {self.mode!r}")
        if self.strategy == "fedbuff":
            self.mode = "fedbuff"
        if self.mode == "fedbuff" and not isinstance(self.strategy, FedBuff):
            if self.strategy not in ("fedavg", "fedbuff") and type(self.strategy) is not FedAvg:
                raise FedplanError(
                    f"mode='fedbuff' folds updates with FedBuff; strategy {self.strategy!r} "
                    "cannot run asynchronously (pass strategy='fedbuff' or 'fedavg')"
                )
            options = {  # the job's fields, unless strategy_options name them
                "buffer_size": self.buffer_size,
                "concurrency": self.concurrency or 0,
                "staleness_exponent": self.staleness.exponent,
                **self.strategy_options,
            }
            if "max_staleness" not in options and self.staleness.max_staleness is not None:
                options["max_staleness"] = self.staleness.max_staleness
            self.strategy = FedBuff.from_options(options)
        if isinstance(self.strategy, str):
            self.strategy = make_strategy(self.strategy, **self.strategy_options)
        if isinstance(self.strategy, FedBuff):
            self.mode = "fedbuff"
        if self.mode == "fedbuff" and (
            self.secure_aggregation is not None or self.privacy is not None
        ):
            raise FedplanError(
                "FedBuff folds single updates as they arrive; secure aggregation and DP-FedAvg "
                "need a round's sum — run them with mode='sync'"
            )

    def _runner(self, weights: Weights, num_rounds: int) -> RoundRunner | SecureRoundRunner:
        """The round runner: plain, central DP, or secure (with distributed DP)."""
        n = len(self.participants)
        sampled = max(1, self.policy.selected(n)) if n else 1
        dp = self.privacy
        if self.secure_aggregation is not None:
            if not all(isinstance(p, PlanParticipant) for p in self.participants):
                raise FedplanError(
                    "secure aggregation runs on fleet devices: pass PlanParticipant devices "
                    "whose plans come from build_update_plan"
                )
            sampled = max(2, sampled)
            z = 0.0
            adaptive = None
            if dp is not None:
                dim = sum(t.numel() for t in weights.values())
                z, self.accountant = secure_accountant(
                    dp, self.secure_aggregation, devices=max(n, 1), sampled=sampled,
                    dimension=dim, rounds=num_rounds)
                if dp.target_quantile is not None:  # the count rides in the secure sum
                    adaptive = SecureAdaptiveClip.create(dp, noise_multiplier=z,
                                                         expected_devices=sampled)
            return SecureRoundRunner(
                [p for p in self.participants if isinstance(p, PlanParticipant)],
                self._strategy, self.secure_aggregation, self.policy, privacy=dp,
                noise_multiplier=z, seed=self.seed, pace=self.pace, adaptive=adaptive,
            )
        strategy = self._strategy
        if isinstance(strategy, CentralDP):  # a second run() keeps the first one's wrapper
            strategy = strategy.inner
        if dp is not None:
            rate = sampled / max(n, 1)
            z = dp.calibrated(sampling_rate=rate, rounds=num_rounds)
            self.accountant = dp.accountant(sampling_rate=rate, rounds=num_rounds,
                                            noise_multiplier=z)
            strategy = CentralDP(strategy, noise_multiplier=z, clip_norm=dp.clip_norm,
                                 expected_devices=sampled, target_quantile=dp.target_quantile,
                                 clip_learning_rate=dp.clip_learning_rate,
                                 count_stddev=dp.count_stddev)
            self.strategy = strategy
        return RoundRunner(self.participants, strategy, self.policy, seed=self.seed,
                           pace=self.pace)

    @property
    def _strategy(self) -> Strategy:
        assert isinstance(self.strategy, Strategy)  # a name is resolved in __post_init__
        return self.strategy

    def run(self, weights: Weights, num_rounds: int, *, resume: bool = False) -> JobResult:
        """Train from ``weights`` (or from the last checkpoint when ``resume``)."""
        if isinstance(self.strategy, FedBuff):
            return self._run_buffered(self.strategy, weights, num_rounds, resume)
        runner = self._runner(weights, num_rounds)
        weights, history, devices = (
            self._resume(weights, runner) if resume else (weights, [], []))
        adaptive = runner.adaptive if isinstance(runner, SecureRoundRunner) else None
        first = history[-1].round + 1 if history else 1
        clock = _Clock()
        if not history:
            history.append(self._initial_metrics(weights, devices))
        clock.offset, clock.last = history[-1].elapsed_seconds, time.monotonic()
        outcomes: list[RoundOutcome] = []
        stopped = ""
        if self.accountant is not None:
            self.accountant.rounds = first - 1
        for server_round in range(first, num_rounds + 1):
            if self.accountant is not None and self.privacy is not None and (
                self.privacy.target_epsilon is not None
            ):
                try:
                    self.accountant.check_budget(epsilon=self.privacy.target_epsilon)
                except PrivacyBudgetExhausted as exc:
                    stopped = str(exc)
                    break
            outcome = runner.run_round(server_round, weights)
            if self.accountant is not None:
                self.accountant.step()
            assert outcome.weights is not None
            weights = outcome.weights
            outcomes.append(outcome)
            rows = outcome.device_rows()
            history.append(self._round_metrics(outcome, weights, clock, rows))
            devices.extend(rows)
            extra = {"clip_norm": adaptive.clip_norm} if adaptive is not None else None
            self._save_checkpoint(server_round, weights, history, devices, extra)
            self._report(history[-1], rows)
        for tracker in self.trackers:
            tracker.close()
        delta = self.privacy.delta if self.privacy is not None else float("nan")
        return JobResult(weights, history, outcomes, resumed_from=first - 1, devices=devices,
                         stopped=stopped, delta=delta)

    def _run_buffered(
        self, strategy: FedBuff, weights: Weights, versions: int, resume: bool
    ) -> JobResult:
        """FedBuff: fold updates until model version ``versions``; one metrics row each."""
        state, history, devices = BufferState(), [], []
        ck = self._load_checkpoint() if resume else None
        if ck is not None:
            state = BufferState.restore(ck.metadata["fedbuff"], ck.strategy_state, list(ck.weights))
            weights = ck.weights
            history = [RoundMetrics.from_dict(row) for row in ck.metadata["history"]]
            devices = [DeviceMetrics(**row) for row in ck.metadata.get("devices", [])]
        clock = _Clock()
        if not history:
            history.append(self._initial_metrics(weights, devices))
        clock.offset, clock.last = history[-1].elapsed_seconds, time.monotonic()
        first = state.version

        def on_version(outcome: VersionOutcome, new: Weights, st: BufferState) -> None:
            loss, acc = self._server_evaluation(new)
            metrics = RoundMetrics(
                round=outcome.version,
                participants=strategy.buffer_size,
                failures=outcome.failures,
                train_loss=outcome.train_loss(),
                test_loss=loss,
                test_accuracy=acc,
                round_seconds=0.0,
                elapsed_seconds=0.0,
                mean_staleness=outcome.mean_staleness(),
                stale_dropped=outcome.stale_dropped,
            )
            rows = list(outcome.rows)
            federated = self._device_evaluation(outcome.version, new)
            if federated is not None:
                rows.extend(federated.device_rows())
                metrics = _with_federated(metrics, federated)
            since, elapsed = clock.lap()
            history.append(replace(metrics, round_seconds=since, elapsed_seconds=elapsed))
            devices.extend(rows)
            extra = {"fedbuff": st.to_metadata()}
            self._save_checkpoint(st.version, new, history, devices, extra, st.tensors())
            self._report(history[-1], rows)

        runner = BufferedRunner(
            self.participants,
            strategy,
            deadline=self.policy.deadline,
            seed=self.seed,
            pace=self.pace,
            replay=self.arrival_log,
            state=state,
        )
        weights = runner.run(weights, versions, on_version)
        for tracker in self.trackers:
            tracker.close()
        return JobResult(
            weights, history, resumed_from=first, devices=devices, arrivals=state.arrivals
        )

    def _resume(
        self, weights: Weights, runner: RoundRunner | SecureRoundRunner | None = None
    ) -> tuple[Weights, list[RoundMetrics], list[DeviceMetrics]]:
        """Weights and history from the last checkpoint (strategy state and a secure run's
        adaptive clip norm restored), if any."""
        ck = self._load_checkpoint()
        if ck is None:
            return weights, [], []
        self._strategy.load_state_dict(ck.strategy_state)
        if isinstance(runner, SecureRoundRunner) and runner.adaptive is not None and (
            "clip_norm" in ck.metadata
        ):
            runner.adaptive.restore(float(ck.metadata["clip_norm"]))
        history = [RoundMetrics.from_dict(row) for row in ck.metadata["history"]]
        devices = [DeviceMetrics(**row) for row in ck.metadata.get("devices", [])]
        return ck.weights, history, devices

    def _server_evaluation(self, weights: Weights) -> tuple[float, float]:
        return self.evaluate(weights) if self.evaluate else (float("nan"), float("nan"))

    def _device_evaluation(self, server_round: int, weights: Weights) -> EvaluationOutcome | None:
        if not self.evaluate_on_devices:
            return None
        deadline = self.evaluation_deadline or self.policy.deadline
        runner = EvaluationRunner(self.participants, self._strategy, deadline)
        only = None
        if self.pace is not None:  # offline or backlogged devices are not asked either
            only, _ = self.pace.eligible([p.device_id for p in self.participants])
        return runner.run(server_round, weights, only=only)

    def _initial_metrics(self, weights: Weights, devices: list[DeviceMetrics]) -> RoundMetrics:
        """Round 0: the starting weights evaluated before any training."""
        loss, acc = self._server_evaluation(weights)
        metrics = RoundMetrics(0, 0, 0, float("nan"), loss, acc, 0.0, 0.0)
        federated = self._device_evaluation(0, weights)
        rows: list[DeviceMetrics] = []
        if federated is not None:
            metrics = _with_federated(metrics, federated)
            rows = federated.device_rows()
            devices.extend(rows)
        self._report(metrics, rows)
        return metrics

    def _round_metrics(
        self, outcome: RoundOutcome, weights: Weights, clock: _Clock, rows: list[DeviceMetrics]
    ) -> RoundMetrics:
        """Evaluate a committed round's weights into its metrics row (device rows appended)."""
        loss, acc = self._server_evaluation(weights)
        federated = self._device_evaluation(outcome.server_round, weights)
        round_seconds, elapsed = clock.lap()
        metrics = RoundMetrics(
            round=outcome.server_round,
            participants=(len(outcome.survivors) if isinstance(outcome, SecureRoundOutcome)
                          else len(outcome.results)),
            failures=len(outcome.failures),
            train_loss=outcome.train_loss(),
            test_loss=loss,
            test_accuracy=acc,
            round_seconds=round_seconds,
            elapsed_seconds=elapsed,
            attempts=outcome.attempt,
            epsilon=self.accountant.epsilon() if self.accountant is not None else float("nan"),
        )
        if federated is None:
            return metrics
        rows.extend(federated.device_rows())
        return _with_federated(metrics, federated)

    def _save_checkpoint(
        self,
        server_round: int,
        weights: Weights,
        history: list[RoundMetrics],
        devices: list[DeviceMetrics],
        extra: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        if self.checkpoint_dir is None:
            return
        metadata = {
            **(extra or {}),
            "history": [asdict(m) for m in history],
            "devices": [asdict(d) for d in devices],
            "seed": self.seed,
            "settings": self.settings,
            "strategy": self._strategy.name,
        }
        save_checkpoint(
            self.checkpoint_dir,
            Checkpoint(
                server_round,
                weights,
                self._strategy.state_dict() if state is None else state,
                metadata,
            ),
        )

    def _report(self, m: RoundMetrics, rows: Sequence[DeviceMetrics] = ()) -> None:
        for tracker in self.trackers:
            tracker.log_round(m, rows)
        if self.on_round is not None:
            self.on_round(m)

    def _load_checkpoint(self) -> Checkpoint | None:
        if self.checkpoint_dir is None:
            raise FedplanError("resume needs a checkpoint directory; pass checkpoint_dir")
        ck = load_latest(self.checkpoint_dir)
        if ck is None:
            return None
        saved = ck.metadata.get("settings", {})
        if saved != self.settings or ck.metadata.get("seed") != self.seed:
            raise FedplanError(
                f"the checkpoint in {self.checkpoint_dir} belongs to another job "
                f"(settings {saved}, seed {ck.metadata.get('seed')}); resume with the same "
                "settings, or start without --resume / with a new checkpoint directory"
            )
        return ck


def _with_federated(metrics: RoundMetrics, federated: EvaluationOutcome) -> RoundMetrics:
    """``metrics`` with the round's federated evaluation filled in."""
    summary = federated.summary
    return replace(
        metrics,
        device_loss=summary.loss,
        device_accuracy=summary.accuracy,
        device_examples=summary.num_examples,
    )
