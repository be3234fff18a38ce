"""Trace a Python function over real tensors into a ``PlanIR`` with a ``TorchFunctionMode``.

Why a ``TorchFunctionMode`` and not ATen ``make_fx``: the mode sees ``F.*`` calls, tensor
methods, operators, property reads/writes, ``backward`` and ``no_grad`` at the level users
write them, so a training step is ~half the ops of ``make_fx`` and replays at ~eager speed
(make_fx replay measured 1.25-1.4x); make_fx also fails on data-dependent ``if``s and
specialises a batch of 1. Whatever the mode makes concrete (``bool``, ``item()``, a size that
escapes into Python) becomes a guard checked on replay; see docs/tracing.md §1 and §4.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from producer.plans.refusals import (
    is_inplace,
    refuse_custom_function,
    user_source,
)
from producer.plans.shapes import SymbolicSizes, make_symbolic_sizes
from schemas.allowlist import name_of
from schemas.errors import PlanBuildError
from schemas.ir import (
    DType,
    InputSpec,
    Op,
    Ref,
    SymExpr,
    Value,
    to_ir_value,
)
from schemas.tree import tree_any, tree_leaves, tree_map

_DROPPED = ("_record_function", "Tensor.__repr__", "Tensor.__format__", "Tensor.__str__")
_SIZE_READS = {"Tensor.shape.__get__", "Tensor.size", "Tensor.__len__", "Tensor.numel",
               "Tensor.nelement", "Tensor.dim", "Tensor.ndim.__get__"}  # fmt: skip


_TRACING = threading.local()


def is_tracing() -> bool:
    """Whether this thread is inside :func:`trace` or :func:`inline_plans`.

    Plans called then run their Python code (to be traced as part of the caller).
    """
    return getattr(_TRACING, "depth", 0) > 0


@contextlib.contextmanager
def inline_plans() -> Iterator[None]:
    """Within the block, plans called on this thread run their Python code (eager runs)."""
    _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
    try:
        yield
    finally:
        _TRACING.depth -= 1


class Tracer(TorchFunctionMode):
    """Records every torch call into ops over slots; one tracer per :func:`trace` call."""

    def __init__(self, *, symbolic: bool = True) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.constants: dict[int, torch.Tensor] = {}
        self.specs: dict[int, InputSpec] = {}
        self.state_slots: set[int] = set()
        self.captured: set[int] = set()  # slots holding a tensor captured from outside
        self.data_reads: list[Any] = []  # floats/lists read from tensor data (item, tolist)
        self.dynamic: set[tuple[int, int]] = set()
        self._slot_of: dict[int, int] = {}
        self._alive: list[Any] = []  # keep traced objects alive: ids must not be reused
        self._num_slots = 0
        self._sym_cache: dict[tuple[int, int], torch.SymInt] = {}
        self.sizes: SymbolicSizes | None = (
            make_symbolic_sizes(self._size_guard) if symbolic else None
        )

    # -- slots ----------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def new_slot(self) -> int:
        self._num_slots += 1
        return self._num_slots - 1

    def bind(self, value: Any) -> Ref:
        """A fresh slot for ``value`` (an op result, input or state tensor)."""
        slot = self.new_slot()
        previous = self._slot_of.get(id(value))
        if previous in self.state_slots:  # an in-place op returned a state tensor
            self.state_slots.add(slot)
        elif previous in self.captured:  # e.g. contiguous() returned the captured tensor
            self.captured.add(slot)
        self._slot_of[id(value)] = slot
        self._alive.append(value)
        return Ref(slot)

    def slot_of(self, t: torch.Tensor) -> int:
        """The slot of a tensor; a tensor never seen before becomes a captured constant."""
        slot = self._slot_of.get(id(t))
        if slot is not None:
            return slot
        refuse_custom_function(t)
        slot = self.bind(t).slot
        const = t.detach().clone()
        if t.requires_grad and t.is_floating_point():
            const.requires_grad_(True)
        self.constants[slot] = const
        self.captured.add(slot)
        return slot

    def release(self) -> None:
        """Drop every reference to traced objects (state can be swapped back afterwards)."""
        self._alive.clear()
        self._slot_of.clear()
        self._sym_cache.clear()
        self.sizes = None

    # -- lowering -------------------------------------------------------------------------

    def lower(self, value: Any) -> Value:
        """The IR value for an op argument (tensors -> slots, SymInts -> expressions)."""
        return to_ir_value(value, self._lower_leaf)

    def _lower_leaf(self, value: Any) -> Value:
        if isinstance(value, torch.Tensor):
            return Ref(self.slot_of(value))
        if isinstance(value, torch.SymInt | torch.SymFloat):
            if self.sizes is None:
                return SymbolicSizes.hint(value)
            return self.sizes.lower(value)
        if isinstance(value, torch.SymBool):
            return bool(value)  # guards through the ShapeEnv
        raise PlanBuildError(
            f"{user_source()}: a value of type {type(value).__name__} cannot be part of a plan; "
            "pass tensors, numbers, strings, dtypes, devices or tuples/lists/dicts of them"
        )

    @staticmethod
    def concrete(value: Any) -> Any:
        """``value`` with SymInts replaced by their observed ints (for the real call).

        Named tuples and dicts are passed as they are; a ``torch.Size`` stays one.
        """
        return tree_map(_concrete_leaf, value, leaf=_kept_whole)

    # -- the mode -------------------------------------------------------------------------

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name = name_of(func)
        if name is None:
            described = torch.overrides.resolve_name(func) or repr(func)
            if any(d in described for d in _DROPPED):
                return func(*self.concrete(args), **self.concrete(kwargs))
            raise PlanBuildError(
                f"{user_source()}: {described} is not in the plan allow-list "
                "(schemas/allowlist.py), so a device would refuse it; rewrite this line "
                "with allowed torch ops"
            )
        if name in _DROPPED:
            return func(*self.concrete(args), **self.concrete(kwargs))
        if torch.is_inference_mode_enabled():
            raise PlanBuildError(
                f"{user_source()}: torch.inference_mode() is invisible to plans; "
                "use torch.no_grad() inside a plan instead"
            )
        self._check_refusals(name, args, kwargs)
        if name in _SIZE_READS:
            return self._size_read(name, func, args, kwargs)
        lowered_args = tuple(self.lower(a) for a in args)
        lowered_kwargs = {k: self.lower(v) for k, v in kwargs.items()}
        result = func(*self.concrete(tuple(args)), **self.concrete(kwargs))
        op = Op(name, lowered_args, lowered_kwargs, None)
        self._bind_result(op, result)
        self.ops.append(op)
        return result

    def _check_refusals(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            for t in tensors_in(value):
                refuse_custom_function(t)
        if name == "Tensor.grad.__get__" and self._slot_of.get(id(args[0])) in self.captured:
            raise PlanBuildError(
                f"{user_source()}: reads .grad of a tensor captured from outside the plan; "
                "make it plan state (a parameter/buffer or func2plan state=) or an input"
            )
        if is_inplace(name) or "out" in kwargs:
            targets = [*tensors_in(args[0] if args else None), *tensors_in(kwargs.get("out"))]
            for t in targets:
                if self._slot_of.get(id(t)) in self.captured or id(t) not in self._slot_of:
                    raise PlanBuildError(
                        f"{user_source()}: {name} writes in place to a tensor captured from "
                        "outside the plan (a closure or unregistered attribute); the write "
                        "would be lost on replay. Make it plan state or an input."
                    )

    def _bind_result(self, op: Op, result: Any) -> None:
        if isinstance(result, torch.Tensor):
            self._check_result(result)
            op.out = self.bind(result)
        elif (
            isinstance(result, tuple | list)
            and result
            and all(isinstance(r, torch.Tensor) for r in result)
        ):
            for r in result:
                self._check_result(r)
            op.out = tuple(self.bind(r) for r in result)
        elif result is None and not op.target.endswith(".__get__"):
            op.out = None
        elif _has_tensor(result):
            raise PlanBuildError(
                f"{user_source()}: {op.target} returned a mix of tensors and Python values, "
                "which a plan cannot record; restructure the call"
            )
        else:  # a Python value the trace depends on: guard it
            op.expect = self._lower_expect(op.target, result)
            op.source = user_source()
            spec = (
                self.specs.get(op.args[0].slot) if op.args and isinstance(op.args[0], Ref) else None
            )
            if spec is not None and op.target == "Tensor.dtype.__get__":
                spec.dtype = DType.of(result)  # the trace relied on the input's dtype
            if isinstance(result, float | list):
                self.data_reads.append(result)

    def _lower_expect(self, target: str, value: Any) -> Value:
        try:
            return self.lower(value)
        except PlanBuildError:
            raise PlanBuildError(
                f"{user_source()}: {target} returned a {type(value).__name__}, which a plan "
                "cannot check on replay; avoid using it inside the plan"
            ) from None

    @staticmethod
    def _check_result(t: torch.Tensor) -> None:
        if t.is_inference():
            raise PlanBuildError(
                f"{user_source()}: an inference tensor was produced (torch.inference_mode); "
                "use torch.no_grad() inside a plan instead"
            )

    # -- sizes ----------------------------------------------------------------------------

    def _size_read(
        self, name: str, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        t = args[0]
        result = func(*self.concrete(tuple(args)), **self.concrete(kwargs))
        slot = self.slot_of(t)
        if name in {"Tensor.dim", "Tensor.ndim.__get__"}:
            return result  # ndim is fixed by the input specs and the ops
        if name == "Tensor.size" and (len(args) > 1 or "dim" in kwargs):
            dim = self.concrete(args[1] if len(args) > 1 else kwargs["dim"])
            return self._size_of(slot, dim % max(t.dim(), 1), t)
        dims = [self._size_of(slot, d, t) for d in range(t.dim())]
        if name in {"Tensor.numel", "Tensor.nelement"}:
            total: Any = 1
            for d in dims:
                total = total * d
            return total
        if name == "Tensor.__len__":
            if not dims:
                return result  # torch raises for len() of a 0-d tensor
            return dims[0]
        return torch.Size(dims)

    def _size_of(self, slot: int, dim: int, t: torch.Tensor) -> Any:
        value = int(t.shape[dim])
        if slot in self.captured or slot in self.state_slots:
            return value
        spec = self.specs.get(slot)
        if spec is not None and (slot, dim) not in self.dynamic:
            spec.sizes[dim] = value
            return value
        cached = self._sym_cache.get((slot, dim))
        if cached is not None:
            return cached
        if self.sizes is None:  # guard-only fallback
            self.ops.append(Op("Tensor.size", (Ref(slot), dim), {}, None, value, user_source()))
            return value
        out = Ref(self.new_slot())
        self.ops.append(Op("Tensor.size", (Ref(slot), dim), {}, out))
        owner = self.specs[slot].path if slot in self.specs else f"_{slot}"
        sym = self.sizes.symint(out.slot, value, f"{owner}.shape[{dim}]")
        self._sym_cache[(slot, dim)] = sym
        return sym

    def _size_guard(self, indicator: SymExpr | Ref | int, condition: str) -> None:
        if isinstance(indicator, int):
            return
        holder = Ref(self.new_slot())
        self.ops.append(Op("torch.tensor", (indicator,), {}, holder))
        self.ops.append(
            Op("Tensor.item", (holder,), {}, None, 1, f"{user_source()} [needs {condition}]")
        )


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensor leaves of a (nested) value, in order."""
    return tree_leaves(value, keep=lambda v: isinstance(v, torch.Tensor))


def _has_tensor(value: Any) -> bool:
    return tree_any(lambda v: isinstance(v, torch.Tensor), value)


def _kept_whole(value: Any) -> bool:
    return isinstance(value, dict | torch.Size) or hasattr(value, "_fields")


def _concrete_leaf(value: Any) -> Any:
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return SymbolicSizes.hint(value)
    if isinstance(value, torch.Size):
        return torch.Size([Tracer.concrete(v) for v in value])
    if isinstance(value, slice):
        c = Tracer.concrete
        return slice(c(value.start), c(value.stop), c(value.step))
    return value


__all__ = ["Tracer", "inline_plans", "is_tracing", "tensors_in"]
