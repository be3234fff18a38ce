"""Lowers IR values into constants or slot getters, and op calls into fast closures."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from schemas.ir import Device, DType, EllipsisValue, MemoryFormat, ObjectId, Ref, Slice, SymExpr

Slots = list[Any]
Getter = Callable[[Slots], Any]
Fail = Callable[[str, "int | None"], Exception]

_MAX_EXPONENT = 64


def _bounded_pow(base: Any, exponent: Any) -> Any:
    """``base ** exponent`` for sizes; a huge exponent from a received plan must not hang."""
    if abs(exponent) > _MAX_EXPONENT:
        raise OverflowError(f"size exponent {exponent} is larger than {_MAX_EXPONENT}")
    return operator.pow(base, exponent)


SYM_OPS: dict[str, tuple[Callable[..., Any], int, int]] = {
    # name: (function, min arity, max arity); integer arithmetic only, never eval
    "add": (operator.add, 2, 2),
    "sub": (operator.sub, 2, 2),
    "mul": (operator.mul, 2, 2),
    "floordiv": (operator.floordiv, 2, 2),
    "mod": (operator.mod, 2, 2),
    "truediv": (operator.truediv, 2, 2),
    "pow": (_bounded_pow, 2, 2),
    "neg": (operator.neg, 1, 1),
    "max": (max, 1, 64),
    "min": (min, 1, 64),
}

_DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "uint8", "int8",
    "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64", "float", "double",
    "half", "long", "int", "short", "cfloat", "cdouble",
)  # fmt: skip
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _DTYPE_NAMES}
"""dtype by IR name: the names are ours; a received name is only looked up here."""

MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}

DEVICE_NAME = re.compile(r"(cpu|cuda|mps|meta|xpu)(:[0-9]{1,3})?")


class Const:
    """A compiled value known at load time."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class SlotRead:
    """A compiled value read straight from one slot."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


Compiled = Const | SlotRead | Getter


def as_getter(compiled: Compiled) -> Getter:
    if isinstance(compiled, Const):
        value = compiled.value
        return lambda _s: value
    if isinstance(compiled, SlotRead):
        return operator.itemgetter(compiled.slot)
    return compiled


def same_value(actual: Any, expected: Any) -> bool:
    """Guard equality: tensors by value, sequences element-wise, NaN equal to NaN."""
    if isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor):
        return (
            isinstance(actual, torch.Tensor)
            and isinstance(expected, torch.Tensor)
            and actual.shape == expected.shape
            and actual.dtype == expected.dtype
            and bool(torch.equal(actual, expected))
        )
    if isinstance(actual, tuple | list) and isinstance(expected, tuple | list):
        return len(actual) == len(expected) and all(map(same_value, actual, expected))
    if isinstance(actual, float) and isinstance(expected, float) and actual != actual:
        return expected != expected
    try:
        return bool(actual == expected)
    except Exception:  # an object whose == raises or is not a bool: not the same
        return False


class Lowering:
    """Turns IR values into ``Const``/``SlotRead``/getters; ``fail`` builds the error to raise.

    Every name that reaches torch (dtype, device, memory format, size-expression op) goes
    through a fixed table here: nothing received is resolved with ``getattr`` or ``eval``.
    """

    def __init__(self, fail: Fail) -> None:
        self._fail = fail

    def value(self, value: Any, what: str, index: int | None = None) -> Compiled:
        """Lower a value pattern into a constant or a getter over the slot list."""
        if isinstance(value, Ref):
            return SlotRead(value.slot)
        if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
            return Const(value)
        if isinstance(value, DType):
            if value.name not in DTYPES:
                raise self._fail(f"{what} names unknown dtype {value.name!r}", index)
            return Const(DTYPES[value.name])
        if isinstance(value, Device):
            if not DEVICE_NAME.fullmatch(value.name):
                raise self._fail(f"{what} names unknown device {value.name!r}", index)
            return Const(torch.device(value.name))
        if isinstance(value, MemoryFormat):
            if value.name not in MEMORY_FORMATS:
                raise self._fail(f"{what} names unknown memory format {value.name!r}", index)
            return Const(MEMORY_FORMATS[value.name])
        if isinstance(value, EllipsisValue):
            return Const(Ellipsis)
        if isinstance(value, SymExpr):
            return self._sym(value, what, index)
        if isinstance(value, Slice):
            parts = [self.value(v, what, index) for v in (value.start, value.stop, value.step)]
            return _combine(parts, lambda vs: slice(*vs))
        if isinstance(value, tuple | list):
            kind = type(value) if type(value) in (tuple, list) else tuple
            return _combine([self.value(v, what, index) for v in value], kind)
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            keys = tuple(value)
            parts = [self.value(value[k], what, index) for k in keys]
            return _combine(parts, lambda vs: dict(zip(keys, vs, strict=True)))
        if isinstance(value, ObjectId):
            raise self._fail(f"{what} holds a device object id; plans hold slots", index)
        raise self._fail(f"{what} holds a {type(value).__name__}", index)

    def _sym(self, expr: SymExpr, what: str, index: int | None) -> Compiled:
        entry = SYM_OPS.get(expr.op) if isinstance(expr.op, str) else None
        if entry is None or not entry[1] <= len(expr.args) <= entry[2]:
            raise self._fail(f"{what} has a bad size expression {expr.op!r}", index)
        func = entry[0]
        for arg in expr.args:
            if not isinstance(arg, SymExpr | Ref) and type(arg) is not int:
                raise self._fail(f"{what} has a size expression over {arg!r}", index)
        getters = [as_getter(self.value(a, what, index)) for a in expr.args]
        # evaluated when the plan runs (never folded at load): errors are execution errors
        return lambda s: func(*[g(s) for g in getters])


def get(compiled: Compiled, slots: Slots) -> Any:
    return compiled.value if isinstance(compiled, Const) else as_getter(compiled)(slots)


def _combine(parts: list[Compiled], build: Callable[[Any], Any]) -> Compiled:
    """A constant when every part is constant, else a getter building from the parts."""
    if all(isinstance(p, Const) for p in parts):
        return Const(build([p.value for p in parts if isinstance(p, Const)]))
    getters = [as_getter(p) for p in parts]
    return lambda s: build([g(s) for g in getters])


def make_call(
    func: Callable[..., Any], args: list[Compiled], kwargs: dict[str, Compiled]
) -> Getter:
    """A closure calling ``func`` with the args read from slots, fast for common shapes."""
    if all(isinstance(v, Const) for v in kwargs.values()):
        if kwargs:
            const_kw = {k: v.value for k, v in kwargs.items() if isinstance(v, Const)}
            func = partial(func, **const_kw)
        if all(isinstance(a, SlotRead) for a in args):
            return _call_slots(func, [a.slot for a in args if isinstance(a, SlotRead)])
        if all(isinstance(a, Const | SlotRead) for a in args):
            return _call_template(func, args)
    arg_getters = [as_getter(a) for a in args]
    kw_getters = {k: as_getter(v) for k, v in kwargs.items()}
    return lambda s: func(*[g(s) for g in arg_getters], **{k: g(s) for k, g in kw_getters.items()})


def _call_template(func: Callable[..., Any], args: list[Compiled]) -> Getter:
    """Args that are constants or plain slots: fill a template (two-arg forms inlined)."""
    template = [a.value if isinstance(a, Const) else None for a in args]
    refs = [(i, a.slot) for i, a in enumerate(args) if isinstance(a, SlotRead)]
    if len(args) == 2 and len(refs) == 1:
        pos, slot = refs[0]
        const = template[1 - pos]
        if pos == 0:
            return lambda s: func(s[slot], const)
        return lambda s: func(const, s[slot])

    def call(s: Slots) -> Any:
        values = template.copy()
        for pos, slot in refs:
            values[pos] = s[slot]
        return func(*values)

    return call


def _call_slots(func: Callable[..., Any], slots: list[int]) -> Getter:
    if len(slots) == 0:
        return lambda _s: func()
    if len(slots) == 1:
        (a,) = slots
        return lambda s: func(s[a])
    if len(slots) == 2:
        a, b = slots
        return lambda s: func(s[a], s[b])
    if len(slots) == 3:
        a, b, c = slots
        return lambda s: func(s[a], s[b], s[c])
    return lambda s: func(*[s[i] for i in slots])
