"""Loop plans: one traced training step that the device runs over its own batches.

A :class:`LoopPlan` is a module with three methods: ``setup(*extras)`` runs once before the
loop, ``step(*batch, *extras)`` once per batch, ``finish(mean_step_output, *extras)`` once
after it. Each is traced on its own and the three are put together into one plan whose
IR holds a :class:`schemas.ir.LoopOverBatches` section: the plan's size does not depend on
the data, and one plan serves every device whatever its example count. The epochs, batch
size and shuffle seed are the call's keyword arguments, sent with every run
(docs/tracing.md §9).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from producer.plans.plan import Plan
from producer.plans.selfcheck import clone_tensor, self_check
from schemas.errors import PlanBuildError, PlanInputError
from schemas.ir import InputSpec, LoopOverBatches, Op, PlanIR, Ref, Slice, SymExpr, Value
from schemas.tree import tree_map

LOOP_ARGUMENTS = ("epochs", "batch_size", "seed")
"""The keyword arguments every call of a loop plan passes (ints, checked on the device)."""


class LoopPlan(Plan):
    """A plan that runs ``step`` over batches of its dataset inputs on the device.

    Subclass it like :class:`~producer.plans.plan.Plan`: layers and optimizers in
    ``__init__`` (momentum buffers become plan state), then ``step`` (required), and
    ``setup`` / ``finish`` when needed. The first ``data_inputs`` parameters of ``step`` are
    batches of the plan's dataset inputs (same names), the rest are *extras* passed
    unchanged to all three methods. A call is
    ``plan(*datasets, *extras, epochs=E, batch_size=B, seed=S)``; it runs ``setup``, then
    for each of ``E`` epochs ``torch.randperm(n, generator=g)`` with one
    ``g = torch.Generator().manual_seed(S)`` for all epochs, ``step`` on each run of ``B``
    indices of that order (the last short batch kept unless ``drop_last = True``), then
    ``finish`` on the mean of the steps' outputs. State gradients are cleared around every
    step, as around every call. The same seed gives the same order as
    :func:`producer.fl.training.sample_order`, so an eager loop reproduces the plan.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> class Train(LoopPlan):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(3, 2)
    ...         self.opt = torch.optim.SGD(self.fc.parameters(), lr=0.1)
    ...     def step(self, x, y):
    ...         loss = F.cross_entropy(self.fc(x), y)
    ...         self.opt.zero_grad()
    ...         loss.backward()
    ...         self.opt.step()
    ...         return loss.detach()
    >>> x, y = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    >>> plan = Train().build(x, y)
    >>> loss = plan(x, y, epochs=2, batch_size=4, seed=7)  # 6 steps, one plan
    >>> plan.ir.loop.body.name, loss.shape
    ('Train.step', torch.Size([]))
    """

    data_inputs: ClassVar[int] = 2
    """How many leading ``step`` parameters are batches of dataset inputs."""
    drop_last: ClassVar[bool] = False
    """Drop each epoch's last batch when it is shorter than ``batch_size``."""

    def setup(self, *extras: Any) -> None:
        """Runs once before the loop (e.g. load weights passed as an extra); default none."""

    def step(self, *batch_and_extras: Any) -> torch.Tensor:
        """One step on a batch; returns a float tensor (the loss), averaged over steps."""
        raise NotImplementedError(f"{type(self).__name__} must define step()")

    def finish(self, mean: torch.Tensor, *extras: Any) -> Any:
        """Runs once after the loop on the steps' mean output; returns the plan's outputs."""
        return mean

    # -- calling ----------------------------------------------------------------------------

    def _step_names(self) -> list[str]:
        params = list(inspect.signature(self.step).parameters.values())
        if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
            raise PlanBuildError(
                f"{type(self).__name__}.step must take plain positional parameters "
                "(the batches, then the extras)",
                plan_name=self.name,
            )
        if len(params) < self.data_inputs:
            raise PlanBuildError(
                f"{type(self).__name__}.step takes {len(params)} parameters but the plan "
                f"has {self.data_inputs} dataset inputs",
                plan_name=self.name,
            )
        return [p.name for p in params]

    def call_signature(self) -> inspect.Signature | None:
        """``(*datasets, *extras, *, epochs, batch_size, seed)``: the step's parameters and
        the loop's keyword-only integers.

        Examples
        --------
        >>> class T(LoopPlan):
        ...     def step(self, x, y, w):
        ...         return (x * w).sum()
        >>> str(T().call_signature())
        '(x, y, w, *, epochs, batch_size, seed)'
        """
        if "_signature" not in self.__dict__:
            plain = inspect.Parameter.POSITIONAL_OR_KEYWORD
            keyword = inspect.Parameter.KEYWORD_ONLY
            params = [inspect.Parameter(n, plain) for n in self._step_names()]
            params += [inspect.Parameter(n, keyword) for n in LOOP_ARGUMENTS]
            self.__dict__["_signature"] = inspect.Signature(params)
            self.__dict__["_arity"] = None
        signature: inspect.Signature = self.__dict__["_signature"]
        return signature

    def _target(self) -> tuple[Any, list[str]]:
        raise PlanBuildError(
            f"loop plan {self.name!r} cannot run inside another plan's trace; call it on its own",
            plan_name=self.name,
        )

    # -- building ---------------------------------------------------------------------------

    def build(self, *args: Any, **kwargs: Any) -> LoopPlan:
        """Trace ``setup``, ``step`` and ``finish`` on example inputs into one loop plan.

        ``args`` are example dataset tensors and extras, as in a call (the loop keywords,
        if given, are ignored: the trace does not depend on them). Unless ``self_check`` is
        off, the plan then runs one epoch (two batches when there are two rows) against
        the eager loop on cloned state; any difference is a ``PlanBuildError``.
        """
        loop_kwargs = {k: kwargs.pop(k) for k in LOOP_ARGUMENTS if k in kwargs}
        args, _ = self.bind_arguments(args, {**kwargs, "epochs": 1, "batch_size": 1, "seed": 0})
        names = self._step_names()
        data, extras = list(args[: self.data_inputs]), list(args[self.data_inputs :])
        self._check_examples(data, extras)
        state = self.named_state()
        setup = self._sub_plan("setup", self.setup, None).build(*extras)
        dynamic: dict[str, tuple[int, ...]] = {n: (0,) for n in names[: self.data_inputs]}
        with warnings.catch_warnings():  # a step leaves grads; they are cleared after it
            warnings.filterwarnings("ignore", "plan .* leaves .grad set", UserWarning)
            step = self._sub_plan("step", self.step, dynamic).build(*data, *extras)
        step_ir = step.ir
        if not isinstance(step_ir.outputs, Ref):
            raise PlanBuildError(
                f"{type(self).__name__}.step must return one tensor (the loss), not a structure",
                plan_name=self.name,
            )
        example = step._replay((*data, *extras), {}, {k: clone_tensor(t) for k, t in state.items()})
        if not isinstance(example, torch.Tensor) or not example.is_floating_point():
            raise PlanBuildError(
                f"{type(self).__name__}.step returns {type(example).__name__}; it must "
                "return a float tensor (the loss)",
                plan_name=self.name,
            )
        mean = torch.zeros_like(example.detach())
        finish = self._sub_plan("finish", self.finish, None).build(mean, *extras)
        ir = _assemble(
            self.name, names, len(data), len(extras), setup.ir, step_ir, finish.ir, state
        )
        assert ir.loop is not None
        ir.loop.drop_last = self.drop_last
        self._install(ir, self)
        if self.self_check:
            n = int(data[0].shape[0])
            check_kwargs = {"epochs": 1, "batch_size": max(1, (n + 1) // 2), "seed": 0}
            check_kwargs.update(loop_kwargs)
            try:
                self_check(self.eager, self._replay, state, tuple(args), check_kwargs,
                           name=self.name)  # fmt: skip
            except BaseException:
                self._ir, self._loaded = None, None
                raise
        return self

    def _check_examples(self, data: list[Any], extras: list[Any]) -> None:
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in data):
            raise PlanBuildError(
                f"loop plan {self.name!r}: the {self.data_inputs} dataset inputs must be "
                "tensors of rows",
                plan_name=self.name,
            )
        if len({int(t.shape[0]) for t in data}) != 1 or int(data[0].shape[0]) == 0:
            raise PlanBuildError(
                f"loop plan {self.name!r}: the example dataset tensors need the same, "
                "non-zero number of rows",
                plan_name=self.name,
            )
        if not all(isinstance(t, torch.Tensor) for t in extras):
            raise PlanBuildError(
                f"loop plan {self.name!r}: extras must be tensors (pass numbers as tensors "
                "or build them into the plan)",
                plan_name=self.name,
            )

    def _sub_plan(self, part: str, method: Any, dynamic: dict[str, tuple[int, ...]] | None) -> Plan:
        plan = Plan(f"{self.name}.{part}", function=method.__func__, bound_module=self)
        plan.self_check = False  # the whole loop is checked against the eager loop
        plan._dynamic = dynamic
        return plan

    def eager(self, *args: Any, epochs: int, batch_size: int, seed: int) -> Any:
        """The loop in plain PyTorch on the live state: the reference the plan replays.

        Examples
        --------
        >>> class Count(LoopPlan):
        ...     data_inputs = 1
        ...     def step(self, x):
        ...         return x.sum()
        >>> Count().eager(torch.ones(5), epochs=1, batch_size=2, seed=0)  # (2 + 2 + 1) / 3
        tensor(1.6667)
        """
        data, extras = args[: self.data_inputs], args[self.data_inputs :]
        n = int(data[0].shape[0])
        per_epoch = n // batch_size if self.drop_last else -(-n // batch_size)
        if epochs < 1 or per_epoch < 1:
            raise PlanInputError(f"loop plan {self.name!r}: no step to run", plan_name=self.name)
        self.setup(*extras)
        generator = torch.Generator().manual_seed(seed)
        total: torch.Tensor | None = None
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for b in range(per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                out = self.step(*(t[idx] for t in data), *extras).detach()
                total = out if total is None else total + out
        assert total is not None
        return self.finish(total / (epochs * per_epoch), *extras)


def _assemble(
    name: str,
    names: list[str],
    n_data: int,
    n_extras: int,
    setup: PlanIR,
    step: PlanIR,
    finish: PlanIR,
    state: Mapping[str, torch.Tensor],
) -> PlanIR:
    """One plan: setup ops, the loop over ``step``, finish ops, in one slot space."""
    data = tuple(Ref(i) for i in range(n_data))
    extras = tuple(Ref(n_data + i) for i in range(n_extras))
    counter = n_data + n_extras
    epochs, batch_size, seed = (Ref(counter + i) for i in range(3))
    counter += 3
    state_slots = {key: counter + i for i, key in enumerate(state)}
    counter += len(state_slots)
    out = Ref(counter)
    counter += 1
    setup_part = _Spliced(setup, [r.slot for r in extras], state_slots, counter)
    finish_part = _Spliced(
        finish, [out.slot, *(r.slot for r in extras)], state_slots, setup_part.end
    )
    specs: dict[int, InputSpec] = {}
    for spec in step.input_specs:  # the datasets' specs: a batch's, any number of rows
        index = _input_index(step, spec.slot)
        if index is not None and index < n_data:
            sizes = {d: s for d, s in spec.sizes.items() if d != 0}
            specs[index] = dataclasses.replace(spec, slot=index, path=names[index], sizes=sizes)
    for spec in (*setup_part.specs, *finish_part.specs):
        if spec.slot != out.slot:
            specs.setdefault(spec.slot, spec)
    loop = LoopOverBatches(
        body=dataclasses.replace(step, name=step.name, state_values={}),
        at=len(setup_part.ops),
        data=data,
        extras=extras,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        out=out,
    )
    return PlanIR(
        name=name,
        inputs=(*data, *extras),
        kwinputs={"epochs": epochs, "batch_size": batch_size, "seed": seed},
        ops=[*setup_part.ops, *finish_part.ops],
        outputs=finish_part.outputs,
        num_slots=finish_part.end,
        input_specs=[specs[k] for k in sorted(specs)],
        state=state_slots,
        constants={**setup_part.constants, **finish_part.constants},
        loop=loop,
    )


def _input_index(ir: PlanIR, slot: int) -> int | None:
    for index, pattern in enumerate(ir.inputs):
        if isinstance(pattern, Ref) and pattern.slot == slot:
            return index
    return None


class _Spliced:
    """A sub-plan's ops, constants, specs and outputs renumbered into the loop plan's slots:
    its inputs onto ``inputs``, its state by name, every other slot shifted to ``base``."""

    def __init__(
        self, ir: PlanIR, inputs: list[int], state_slots: dict[str, int], base: int
    ) -> None:
        if (
            ir.kwinputs
            or len(ir.inputs) != len(inputs)
            or not all(isinstance(p, Ref) for p in ir.inputs)
        ):
            raise PlanBuildError(f"{ir.name}: every input must be one tensor", plan_name=ir.name)
        mapping = {p.slot: slot for p, slot in zip(ir.inputs, inputs, strict=True)}  # type: ignore[union-attr]
        mapping.update({ir.state[k]: state_slots[k] for k in ir.state})
        self._map = lambda s: mapping.get(s, base + s)
        self.ops = [
            Op(
                op.target,
                self.value(op.args),
                self.value(op.kwargs),
                self.value(op.out),
                op.expect,
                op.source,
            )
            for op in ir.ops
        ]
        self.constants = {self._map(s): t for s, t in ir.constants.items()}
        self.specs = [
            dataclasses.replace(s, slot=self._map(s.slot), sizes=dict(s.sizes))
            for s in ir.input_specs
        ]
        self.outputs = self.value(ir.outputs)
        self.end = base + ir.num_slots

    def value(self, value: Any) -> Any:
        mapped: Value = tree_map(self._leaf, value)
        return mapped

    def _leaf(self, leaf: Any) -> Any:
        if isinstance(leaf, Ref):
            return Ref(self._map(leaf.slot))
        if isinstance(leaf, SymExpr):
            return SymExpr(leaf.op, tuple(self._leaf(a) for a in leaf.args))
        if isinstance(leaf, Slice):
            return Slice(self._leaf(leaf.start), self._leaf(leaf.stop), self._leaf(leaf.step))
        return leaf


__all__ = ["LOOP_ARGUMENTS", "LoopPlan"]
