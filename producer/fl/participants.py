"""Round participants: devices running the traced training plan, and an eager reference."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from producer.fl.aggregate import Weights
from producer.fl.evaluation import DeliverEvaluation, EvaluateReply, EvaluateTask
from producer.fl.rounds import Deliver, FitReply, FitTask
from producer.fl.strategy import EvaluateResult, FitResult
from producer.fl.training import (
    TrainingSpec,
    evaluate,
    flatten,
    sample_order,
    scratch_copy,
    train_eager,
    unflatten,
)
from producer.remote.device import Device
from schemas.errors import ObjectNotFound, PlanInputError


class EagerParticipant:
    """A device simulated in this process with plain PyTorch (the no-plan reference).

    Runs :func:`train_eager` on its own rows, in the calling thread unless an ``executor``
    is given, and :func:`evaluate` on ``x_test, y_test`` when given. Tests compare
    plan-based devices against it; it never talks to a transport.

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
        x_test: torch.Tensor | None = None,
        y_test: torch.Tensor | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._device_id = device_id
        self.model = scratch_copy(model)
        self.spec = spec
        self.x = x
        self.y = y
        self.x_test = x_test
        self.y_test = y_test
        self.executor = executor
        self._lock = threading.Lock()

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def evaluates(self) -> bool:
        return self.x_test is not None and self.y_test is not None and len(self.x_test) > 0

    def start_evaluate(self, task: EvaluateTask, deliver: DeliverEvaluation) -> None:
        assert self.x_test is not None and self.y_test is not None
        try:
            with self._lock:
                loss, acc = evaluate(
                    self.model, task.weights, self.x_test, self.y_test, self.spec.loss
                )
            result = EvaluateResult(self.device_id, len(self.x_test), loss, acc)
            deliver(EvaluateReply(task.task_id, self.device_id, result=result))
        except Exception as exc:
            deliver(
                EvaluateReply(task.task_id, self.device_id, error=f"{type(exc).__name__}: {exc}")
            )

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        if self.executor is None:
            deliver(self._fit(task))
        else:
            future = self.executor.submit(self._fit, task)
            future.add_done_callback(lambda f: deliver(f.result()))

    def _fit(self, task: FitTask) -> FitReply:
        try:
            mu = float(task.instructions.config.get("proximal_mu", self.spec.proximal_mu))
            spec = dataclasses.replace(self.spec, proximal_mu=mu)
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
"""Returns the device plan for a device holding ``n`` examples (one training loop plan
serves every count; evaluation plans are built per count)."""


