"""A plan's training loop on the device: checked once at load, bounded on every call.

The loop (:class:`schemas.ir.LoopOverBatches`) runs its body, itself a plan loaded once,
over the device's dataset tensors: ``epochs`` permutations drawn from one
``torch.Generator().manual_seed(seed)`` (``torch.randperm(n, generator=g)`` per epoch, the
order :func:`producer.fl.training.sample_order` computes), batches of ``batch_size`` indices
in that order, the last short batch kept unless ``drop_last``. The call's integers are
checked before the first step; the number of steps is bounded by the device
(``FEDPLAN_MAX_LOOP_STEPS``); every step's slots are freed when it ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from schemas.errors import (
    FedplanError,
    LoopLimitError,
    PlanExecutionError,
    PlanInputError,
    PlanShapeError,
    WireError,
)
from schemas.ir import LoopOverBatches

if TYPE_CHECKING:
    from consumer.runtime.interpreter import LoadedPlan

MAX_SEED = (1 << 63) - 1
"""Largest shuffle seed accepted (seeds are 0 ... 2**63 - 1, a non-negative int64)."""

Slots = list[Any]


class LoopRunner:
    """Runs one plan's loop section against its slots and live state.

    Parameters
    ----------
    loop
        The loop section; its body must be loadable (allow-list, slots) and name only
        state the plan has, else ``WireError``/``OpNotAllowedError`` at load.
    body
        The loaded body plan.
    state_names
        The enclosing plan's state names.
    max_steps
        The most steps one call may run (``LoopLimitError`` before the first step).
    where
        Error fields (plan id/name, device id).

    Examples
    --------
    >>> from schemas.ir import Op, PlanIR, Ref
    >>> from consumer.runtime.interpreter import LoadedPlan
    >>> body = PlanIR("step", (Ref(0),), [Op("torch.sum", (Ref(0),), {}, Ref(1))], Ref(1), 2)
    >>> plan = PlanIR("loop", (Ref(0),), [], Ref(4), 5,
    ...     kwinputs={"epochs": Ref(1), "batch_size": Ref(2), "seed": Ref(3)},
    ...     loop=LoopOverBatches(body, 0, (Ref(0),), (), Ref(1), Ref(2), Ref(3), Ref(4)))
    >>> LoadedPlan(plan).run((torch.ones(6),), {"epochs": 2, "batch_size": 4, "seed": 0}, {})
    tensor(3.)
    """

    def __init__(
        self,
        loop: LoopOverBatches,
        body: LoadedPlan,
        state_names: set[str],
        *,
        max_steps: int,
        where: dict[str, Any],
    ) -> None:
        self.loop = loop
        self.body = body
        self.max_steps = max_steps
        self.where = where
        extra = sorted(set(loop.body.state) - state_names)
        if extra:
            raise self._malformed(f"the loop body names state {extra[:3]} the plan does not have")
        if loop.body.kwinputs or len(loop.body.inputs) != len(loop.data) + len(loop.extras):
            raise self._malformed(
                f"the loop body takes {len(loop.body.inputs)} positional inputs, the loop "
                f"passes {len(loop.data)} batches and {len(loop.extras)} extras"
            )
        if type(loop.drop_last) is not bool:
            raise self._malformed(f"drop_last is {loop.drop_last!r}")

    def _malformed(self, what: str) -> WireError:
        return WireError(f"malformed plan loop: {what}; rebuild and resend the plan", **self.where)

    def _int(self, slots: Slots, name: str, low: int, high: int) -> int:
        value = slots[getattr(self.loop, name).slot]
        if type(value) is not int:
            raise PlanInputError(
                f"loop {name} must be an int, received {type(value).__name__}", **self.where
            )
        if not low <= value <= high:
            raise PlanInputError(
                f"loop {name} must be in {low} ... {high}, received {value}", **self.where
            )
        return value

    def plan(self, slots: Slots) -> tuple[int, int, int, int, list[torch.Tensor]]:
        """Check the call's integers and dataset: ``(epochs, per_epoch, batch, seed, data)``."""
        epochs = self._int(slots, "epochs", 1, self.max_steps)
        batch = self._int(slots, "batch_size", 1, MAX_SEED)
        seed = self._int(slots, "seed", 0, MAX_SEED)
        data = [slots[r.slot] for r in self.loop.data]
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in data):
            raise PlanInputError("the loop's dataset inputs must be tensors of rows", **self.where)
        rows = {int(t.shape[0]) for t in data}
        if len(rows) != 1:
            raise PlanShapeError(
                f"the loop's dataset tensors have {sorted(rows)} rows; they must match",
                **self.where,
            )
        n = rows.pop()
        per_epoch = n // batch if self.loop.drop_last else -(-n // batch)
        if per_epoch == 0:
            rule = "drop_last drops a batch shorter than batch_size" if n else "no rows"
            raise PlanInputError(
                f"the loop has no step to run: {n} rows, batch_size {batch} ({rule})",
                **self.where,
            )
        if epochs * per_epoch > self.max_steps:
            raise LoopLimitError(
                f"the loop would run {epochs} epochs x {per_epoch} batches = "
                f"{epochs * per_epoch} steps; this device runs at most {self.max_steps} per "
                "call (FEDPLAN_MAX_LOOP_STEPS): send fewer epochs or larger batches",
                **self.where,
            )
        return epochs, per_epoch, batch, seed, data

    def run(self, slots: Slots, state: Mapping[str, Any]) -> None:
        """Run every step; the steps' mean output goes to the loop's ``out`` slot."""
        epochs, per_epoch, batch, seed, data = self.plan(slots)
        extras = tuple(slots[r.slot] for r in self.loop.extras)
        n = int(data[0].shape[0])
        generator = torch.Generator().manual_seed(seed)
        total: torch.Tensor | None = None
        step = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for b in range(per_epoch):
                idx = order[b * batch : (b + 1) * batch]
                out = self._step(step, tuple(t[idx] for t in data) + extras, state)
                if total is not None and out.shape != total.shape:
                    raise PlanExecutionError(
                        f"loop step {step}: the body returned shape {tuple(out.shape)}, the "
                        f"first step {tuple(total.shape)}; a step must return one shape",
                        **self.where,
                    )
                total = out if total is None else total + out
                step += 1
        assert total is not None  # per_epoch and epochs are >= 1
        slots[self.loop.out.slot] = total / step

    def _step(self, step: int, args: tuple[Any, ...], state: Mapping[str, Any]) -> torch.Tensor:
        try:
            out = self.body.run(args, {}, state)
        except FedplanError as exc:
            exc.message = f"loop step {step}: {exc.message}"
            exc.args = (exc.message,)
            raise
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise PlanExecutionError(
                f"loop step {step}: the body returned {type(out).__name__}, not a float tensor",
                **self.where,
            )
        return out.detach()


__all__ = ["MAX_SEED", "LoopRunner"]
