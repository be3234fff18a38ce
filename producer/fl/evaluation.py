"""Federated evaluation: devices evaluate the global weights on their own ``test`` data.

After a committed round, the job can ask every participant that holds test data to run
its evaluation plan (``PlanParticipant``) on the new global weights; each reply is one
:class:`EvaluateResult` (loss, accuracy, example count) and the strategy's
``aggregate_evaluate`` weighs them into the round's federated metrics. Replies travel
through a queue keyed by task id, as in :mod:`producer.fl.rounds`; a device that does not
answer by the deadline is recorded as a failure and does not hold the job up.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from producer.fl.aggregate import Weights
from producer.fl.strategy import EvaluateResult, EvaluateSummary, FitFailure, Strategy


@dataclass(frozen=True, slots=True)
class EvaluateTask:
    """One device's evaluation of ``weights`` after ``server_round``; ``task_id`` keys it."""

    task_id: str
    device_id: str
    server_round: int
    weights: Weights


@dataclass(frozen=True, slots=True)
class EvaluateReply:
    """What a participant delivers for an evaluation task: a result, or an error message."""

    task_id: str
    device_id: str
    result: EvaluateResult | None = None
    error: str = ""


DeliverEvaluation = Callable[[EvaluateReply], None]
"""Thread-safe sink for evaluation replies; called at most once per task."""


@runtime_checkable
class Evaluator(Protocol):
    """A participant that can evaluate global weights on its own test data."""

    @property
    def device_id(self) -> str: ...

    @property
    def evaluates(self) -> bool:
        """Whether this device holds test data (devices without it are not asked)."""
        ...

    def start_evaluate(self, task: EvaluateTask, deliver: DeliverEvaluation) -> None:
        """Start the evaluation and return at once; call ``deliver`` when it ends."""
        ...


@dataclass(slots=True)
class DeviceMetrics:
    """One device's part in one round: a row of ``devices.csv``.

    ``phase`` is ``"fit"`` or ``"evaluate"``; ``status`` is ``"ok"`` or the failure kind
    (``"timeout"``, ``"error"``, ``"dropped"``; FedBuff: ``"stale"``); ``seconds`` runs
    from sending the command to the reply's arrival (NaN when none arrived).
    """

    round: int
    device_id: str
    phase: str
    status: str
    num_examples: int = 0
    loss: float = float("nan")
    accuracy: float = float("nan")
    seconds: float = float("nan")
    attempt: int = 1
    error: str = ""
    model_version: int = -1
    """FedBuff: the model version the device trained on (-1 in synchronous rounds)."""
    staleness: int = -1
    """FedBuff: versions the model moved while the device trained (-1 in synchronous rounds)."""


@dataclass(slots=True)
class EvaluationOutcome:
    """A round's federated evaluation: per-device results, failures, times and the summary."""

    server_round: int
    results: list[EvaluateResult]
    failures: list[FitFailure]
    durations: dict[str, float]
    summary: EvaluateSummary

    def device_rows(self) -> list[DeviceMetrics]:
        """One :class:`DeviceMetrics` row per device asked."""
        rows = [
            DeviceMetrics(
                self.server_round,
                r.device_id,
                "evaluate",
                "ok",
                r.num_examples,
                r.loss,
                r.accuracy,
                self.durations.get(r.device_id, float("nan")),
            )
            for r in self.results
        ]
        rows += [
            DeviceMetrics(
                self.server_round,
                f.device_id,
                "evaluate",
                f.kind,
                seconds=self.durations.get(f.device_id, float("nan")),
                error=f.message,
            )
            for f in self.failures
        ]
        return rows


@dataclass(slots=True)
class EvaluationRunner:
    """Asks every participant that evaluates, collects until all answered or the deadline.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from producer.fl.participants import EagerParticipant
    >>> from producer.fl.strategy import FedAvg
    >>> from producer.fl.training import TrainingSpec, get_weights
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(2, 2)
    >>> x, y = torch.randn(6, 2), torch.tensor([0, 1] * 3)
    >>> p = EagerParticipant("d0", net, TrainingSpec(), x, y, x_test=x, y_test=y)
    >>> out = EvaluationRunner([p], FedAvg()).run(1, get_weights(net))
    >>> out.summary.num_examples, out.results[0].device_id
    (6, 'd0')
    """

    participants: Sequence[object]
    strategy: Strategy
    deadline: float = 60.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    late_replies: int = 0
    _replies: queue.Queue[EvaluateReply] = field(default_factory=queue.Queue)

    def evaluators(self) -> list[Evaluator]:
        """The participants that can evaluate and hold test data."""
        return [p for p in self.participants if isinstance(p, Evaluator) and p.evaluates]

    def run(
        self, server_round: int, weights: Weights, *, only: Sequence[str] | None = None
    ) -> EvaluationOutcome:
        """Evaluate ``weights`` on the devices (those in ``only`` when given)."""
        start = time.monotonic()
        asked = [p for p in self.evaluators() if only is None or p.device_id in only]
        open_tasks: dict[str, str] = {}
        sent: dict[str, float] = {}
        failures: dict[str, FitFailure] = {}
        for k, part in enumerate(asked):
            task = EvaluateTask(f"{self.run_id}-e{server_round}-{k}", part.device_id,
                                server_round, weights)  # fmt: skip
            open_tasks[task.task_id] = part.device_id
            sent[part.device_id] = time.monotonic()
            try:
                part.start_evaluate(task, self._replies.put)
            except Exception as exc:  # a device that cannot be asked is a failure
                del open_tasks[task.task_id]
                failures[part.device_id] = FitFailure(
                    part.device_id, "error", f"{type(exc).__name__}: {exc}"
                )
        results: dict[str, EvaluateResult] = {}
        durations: dict[str, float] = {}
        while open_tasks:
            remaining = start + self.deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                reply = self._replies.get(timeout=remaining)
            except queue.Empty:
                break
            device_id = open_tasks.pop(reply.task_id, None)
            if device_id is None:
                self.late_replies += 1
                continue
            durations[device_id] = time.monotonic() - sent[device_id]
            if reply.result is not None:
                results[device_id] = reply.result
            else:
                failures[device_id] = FitFailure(device_id, "error", reply.error)
        for task_id, device_id in open_tasks.items():
            failures[device_id] = FitFailure(device_id, "timeout", f"no reply to {task_id}")
        order = [p.device_id for p in asked]
        ok = [results[d] for d in order if d in results]
        return EvaluationOutcome(
            server_round,
            ok,
            [failures[d] for d in order if d in failures],
            durations,
            self.strategy.aggregate_evaluate(server_round, ok),
        )