class PlanParticipant:
    """A fleet device that trains by running the traced training plan: one command a round.

    At construction it finds the device's training rows and labels by tag (``device.search``)
    and learns their count from the pointers' metadata; the data never leaves the device.
    Each round it sends the plan if the device does not hold it yet (a no-op otherwise),
    then one ``RunPlan`` with the flattened global weights and the round's loop settings
    (``epochs``, ``batch_size``: default the plan's ``spec``; ``seed``: the round's), and
    delivers the device's reply: the new weights and the mean local loss. The device
    shuffles its own rows from the seed (:class:`producer.plans.loop.LoopPlan`).

    With ``evaluation_plan_for``, a device that holds ``test``-tagged rows and labels
    (``x_test_tags``, ``y_test_tags``) also evaluates global weights with that plan (one
    ``RunPlan``, the reply is ``[loss, accuracy]``); see :mod:`producer.fl.evaluation`.

    Examples
    --------
    >>> import producer as fp
    >>> from producer.fl.training import build_training_plan
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> spec = TrainingSpec(batch_size=2)
    >>> with fp.connect() as fleet:
    ...     dev = fleet.device("d0", data=[fp.tag(torch.randn(4, 3), "train", "x"),
    ...                                     fp.tag(torch.tensor([0, 1, 1, 0]), "train", "y")])
    ...     p = PlanParticipant(dev, lambda n: build_training_plan(net, spec, n))
    ...     p.num_examples
    4
    """

    def __init__(
        self,
        device: Device,
        plan_for: PlanFactory,
        *,
        x_tags: tuple[str, ...] = ("train", "x"),
        y_tags: tuple[str, ...] = ("train", "y"),
        epochs: int | None = None,
        batch_size: int | None = None,
        proximal_mu: float | None = None,
        timeout: float | None = None,
        executor: ThreadPoolExecutor | None = None,
        evaluation_plan_for: PlanFactory | None = None,
        x_test_tags: tuple[str, ...] = ("test", "x"),
        y_test_tags: tuple[str, ...] = ("test", "y"),
    ) -> None:
        self.device = device
        self.proximal_mu = proximal_mu
        xs, ys = device.search(*x_tags), device.search(*y_tags)
        if len(xs) != 1 or len(ys) != 1:
            raise ObjectNotFound(
                f"device {device.id!r} holds {len(xs)} objects tagged {x_tags} and {len(ys)} "
                f"tagged {y_tags}; it needs exactly one of each (store them with fp.tag)",
                device_id=device.id,
            )
        self.x, self.y = xs[0], ys[0]
        self.num_examples = int(self.x.shape[0])
        if int(self.y.shape[0]) != self.num_examples:
            raise PlanInputError(
                f"device {device.id!r}: {self.num_examples} rows but {int(self.y.shape[0])} "
                "labels; store matching tensors",
                device_id=device.id,
            )
        self.plan = plan_for(self.num_examples)
        spec = getattr(self.plan, "spec", None)
        self.epochs = epochs or (spec.epochs if isinstance(spec, TrainingSpec) else 1)
        self.batch_size = batch_size or (spec.batch_size if isinstance(spec, TrainingSpec) else 32)
        self.timeout = timeout
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"fit-{device.id}")
        self.x_test: Any = None
        self.y_test: Any = None
        self.num_test_examples = 0
        self.evaluation_plan: Any = None
        if evaluation_plan_for is not None:
            self._find_test_data(evaluation_plan_for, x_test_tags, y_test_tags)

    def _find_test_data(
        self, plan_for: PlanFactory, x_tags: tuple[str, ...], y_tags: tuple[str, ...]
    ) -> None:
        xs, ys = self.device.search(*x_tags), self.device.search(*y_tags)
        if not xs and not ys:
            return  # no test data: this device trains but is not asked to evaluate
        if len(xs) != 1 or len(ys) != 1 or int(xs[0].shape[0]) != int(ys[0].shape[0]):
            raise PlanInputError(
                f"device {self.device_id!r} holds {len(xs)} objects tagged {x_tags} and "
                f"{len(ys)} tagged {y_tags}; it needs one of each, with matching row counts",
                device_id=self.device_id,
            )
        self.x_test, self.y_test = xs[0], ys[0]
        self.num_test_examples = int(self.x_test.shape[0])
        if self.num_test_examples:
            self.evaluation_plan = plan_for(self.num_test_examples)

    @property
    def device_id(self) -> str:
        return self.device.id

    @property
    def evaluates(self) -> bool:
        return self.evaluation_plan is not None

    def start_evaluate(self, task: EvaluateTask, deliver: DeliverEvaluation) -> None:
        pointer_plan = self.device.send_plan(self.evaluation_plan, wait=False)
        out = pointer_plan.run(self.x_test, self.y_test, flatten(task.weights), return_values=True)
        self.executor.submit(self._collect_evaluation, task, out, deliver)

    def _collect_evaluation(self, task: EvaluateTask, out: Any, deliver: DeliverEvaluation) -> None:
        try:
            value = out.get(timeout=self.timeout)
            if value.shape != (2,):
                raise PlanInputError(
                    f"device {self.device_id!r} returned shape {tuple(value.shape)} for an "
                    "evaluation; expected [loss, accuracy]",
                    device_id=self.device_id,
                )
            loss, accuracy = float(value[0]), float(value[1])
            if not (math.isfinite(loss) and loss >= 0 and 0.0 <= accuracy <= 1.0):
                raise PlanInputError(
                    f"device {self.device_id!r} reported loss {loss} and accuracy {accuracy}; "
                    "a loss must be finite and >= 0, an accuracy in [0, 1]",
                    device_id=self.device_id,
                )
            result = EvaluateResult(self.device_id, self.num_test_examples, loss, accuracy)
            deliver(EvaluateReply(task.task_id, self.device_id, result=result))
        except Exception as exc:
            deliver(
                EvaluateReply(task.task_id, self.device_id, error=f"{type(exc).__name__}: {exc}")
            )

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        mu = task.instructions.config.get("proximal_mu", 0.0)
        if self.proximal_mu is not None and mu != self.proximal_mu:
            raise PlanInputError(
                f"the strategy asks for proximal_mu={mu} but the plan of device "
                f"{self.device_id!r} was built with {self.proximal_mu}; build the plan with "
                "the strategy's proximal_mu",
                device_id=self.device_id,
            )
        weights = task.instructions.weights
        pointer_plan = self.device.send_plan(self.plan, wait=False)
        out = pointer_plan.run(
            self.x,
            self.y,
            flatten(weights),
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=task.seed,
            return_values=True,
        )
        self.executor.submit(self._collect, task, out, weights, deliver)

    def _collect(self, task: FitTask, out: Any, template: Weights, deliver: Deliver) -> None:
        try:
            flat = out.get(timeout=self.timeout)
            new = unflatten(flat[:-1], template)
            result = FitResult(self.device_id, new, self.num_examples, {"loss": float(flat[-1])})
            deliver(FitReply(task.task_id, self.device_id, result=result))
        except Exception as exc:
            deliver(FitReply(task.task_id, self.device_id, error=f"{type(exc).__name__}: {exc}"))
