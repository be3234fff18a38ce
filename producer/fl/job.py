"""A federated training job: rounds, server evaluation, checkpoints, resume and progress."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from producer.fl.aggregate import Weights
from producer.fl.checkpoint import Checkpoint, load_latest, save_checkpoint
from producer.fl.progress import RoundMetrics
from producer.fl.rounds import Participant, RoundOutcome, RoundPolicy, RoundRunner
from producer.fl.strategy import Strategy
from schemas.errors import FedplanError

Evaluate = Callable[[Weights], tuple[float, float]]
"""Server-side evaluation of global weights: ``(loss, accuracy)`` on held-out data."""


@dataclass(slots=True)
class JobResult:
    """The final global weights, one metrics row per round (0 = before training), outcomes."""

    weights: Weights
    history: list[RoundMetrics]
    outcomes: list[RoundOutcome] = field(default_factory=list)
    resumed_from: int = 0


@dataclass(kw_only=True, slots=True)
class FederatedJob:
    """Runs ``num_rounds`` committed rounds; after each, evaluates and checkpoints.

    ``settings`` describes the job (model, data, strategy, seeds); it is stored in every
    checkpoint and a resume with different settings is refused.

    Examples
    --------
    >>> import torch
    >>> from producer.fl.strategy import FedAvg
    >>> job = FederatedJob(participants=[], strategy=FedAvg(), evaluate=lambda w: (0.0, 1.0))
    >>> job.run({"w": torch.zeros(1)}, num_rounds=0).history[0].test_accuracy
    1.0
    """

    participants: Sequence[Participant]
    strategy: Strategy
    evaluate: Evaluate
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    seed: int = 0
    checkpoint_dir: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    on_round: Callable[[RoundMetrics], None] | None = None

    def run(self, weights: Weights, num_rounds: int, *, resume: bool = False) -> JobResult:
        """Train from ``weights`` (or from the last checkpoint when ``resume``)."""
        runner = RoundRunner(self.participants, self.strategy, self.policy, seed=self.seed)
        history: list[RoundMetrics] = []
        first = 1
        if resume:
            ck = self._load_checkpoint()
            if ck is not None:
                weights = ck.weights
                self.strategy.load_state_dict(ck.strategy_state)
                history = [RoundMetrics.from_dict(row) for row in ck.metadata["history"]]
                first = ck.round + 1
        start = time.monotonic()
        if not history:
            loss, acc = self.evaluate(weights)
            history.append(RoundMetrics(0, 0, 0, float("nan"), loss, acc, 0.0, 0.0))
            self._report(history[-1])
        elapsed0 = history[-1].elapsed_seconds
        outcomes: list[RoundOutcome] = []
        t_prev = time.monotonic()
        for server_round in range(first, num_rounds + 1):
            outcome = runner.run_round(server_round, weights)
            assert outcome.weights is not None
            weights = outcome.weights
            outcomes.append(outcome)
            loss, acc = self.evaluate(weights)
            now = time.monotonic()
            history.append(
                RoundMetrics(
                    round=server_round,
                    participants=len(outcome.results),
                    failures=len(outcome.failures),
                    train_loss=outcome.train_loss(),
                    test_loss=loss,
                    test_accuracy=acc,
                    round_seconds=now - t_prev,
                    elapsed_seconds=elapsed0 + now - start,
                    attempts=outcome.attempt,
                )
            )
            t_prev = now
            if self.checkpoint_dir is not None:
                save_checkpoint(
                    self.checkpoint_dir,
                    Checkpoint(
                        server_round,
                        weights,
                        self.strategy.state_dict(),
                        {
                            "history": [asdict(m) for m in history],
                            "seed": self.seed,
                            "settings": self.settings,
                            "strategy": self.strategy.name,
                        },
                    ),
                )
            self._report(history[-1])
        return JobResult(weights, history, outcomes, resumed_from=first - 1)

    def _report(self, m: RoundMetrics) -> None:
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
