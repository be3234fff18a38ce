"""Budgets enforced while one command runs: bytes its values hold, and its wall time.

The policy's ``max_alloc_bytes`` is checked three times for a plan (``RunPlan``):

1. when the plan is stored, tensor-creating ops with literal sizes
   (:mod:`consumer.policy.allocation`);
2. before it runs, from the actual argument shapes: the plan runs once on ``meta`` tensors
   (shapes and dtypes, no data, no memory; :func:`measure_plan`), so sizes that depend on
   the inputs (``torch.outer(x, x)``, ``x.new_zeros(n * n)``) are known. A run that the meta
   pass cannot follow (a guard reading a value, an op without a meta kernel) is not refused
   here;
3. while it runs: :class:`RunBudget` tallies after every op the bytes of the tensors the
   plan's slots hold (views and in-place results count nothing; a slot no longer read is
   freed) and stops the run over the budget. On a Celery device the pool process also has
   a memory limit (:mod:`consumer.worker.memory`), which catches what the tally cannot see
   (autograd's saved tensors, an op's own scratch memory).

An op (``RunOp``) is measured the same way on meta tensors before it runs.

The same watch checks the policy's ``max_wall_seconds`` between ops, so a plan is stopped
on an embedded device too (a single op is not interrupted there; a Celery device's alarm
interrupts it).

Example
-------
>>> import torch
>>> from schemas.ir import Op, PlanIR, Ref
>>> from consumer.runtime.interpreter import LoadedPlan
>>> ir = PlanIR(name="outer", inputs=(Ref(0),), num_slots=2,
...             ops=[Op("torch.outer", (Ref(0), Ref(0)), {}, Ref(1))], outputs=Ref(1))
>>> measure_plan(LoadedPlan(ir), (torch.ones(1000),), {}, {}, lambda n: ValueError(n))
4000000
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from schemas.errors import PolicyError

OverAlloc = Callable[[Any], Exception]
"""Builds the error for a run holding more than its budget (given the bytes)."""


class AllocBudgetExceeded(PolicyError):
    """A command's values passed the policy's ``max_alloc_bytes`` (wire: ``POLICY_REFUSED``)."""


def _leaves(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list) and depth < 8:
        for item in value:
            yield from _leaves(item, depth + 1)
    elif isinstance(value, dict) and depth < 8:
        for item in value.values():
            yield from _leaves(item, depth + 1)


def nbytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested tuples, lists, dicts)."""
    return sum(t.numel() * t.element_size() for t in _leaves(value))


class RunBudget:
    """The per-op watch of one run (:data:`consumer.runtime.interpreter.Watch`).

    Parameters
    ----------
    limit
        Bytes the run's slots may hold at once (0: not checked).
    over
        Builds the error raised past ``limit``.
    deadline, on_time
        ``time.monotonic()`` after which the run stops with ``on_time()`` (None: none).
    known
        Tensors the run received (arguments, state, constants): a slot holding one of
        them costs nothing.
    count
        Tally the bytes (and :attr:`peak`) even without a limit.

    Examples
    --------
    >>> budget = RunBudget(limit=100, over=lambda n: ValueError(f"{n} bytes"))
    >>> budget.watch(0, [torch.zeros(10)], (0,), ())
    >>> budget.watch(1, [torch.zeros(10), torch.zeros(20)], (1,), ())
    Traceback (most recent call last):
    ...
    ValueError: 120 bytes
    """

    def __init__(
        self,
        *,
        limit: int = 0,
        over: OverAlloc | None = None,
        deadline: float | None = None,
        on_time: Callable[[], Exception] | None = None,
        known: Iterable[Any] = (),
        count: bool = False,
    ) -> None:
        self.limit = limit
        self.count = count or limit > 0
        self.over = over or (lambda n: AllocBudgetExceeded(f"{n} bytes over the budget"))
        self.deadline = deadline
        self.on_time = on_time
        self.held = 0
        self.peak = 0
        self._known = {id(t) for t in _leaves(list(known))}
        self._known |= {id(t._base) for t in _leaves(list(known)) if t._base is not None}
        self._slots: dict[int, tuple[int, ...]] = {}  # slot -> ids of tensors it holds
        self._refs: dict[int, int] = {}  # tensor id -> slots holding it
        self._cost: dict[int, int] = {}  # tensor id -> bytes charged for it

    def watch(
        self, index: int, slots: list[Any], written: tuple[int, ...], freed: tuple[int, ...]
    ) -> None:
        """Charge what op ``index`` wrote, check the budget and the deadline, then free."""
        if self.count:
            for slot in written:
                self._hold(slot, slots[slot])
            if self.held > self.peak:
                self.peak = self.held
                if self.limit and self.held > self.limit:
                    raise self.over(self.held)
            for slot in freed:
                self._release(slot)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise self.on_time() if self.on_time else TimeoutError("deadline passed")

    def charge(self, value: Any) -> None:
        """Charge a result outside a plan (an op's output) and check the budget."""
        self._hold(-1, value)
        self.peak = max(self.peak, self.held)
        if self.limit and self.held > self.limit:
            raise self.over(self.held)

    def _hold(self, slot: int, value: Any) -> None:
        if slot in self._slots:
            self._release(slot)
        ids = []
        for tensor in (value,) if isinstance(value, torch.Tensor) else _leaves(value):
            base = tensor._base if tensor._is_view() else None
            owner = base if isinstance(base, torch.Tensor) else tensor  # a view holds its base
            key = id(owner)
            if key in self._known:
                continue
            ids.append(key)
            count = self._refs.get(key, 0)
            self._refs[key] = count + 1
            if count == 0:
                cost = owner.numel() * owner.element_size()
                self._cost[key] = cost
                self.held += cost
        self._slots[slot] = tuple(ids)

    def _release(self, slot: int) -> None:
        for key in self._slots.pop(slot, ()):
            count = self._refs[key] - 1
            if count:
                self._refs[key] = count
            else:
                del self._refs[key]
                self.held -= self._cost.pop(key)


