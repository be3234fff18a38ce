"""Federated rounds: sample devices, collect within a deadline, commit on quorum, retry."""

from __future__ import annotations

import math
import queue
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from producer.fl.aggregate import Weights
from producer.fl.evaluation import DeviceMetrics
from producer.fl.pace import PaceSteering
from producer.fl.strategy import FitFailure, FitInstructions, FitResult, Strategy
from schemas.errors import FedplanError


@dataclass(frozen=True, slots=True)
class FitTask:
    """One device's work for one round attempt; ``task_id`` keys its reply.

    ``seed`` fixes the device's sample order: ``1000 * server_round + device_index``.
    """

    task_id: str
    device_id: str
    device_index: int
    server_round: int
    attempt: int
    seed: int
    instructions: FitInstructions


@dataclass(frozen=True, slots=True)
class FitReply:
    """What a participant delivers for a task: a result, or an error message."""

    task_id: str
    device_id: str
    result: FitResult | None = None
    error: str = ""


Deliver = Callable[[FitReply], None]
"""Thread-safe sink for replies; a participant calls it at most once per task."""


class Participant(Protocol):
    """A device the runner can ask to train; the only I/O boundary of the round runner."""

    @property
    def device_id(self) -> str: ...

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        """Start the task and return at once; call ``deliver`` when it ends (or never)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPolicy:
    """How a round samples and when it closes (after the Google FL system design).

    ``target = max(min_fit, ceil(fraction * available))`` replies are wanted; the runner
    asks ``ceil(target * over_selection)`` devices (at most all) and closes the round as soon
    as ``target`` results arrived, when every asked device answered, or at ``deadline``
    seconds. It commits when at least ``ceil(quorum * target)`` results arrived; otherwise
    the round is abandoned and retried, up to ``max_attempts`` times. Fewer than
    ``min_available`` devices stops the job.
    """

    fraction: float = 1.0
    min_fit: int = 1
    min_available: int = 1
    over_selection: float = 1.0
    deadline: float = 60.0
    quorum: float = 1.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.over_selection < 1:
            raise ValueError(f"over_selection must be >= 1, got {self.over_selection}")
        if self.deadline <= 0 or self.max_attempts < 1 or self.min_fit < 1:
            raise ValueError("deadline must be > 0, max_attempts and min_fit >= 1")

    def target(self, available: int) -> int:
        """How many results a round wants."""
        return min(available, max(self.min_fit, math.ceil(self.fraction * available)))

    def selected(self, available: int) -> int:
        """How many devices a round asks."""
        return min(available, math.ceil(self.target(available) * self.over_selection))

    def needed(self, available: int) -> int:
        """How many results commit a round."""
        return max(1, math.ceil(self.quorum * self.target(available)))


def sample_devices(
    device_ids: Sequence[str], count: int, *, seed: int, server_round: int, attempt: int
) -> list[int]:
    """Indices of ``count`` devices drawn without replacement, returned in device order.

    Deterministic in ``(seed, server_round, attempt)`` so that a resumed run samples as an
    uninterrupted one would.

    Examples
    --------
    >>> sample_devices(["a", "b", "c", "d"], 2, seed=0, server_round=1, attempt=1)
    [1, 3]
    """
    rng = random.Random(f"{seed}/{server_round}/{attempt}")
    return sorted(rng.sample(range(len(device_ids)), count))


@dataclass(slots=True)
class RoundOutcome:
    """What one round attempt produced; ``weights`` is ``None`` when it was not committed."""

    server_round: int
    attempt: int
    asked: list[str]
    results: list[FitResult]
    failures: list[FitFailure]
    weights: Weights | None
    late_replies: int = 0
    seconds: float = 0.0
    reason: str = ""
    skipped: dict[str, str] = field(default_factory=dict)
    """Devices pace steering left out of sampling, with the reason (offline, backlogged)."""
    durations: dict[str, float] = field(default_factory=dict)
    """Seconds from sending each device its command to its reply (devices that replied)."""

    @property
    def committed(self) -> bool:
        return self.weights is not None

    def device_rows(self) -> list[DeviceMetrics]:
        """One ``fit`` row per device asked: its example count and loss, or why it failed."""
        rows = [
            DeviceMetrics(
                self.server_round,
                r.device_id,
                "fit",
                "ok",
                r.num_examples,
                r.metrics.get("loss", float("nan")),
                seconds=self.durations.get(r.device_id, float("nan")),
                attempt=self.attempt,
            )
            for r in self.results
        ]
        rows += [
            DeviceMetrics(
                self.server_round,
                f.device_id,
                "fit",
                f.kind,
                seconds=self.durations.get(f.device_id, float("nan")),
                attempt=self.attempt,
                error=f.message,
            )
            for f in self.failures
        ]
        rows += [
            DeviceMetrics(self.server_round, d, "fit", "skipped", attempt=self.attempt, error=why)
            for d, why in self.skipped.items()
        ]
        return rows

    def train_loss(self) -> float:
        """Example-weighted mean of the results' ``loss`` metric (NaN when none reported)."""
        pairs = [(r.metrics["loss"], r.num_examples) for r in self.results if "loss" in r.metrics]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else float("nan")


