"""Round participants: devices running the traced training plan, and an eager reference."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from producer.fl.rounds import Deliver, FitReply, FitTask
from producer.fl.strategy import FitResult
from producer.fl.training import TrainingSpec, sample_order, scratch_copy, train_eager


class EagerParticipant:
    """A device simulated in this process with plain PyTorch (the no-plan reference).

    Runs :func:`train_eager` on its own rows, in the calling thread unless an ``executor``
    is given. Tests compare plan-based devices against it; it never talks to a transport.

    Examples
    --------
    >>> from producer.fl.rounds import RoundRunner
    >>> from producer.fl.strategy import FedAvg
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(2, 2)
    >>> x, y = torch.randn(8, 2), torch.tensor([0, 1] * 4)
    >>> p = EagerParticipant("d0", net, TrainingSpec(batch_size=4), x, y)
    >>> w = {k: v.detach().clone() for k, v in net.state_dict().items()}
    >>> RoundRunner([p], FedAvg()).run_round(1, w).committed
    True
    """

    def __init__(
        self,
        device_id: str,
        model: nn.Module,
        spec: TrainingSpec,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._device_id = device_id
        self.model = scratch_copy(model)
        self.spec = spec
        self.x = x
        self.y = y
        self.executor = executor
        self._lock = threading.Lock()

    @property
    def device_id(self) -> str:
        return self._device_id

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        if self.executor is None:
            deliver(self._fit(task))
        else:
            future = self.executor.submit(self._fit, task)
            future.add_done_callback(lambda f: deliver(f.result()))

    def _fit(self, task: FitTask) -> FitReply:
        try:
            mu = float(task.instructions.config.get("proximal_mu", self.spec.proximal_mu))
            spec = TrainingSpec(
                loss=self.spec.loss, lr=self.spec.lr, batch_size=self.spec.batch_size,
                epochs=self.spec.epochs, proximal_mu=mu,
            )  # fmt: skip
            order = sample_order(len(self.x), task.seed, spec.epochs)
            with self._lock:
                weights, loss = train_eager(
                    self.model, spec, task.instructions.weights, self.x, self.y, order
                )
            result = FitResult(self.device_id, weights, len(self.x), {"loss": loss})
            return FitReply(task.task_id, self.device_id, result=result)
        except Exception as exc:
            return FitReply(task.task_id, self.device_id, error=f"{type(exc).__name__}: {exc}")


PlanFactory = Callable[[int], Any]
"""Builds (or returns a cached) device training plan for a device holding ``n`` examples."""