class _Late(PolicyError):
    """The meta run passed the command's deadline."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an op failed for want of memory (Python's ``MemoryError`` or torch's
    allocator refusing: ``RuntimeError: ... can't allocate memory``).

    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    True
    """
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by a ``meta`` tensor of its shape and dtype."""
    if isinstance(value, torch.Tensor):
        meta = torch.empty(value.shape, dtype=value.dtype, device="meta")
        if value.requires_grad:
            meta.requires_grad_(True)
        return meta
    if isinstance(value, tuple):
        return tuple(to_meta(v) for v in value)
    if isinstance(value, list):
        return [to_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def measure_plan(
    loaded: Any,  # a consumer.runtime.interpreter.LoadedPlan
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    state: Mapping[str, torch.Tensor],
    over: OverAlloc,
    limit: int = 0,
    deadline: float | None = None,
    on_time: Callable[[], Exception] | None = None,
) -> int | None:
    """The most bytes the plan's slots hold at once on these arguments, from a run on
    ``meta`` tensors; ``None`` when the meta run cannot tell. Raises ``over(bytes)`` as
    soon as the run passes ``limit`` (when given), ``on_time()`` past ``deadline`` (the meta
    run counts against the command's wall time). The CPU random state is left as it was."""
    budget = RunBudget(
        limit=limit,
        over=lambda n: AllocBudgetExceeded(str(n)),
        count=True,
        deadline=deadline,
        on_time=on_time and (lambda: _Late()),
    )
    try:
        meta_args, meta_kwargs = to_meta(args), to_meta(kwargs)
        meta_state = {k: to_meta(v) for k, v in state.items()}
        meta_constants = {k: to_meta(v) for k, v in loaded.ir.constants.items()}
        budget._known = {id(t) for t in _leaves([meta_args, meta_kwargs, meta_state])}
        budget._known |= {id(t) for t in meta_constants.values()}
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            loaded.run(
                meta_args, meta_kwargs, meta_state, watch=budget.watch, constants=meta_constants
            )
    except AllocBudgetExceeded:
        raise over(budget.held) from None
    except _Late:
        raise on_time() if on_time else TimeoutError("deadline passed") from None
    except Exception:  # a guard reading a value, an op without a meta kernel: not known here
        return None
    return budget.peak


def measure_op(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """Bytes an op's result takes on these arguments (from a ``meta`` run); ``None`` when
    the meta run cannot tell."""
    try:
        meta_args, meta_kwargs = to_meta(args), to_meta(kwargs)
        with torch.random.fork_rng(devices=[]), torch.device("meta"), torch.no_grad():
            out = fn(*meta_args, **meta_kwargs)
    except Exception:
        return None
    known = {id(t) for t in _leaves([meta_args, meta_kwargs])}
    return sum(
        t.numel() * t.element_size()
        for t in _leaves(out)
        if id(t) not in known and not t._is_view()
    )


def deadline_of(seconds: float) -> float | None:
    """The ``time.monotonic()`` deadline ``seconds`` from now (None for 0: no budget)."""
    return time.monotonic() + seconds if seconds else None


__all__ = [
    "AllocBudgetExceeded",
    "RunBudget",
    "deadline_of",
    "is_out_of_memory",
    "measure_op",
    "measure_plan",
    "nbytes",
    "to_meta",
]