@dataclass(slots=True)
class RoundRunner:
    """Runs rounds over participants with a strategy and a policy; holds no model code.

    Replies travel through one queue shared by all rounds; each carries the ``task_id`` the
    runner chose, and a reply whose id is not open in the current attempt (a straggler from
    an earlier round or attempt) is counted in ``late_replies`` and ignored.

    With ``pace``, each attempt samples only among the devices pace steering finds online
    and not backlogged (:mod:`producer.fl.pace`); the policy's counts apply to those.
    """

    participants: Sequence[Participant]
    strategy: Strategy
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    seed: int = 0
    pace: PaceSteering | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    late_replies: int = 0
    _replies: queue.Queue[FitReply] = field(default_factory=queue.Queue)
    _sent: dict[str, float] = field(default_factory=dict)
    _durations: dict[str, float] = field(default_factory=dict)

    def _deliver(self, reply: FitReply) -> None:
        self._replies.put(reply)

    def run_round(self, server_round: int, weights: Weights) -> RoundOutcome:
        """One round: attempts until one commits; raises when ``max_attempts`` fail."""
        last: RoundOutcome | None = None
        for attempt in range(1, self.policy.max_attempts + 1):
            last = self.run_attempt(server_round, attempt, weights)
            if last.committed:
                return last
        assert last is not None
        raise FedplanError(
            f"round {server_round} was abandoned {self.policy.max_attempts} times "
            f"(last: {last.reason}); raise the deadline, lower the quorum, or check the devices"
        )

    def run_attempt(self, server_round: int, attempt: int, weights: Weights) -> RoundOutcome:
        """One attempt of a round: sample, send, collect until it closes, aggregate."""
        start = time.monotonic()
        eligible, skipped = self._eligible()
        available = self._available(len(eligible), skipped)
        picked = sample_devices(
            [self.participants[i].device_id for i in eligible],
            self.policy.selected(available),
            seed=self.seed,
            server_round=server_round,
            attempt=attempt,
        )
        chosen = [eligible[i] for i in picked]
        instructions = self.strategy.configure_fit(server_round, weights)
        open_tasks, failures = self._dispatch(server_round, attempt, chosen, instructions)
        late_before = self.late_replies
        self._durations = {}
        target = self.policy.target(available)
        results = self._collect(open_tasks, failures, target, start + self.policy.deadline)
        outcome = RoundOutcome(
            server_round,
            attempt,
            [self.participants[i].device_id for i in chosen],
            [results[i] for i in sorted(results)],
            [failures[i] for i in sorted(failures)],
            None,
            late_replies=self.late_replies - late_before,
            skipped=skipped,
            durations=self._durations,
        )
        self._aggregate(outcome, weights, needed=self.policy.needed(available))
        outcome.seconds = time.monotonic() - start
        return outcome

    def _eligible(self) -> tuple[list[int], dict[str, str]]:
        """Indices of the participants that may be sampled, and the skipped ones' reasons."""
        everyone = list(range(len(self.participants)))
        if self.pace is None:
            return everyone, {}
        ok, skipped = self.pace.eligible([p.device_id for p in self.participants])
        allowed = set(ok)
        return [i for i in everyone if self.participants[i].device_id in allowed], skipped

    def _available(self, available: int, skipped: dict[str, str]) -> int:
        """How many devices can be asked; ``FedplanError`` below the policy's minimum."""
        if available < self.policy.min_available:
            why = "".join(f"; {d}: {r}" for d, r in sorted(skipped.items())[:10])
            raise FedplanError(
                f"{available} devices are available, the policy needs {self.policy.min_available}"
                f"{why}; start more devices or lower min_available"
            )
        return available

    def _dispatch(
        self,
        server_round: int,
        attempt: int,
        chosen: Sequence[int],
        instructions: FitInstructions,
    ) -> tuple[dict[str, int], dict[int, FitFailure]]:
        """Start a fit task on every chosen device: open task ids, and devices that failed."""
        open_tasks: dict[str, int] = {}
        failures: dict[int, FitFailure] = {}
        self._sent = {}
        for index in chosen:
            part = self.participants[index]
            task = FitTask(
                task_id=f"{self.run_id}-r{server_round}a{attempt}-{index}",
                device_id=part.device_id,
                device_index=index,
                server_round=server_round,
                attempt=attempt,
                seed=1000 * server_round + index,
                instructions=instructions,
            )
            open_tasks[task.task_id] = index
            self._sent[task.task_id] = time.monotonic()
            try:
                part.start_fit(task, self._deliver)
            except Exception as exc:  # a device that cannot even be asked is a failure
                del open_tasks[task.task_id]
                message = f"{type(exc).__name__}: {exc}"
                failures[index] = FitFailure(part.device_id, "error", message)
        return open_tasks, failures

    def _collect(
        self,
        open_tasks: dict[str, int],
        failures: dict[int, FitFailure],
        target: int,
        deadline: float,
    ) -> dict[int, FitResult]:
        """Take replies until ``target`` results or the deadline; the rest become failures.

        Replies not open in this attempt are stragglers: counted in ``late_replies``.
        """
        results: dict[int, FitResult] = {}
        while open_tasks and len(results) < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = self._replies.get(timeout=remaining)
            except queue.Empty:
                break
            index = open_tasks.pop(reply.task_id, None)
            if index is None:
                self.late_replies += 1
                continue
            device_id = self.participants[index].device_id  # not the reply's own claim
            self._durations[device_id] = time.monotonic() - self._sent[reply.task_id]
            if reply.result is not None:
                results[index] = reply.result
            else:
                failures[index] = FitFailure(reply.device_id, "error", reply.error)
        for task_id, index in open_tasks.items():
            kind = "timeout" if len(results) < target else "dropped"
            device_id = self.participants[index].device_id
            failures[index] = FitFailure(device_id, kind, f"no reply to {task_id} in time")
        return results

    def _aggregate(self, outcome: RoundOutcome, weights: Weights, *, needed: int) -> None:
        """Commit the strategy's new weights on quorum, or record why the attempt fails."""
        if len(outcome.results) < needed:
            outcome.reason = f"{len(outcome.results)} of {needed} needed results arrived"
            return
        outcome.weights = self.strategy.aggregate_fit(
            outcome.server_round, weights, outcome.results, outcome.failures
        )
        if outcome.weights is None:
            outcome.reason = f"{self.strategy.name} refused the round's results"
