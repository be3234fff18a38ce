"""Runs a PlanIR through the allow-list: checked once at load, ops resolved into closures."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from broker_config.settings import Settings
from consumer.runtime.budgets import is_out_of_memory
from consumer.runtime.loop import LoopRunner
from consumer.runtime.lowering import (
    DTYPES,
    Const,
    Getter,
    Lowering,
    SlotRead,
    Slots,
    get,
    make_call,
    same_value,
)
from schemas.allowlist import is_allowed, resolve
from schemas.errors import (
    FedplanError,
    MemoryLimitError,
    OpNotAllowedError,
    PlanExecutionError,
    PlanGuardError,
    PlanInputError,
    PlanShapeError,
    WireError,
)
from schemas.ir import LoopOverBatches, NoExpect, Op, PlanIR, Ref, refs_in
from schemas.tree import tree_leaves, tree_map

Step = Callable[[Slots], None]

_DEFAULT_LOOP_STEPS = Settings().max_loop_steps
Watch = Callable[[int, Slots, tuple[int, ...], tuple[int, ...]], None]
"""Called after each op of a watched run with ``(op index, slots, slots the op wrote,
slots freed after it)``; it raises to stop the run (a budget, a deadline)."""


class LoadedPlan:
    """A plan checked against the allow-list and compiled into closures, ready to run.

    Parameters
    ----------
    ir:
        The plan. Every op target must be in :mod:`schemas.allowlist` and every slot read
        must be written first; otherwise nothing runs (``OpNotAllowedError``/``WireError``).
    plan_id, device_id:
        Where the plan lives, for error fields.
    max_loop_steps:
        The most steps one call of the plan's loop section may run (default: the
        ``FEDPLAN_MAX_LOOP_STEPS`` default); see :mod:`consumer.runtime.loop`.

    Examples
    --------
    >>> from schemas.ir import Op, PlanIR, Ref
    >>> ir = PlanIR(name="double_abs", inputs=(Ref(0),), ops=[
    ...     Op("Tensor.__add__", (Ref(0), Ref(0)), {}, Ref(1)),
    ...     Op("torch.abs", (Ref(1),), {}, Ref(2)),
    ... ], outputs=Ref(2), num_slots=3)
    >>> LoadedPlan(ir).run((torch.tensor([-1.0, 2.0]),), {}, {})
    tensor([2., 4.])
    """

    def __init__(
        self,
        ir: PlanIR,
        *,
        plan_id: str | None = None,
        device_id: str | None = None,
        max_loop_steps: int | None = None,
    ) -> None:
        self.ir = ir
        self.plan_id = plan_id
        self.device_id = device_id
        self._where: dict[str, Any] = {
            "plan_id": plan_id,
            "plan_name": ir.name,
            "device_id": device_id,
        }
        for index, op in enumerate(ir.ops):  # deny before looking at anything else
            if not isinstance(op.target, str) or not is_allowed(op.target):
                raise OpNotAllowedError(
                    f"op {index} {op.target!r} of plan {ir.name!r} is not in the allow-list; "
                    "the device refuses the whole plan: rewrite it with allowed torch ops",
                    op_index=index,
                    **self._where,
                )
        self._lower = Lowering(self._malformed)
        self._loop: LoopRunner | None = None
        try:
            self._load(max_loop_steps or _DEFAULT_LOOP_STEPS)
        except RecursionError:
            raise self._malformed("values are nested too deeply") from None

    def _load(self, max_loop_steps: int) -> None:
        ir = self.ir
        if ir.loop is not None:  # the body is checked on its own: allow-list, slots
            if not isinstance(ir.loop, LoopOverBatches) or ir.loop.body.loop is not None:
                raise self._malformed("the loop section is not one loop over batches")
            body = LoadedPlan(ir.loop.body, plan_id=self.plan_id, device_id=self.device_id)
            self._loop = LoopRunner(
                ir.loop, body, set(ir.state), max_steps=max_loop_steps, where=self._where
            )
        self._input_slots, self._size = self._check_structure()
        self._bind = self._compile_binder()
        self._specs = [
            (s.slot, s.path, s.ndim, DTYPES[s.dtype.name] if s.dtype else None, s.sizes)
            for s in ir.input_specs
        ]
        self._state = tuple(ir.state.items())
        self._constants = tuple(ir.constants.items())
        self._program = self._compile_program()
        self._loop_at = -1 if ir.loop is None else ir.loop.at
        self._writes = [tuple(r.slot for r in refs_in(op.out)) for op in ir.ops]
        self._outputs = self._lower.value(ir.outputs, "outputs")

    # ------------------------------------------------------------------ checking
    def _malformed(self, what: str, op_index: int | None = None) -> WireError:
        return WireError(
            f"malformed plan {self.ir.name!r}: {what}; rebuild and resend the plan",
            op_index=op_index,
            **self._where,
        )

    def _check_structure(self) -> tuple[set[int], int]:
        """Every slot in range, written once, before it is read: (input slots, slots used)."""
        ir = self.ir
        defined: set[int] = set()

        def define(ref: Any, what: str, index: int | None = None) -> None:
            if not isinstance(ref, Ref) or type(ref.slot) is not int:
                raise self._malformed(f"{what} must be a slot reference, not {ref!r}", index)
            if not 0 <= ref.slot < ir.num_slots:
                raise self._malformed(f"{what} writes slot {ref.slot} of {ir.num_slots}", index)
            if ref.slot in defined:
                raise self._malformed(f"{what} writes slot {ref.slot} a second time", index)
            defined.add(ref.slot)

        def read(value: Any, what: str, index: int | None = None) -> None:
            for ref in refs_in(value):
                if ref.slot not in defined:
                    raise self._malformed(
                        f"{what} reads slot {ref.slot} before it is written", index
                    )

        def check_out(pattern: Any, index: int) -> None:
            for leaf in tree_leaves(pattern, leaf=lambda v: isinstance(v, dict)):
                if leaf is not None and not isinstance(leaf, Ref):
                    raise self._malformed(f"op {index} writes its result to {leaf!r}", index)

        if not isinstance(ir.inputs, tuple) or not isinstance(ir.kwinputs, dict):
            raise self._malformed("inputs must be a tuple and kwinputs a dict")
        if type(ir.num_slots) is not int or ir.num_slots < 0:
            raise self._malformed(f"num_slots is {ir.num_slots!r}")
        for ref in refs_in((ir.inputs, ir.kwinputs)):
            define(ref, "an input")
        inputs = set(defined)
        for name, slot in ir.state.items():
            define(Ref(slot), f"state {name!r}")
        for slot, tensor in ir.constants.items():
            define(Ref(slot), "a constant")
            if not isinstance(tensor, torch.Tensor):
                raise self._malformed(f"constant slot {slot} holds {type(tensor).__name__}")
        for spec in ir.input_specs:
            if spec.slot not in inputs:
                raise self._malformed(f"input spec {spec.path!r} names slot {spec.slot}")
            if spec.dtype is not None and spec.dtype.name not in DTYPES:
                raise self._malformed(f"input spec {spec.path!r} has dtype {spec.dtype.name!r}")
        loop = ir.loop
        if loop is not None and (type(loop.at) is not int or not 0 <= loop.at <= len(ir.ops)):
            raise self._malformed(f"the loop runs after op {loop.at!r} of {len(ir.ops)}")
        for index, op in enumerate(ir.ops):
            if loop is not None and index == loop.at:
                read(loop.reads(), "the loop")
                define(loop.out, "the loop")
            read((op.args, op.kwargs), f"op {index} ({op.target})", index)
            if not isinstance(op.expect, NoExpect) and refs_in(op.expect):
                raise self._malformed(f"guard op {index} expects a slot value", index)
            check_out(op.out, index)
            for ref in refs_in(op.out):
                define(ref, f"op {index} ({op.target})", index)
        if loop is not None and loop.at == len(ir.ops):
            read(loop.reads(), "the loop")
            define(loop.out, "the loop")
        read(ir.outputs, "the outputs")
        return inputs, max(defined, default=-1) + 1  # a huge num_slots allocates nothing

    # ------------------------------------------------------------------ compiling
    def _compile_program(self) -> list[tuple[Step, tuple[int, ...]]]:
        ir = self.ir
        keep = {r.slot for r in refs_in(ir.outputs)} | set(ir.state.values())
        last_read: dict[int, int] = {}
        for index, op in enumerate(ir.ops):
            for ref in refs_in((op.args, op.kwargs)):
                last_read[ref.slot] = index
        if ir.loop is not None:  # what the loop reads lives until the op after it
            for ref in ir.loop.reads():
                if ir.loop.at < len(ir.ops):
                    last_read[ref.slot] = max(last_read.get(ref.slot, -1), ir.loop.at)
                else:
                    keep.add(ref.slot)
        free_after: list[list[int]] = [[] for _ in ir.ops]
        for slot, index in last_read.items():
            if slot not in keep:
                free_after[index].append(slot)
        for index, op in enumerate(ir.ops):  # results nobody reads
            for ref in refs_in(op.out):
                if ref.slot not in keep and ref.slot not in last_read:
                    free_after[index].append(ref.slot)
        return [
            (self._compile_op(index, op), tuple(sorted(free_after[index])))
            for index, op in enumerate(ir.ops)
        ]

    def _compile_op(self, index: int, op: Op) -> Step:
        what = f"op {index} ({op.target})"
        func = resolve(op.target)
        args = [self._lower.value(a, what, index) for a in op.args]
        kwargs = {k: self._lower.value(v, what, index) for k, v in op.kwargs.items()}
        call = make_call(func, args, kwargs)
        out = op.out
        if not isinstance(op.expect, NoExpect):
            expected = self._lower.value(op.expect, what, index)
            assert isinstance(expected, Const)  # refs in expect were refused above
            return self._guard_step(index, op, call, expected.value)
        if isinstance(out, Ref):
            slot = out.slot

            def step(s: Slots) -> None:
                s[slot] = call(s)

            return step
        store = self._make_store(index, op)

        def stepped(s: Slots) -> None:
            store(s, call(s))

        return stepped

    def _guard_step(self, index: int, op: Op, call: Getter, expected: Any) -> Step:
        store = self._make_store(index, op)
        where = self._where

        def guarded(s: Slots) -> None:
            actual = call(s)
            if not same_value(actual, expected):
                raise PlanGuardError(
                    f"guard failed at {op.source or op.target}: traced {_short(expected)}, "
                    f"now {_short(actual)}",
                    op_index=index,
                    **where,
                )
            store(s, actual)

        return guarded

    def _make_store(self, index: int, op: Op) -> Callable[[Slots, Any], None]:
        where, source, out = self._where, op.source or op.target, op.out

        def store(s: Slots, pattern: Any, result: Any) -> None:
            if isinstance(pattern, Ref):
                s[pattern.slot] = result
            elif isinstance(pattern, tuple | list):
                if not isinstance(result, tuple | list) or len(result) != len(pattern):
                    now = len(result) if isinstance(result, tuple | list) else "1"
                    raise PlanGuardError(
                        f"guard failed at {source}: traced {len(pattern)} outputs, now {now}; "
                        "the inputs produce a different number of values than at build",
                        op_index=index,
                        **where,
                    )
                for sub, value in zip(pattern, result, strict=True):
                    store(s, sub, value)

        return lambda s, result: store(s, out, result)

    def _compile_binder(self) -> Callable[[Slots, tuple[Any, ...], dict[str, Any]], None]:
        """A function that checks a call's arguments against the input patterns, fills slots."""
        ir, where = self.ir, self._where
        count, keys = len(ir.inputs), set(ir.kwinputs)
        patterns = [(f"args[{i}]", self._lower_pattern(p)) for i, p in enumerate(ir.inputs)]
        patterns += [(f"kwargs[{k!r}]", self._lower_pattern(p)) for k, p in ir.kwinputs.items()]
        direct = all(isinstance(p, SlotRead) for _, p in patterns)
        slots = [p.slot for _, p in patterns if isinstance(p, SlotRead)]
        kw_order = tuple(ir.kwinputs)

        def bind(s: Slots, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(args) != count or kwargs.keys() != keys:
                raise PlanInputError(_arity_message(ir, args, kwargs), **where)
            values = (*args, *(kwargs[k] for k in kw_order)) if kw_order else args
            if direct:
                for slot, value in zip(slots, values, strict=True):
                    s[slot] = value
                return
            for (path, pattern), value in zip(patterns, values, strict=True):
                _match(s, pattern, value, path, where)

        return bind

    def _lower_pattern(self, pattern: Any) -> Any:
        """Input pattern with Refs as ``SlotRead`` and every other leaf a lowered ``Const``."""
        return tree_map(self._lower_input, pattern)

    def _lower_input(self, leaf: Any) -> SlotRead | Const:
        if isinstance(leaf, Ref):
            return SlotRead(leaf.slot)
        compiled = self._lower.value(leaf, "an input")
        if not isinstance(compiled, Const):
            raise self._malformed(f"input pattern holds {leaf!r}")
        return compiled

    # ------------------------------------------------------------------ running
    def run(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        state: Mapping[str, Any],
        *,
        watch: Watch | None = None,
        constants: Mapping[int, Any] | None = None,
    ) -> Any:
        """Run the plan on ``args``/``kwargs`` with live ``state`` tensors (updated in place).

        Raises ``PlanInputError``/``PlanShapeError`` before any op runs when the call does
        not match what the trace relied on, ``PlanGuardError`` when a guard breaks and
        ``PlanExecutionError`` (chained) when an op raises. Grad mode is restored and the
        ``.grad`` of every state tensor is ``None`` again on return, even on error.

        Examples
        --------
        >>> from schemas.ir import Op, PlanIR, Ref
        >>> ir = PlanIR(name="scale", inputs=(Ref(0),), state={"w": 1}, num_slots=3,
        ...     ops=[Op("torch.mul", (Ref(0), Ref(1)), {}, Ref(2))], outputs=Ref(2))
        >>> LoadedPlan(ir).run((torch.ones(2),), {}, {"w": torch.tensor(3.0)})
        tensor([3., 3.])

        ``watch`` (see :data:`Watch`) is called after every op; ``constants`` replaces the
        plan's constant tensors for this run (the allocation pre-check runs on meta tensors).
        """
        slots: Slots = [None] * self._size
        self._bind(slots, args, kwargs)
        self._check_specs(slots)
        live = self._bind_state(slots, state)
        for slot, tensor in self._constants:
            slots[slot] = tensor if constants is None else constants[slot]
        grad_mode = torch.is_grad_enabled()
        _clear_grads(live)
        index = -1
        try:
            writes = self._writes
            for step, free in self._program:
                index += 1
                if index == self._loop_at:
                    self._run_loop(slots, state)
                step(slots)
                if watch is not None:
                    watch(index, slots, writes[index], free)
                for slot in free:
                    slots[slot] = None
            if self._loop_at == len(self._program):
                self._run_loop(slots, state)
            index = -1  # past the ops: a failure now is in the outputs' size expressions
            return get(self._outputs, slots)
        except FedplanError:
            raise
        except Exception as exc:
            op = self.ir.ops[index] if index >= 0 else None
            what = f"op {index} ({op.target})" if op else "the outputs"
            at = f" at {op.source}" if op and op.source else ""
            if is_out_of_memory(exc):
                raise MemoryLimitError(
                    f"{what}{at} ran out of the memory the device allows a command "
                    f"({type(exc).__name__}: {exc}); no result was stored. Use smaller inputs or "
                    "ask the operator (FEDPLAN_POOL_MEMORY_LIMIT, budget max_alloc_bytes)",
                    op_index=index if op else None,
                    **self._where,
                ) from exc
            raise PlanExecutionError(
                f"{what}{at} failed: {type(exc).__name__}: {exc}",
                op_index=index if op else None,
                **self._where,
            ) from exc
        finally:
            torch._C._set_grad_enabled(grad_mode)
            _clear_grads(live)

    def _run_loop(self, slots: Slots, state: Mapping[str, Any]) -> None:
        assert self._loop is not None
        self._loop.run(slots, state)

    def _check_specs(self, slots: Slots) -> None:
        for slot, path, ndim, dtype, sizes in self._specs:
            value = slots[slot]
            if not isinstance(value, torch.Tensor):
                raise PlanInputError(
                    f"input {path}: plan {self.ir.name!r} expects a tensor, "
                    f"got {type(value).__name__}",
                    **self._where,
                )
            if value.dim() != ndim:
                raise PlanShapeError(
                    f"input {path}: expected {ndim} dims, received shape "
                    f"{tuple(value.shape)}; rebuild the plan for this shape",
                    **self._where,
                )
            if dtype is not None and value.dtype != dtype:
                raise PlanShapeError(
                    f"input {path}: expected dtype {dtype}, received {value.dtype}; "
                    "convert the input or rebuild the plan",
                    **self._where,
                )
            for dim, size in sizes.items():
                if value.shape[dim] != size:
                    raise PlanShapeError(
                        f"input {path}: the plan relies on size {size} in dim {dim}, "
                        f"received shape {tuple(value.shape)}; rebuild the plan for it",
                        **self._where,
                    )

    def _bind_state(self, slots: Slots, state: Mapping[str, Any]) -> list[torch.Tensor]:
        live: list[torch.Tensor] = []
        for name, slot in self._state:
            tensor = state.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise PlanInputError(
                    f"plan {self.ir.name!r} needs state tensor {name!r}, got "
                    f"{type(tensor).__name__}; store the plan with its state first",
                    **self._where,
                )
            slots[slot] = tensor
            live.append(tensor)
        return live

    def __repr__(self) -> str:
        return f"LoadedPlan({self.ir.name!r}, ops={len(self.ir.ops)}, id={self.plan_id!r})"


# ---------------------------------------------------------------------- helpers
def _clear_grads(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        if tensor.is_leaf and tensor.grad is not None:  # non-leaf .grad reads warn
            tensor.grad = None


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _arity_message(ir: PlanIR, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    expected = f"{len(ir.inputs)} positional input(s)"
    if ir.kwinputs:
        expected += f" and keyword input(s) {sorted(ir.kwinputs)}"
    received = f"{len(args)} positional"
    if kwargs:
        received += f" and keywords {sorted(kwargs)}"
    return f"plan {ir.name!r} takes {expected}, received {received}; call it as it was built"


def _match(s: Slots, pattern: Any, value: Any, path: str, where: dict[str, Any]) -> None:
    """Bind ``value`` to the slots of ``pattern``; ``PlanInputError`` naming the path if not."""
    if isinstance(pattern, SlotRead):
        s[pattern.slot] = value
    elif isinstance(pattern, tuple | list):
        if not isinstance(value, tuple | list) or len(value) != len(pattern):
            got = f"{len(value)} items" if isinstance(value, tuple | list) else type(value).__name__
            raise PlanInputError(
                f"input {path}: expected a sequence of {len(pattern)} items, received {got}",
                **where,
            )
        for i, (sub, item) in enumerate(zip(pattern, value, strict=True)):
            _match(s, sub, item, f"{path}[{i}]", where)
    elif isinstance(pattern, dict):
        if not isinstance(value, Mapping) or set(value) != set(pattern):
            got = str(sorted(value)) if isinstance(value, Mapping) else type(value).__name__
            raise PlanInputError(
                f"input {path}: expected a dict with keys {sorted(pattern)}, received {got}",
                **where,
            )
        for key, sub in pattern.items():
            _match(s, sub, value[key], f"{path}[{key!r}]", where)
    elif not same_value(value, pattern.value):
        raise PlanInputError(
            f"input {path}: the plan was built with the constant {pattern.value!r}, received "
            f"{value!r}; pass the same value or build another plan",
            **where,
        )
