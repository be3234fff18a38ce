"""Bytes a plan or op will allocate, where its shapes are known before it runs.

Tensor-creating ops whose sizes are literal (``torch.zeros(10**9)``, ``torch.full((n, m),
...)`` with ``n``, ``m`` constants in the plan, ``x.new_zeros(...)``, ``torch.arange``...)
are counted; sizes that depend on inputs are not known before the run and count as zero
here (they are bounded by the output budget and the device's limits when the op runs).

Example
-------
>>> from schemas.ir import PlanIR, Op, Ref
>>> ir = PlanIR(name="f", inputs=(), ops=[Op("torch.zeros", (1000, 1000), {}, Ref(0))],
...             outputs=Ref(0), num_slots=1)
>>> plan_static_bytes(ir)
4000000
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from consumer.store.tensor_files import DTYPES
from schemas.ir import DType, PlanIR

_SIZES_FIRST = frozenset({"torch.zeros", "torch.ones", "torch.rand", "torch.randn"})
_NEW = frozenset({"Tensor.new_zeros", "Tensor.new_ones"})
_INT64 = frozenset({"torch.randint", "torch.randperm", "torch.arange"})


def _size(value: Any) -> int | None:
    """The element count of a size argument, ``None`` when not a literal size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, tuple | list | torch.Size) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return math.prod(max(v, 0) for v in value)
    return None


def _sizes(values: Iterable[Any]) -> int | None:
    values = list(values)
    if len(values) == 1:
        return _size(values[0])
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return math.prod(max(v, 0) for v in values)
    return None


def _element_size(target: str, kwargs: dict[str, Any]) -> int:
    dtype = kwargs.get("dtype")
    if isinstance(dtype, DType):
        dtype = DTYPES.get(dtype.name)
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).element_size()
    return 8 if target in _INT64 else torch.empty(0).element_size()


def static_bytes(target: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> int:
    """Bytes one call allocates for its result, when its sizes are literal (else 0)."""
    count: int | None = None
    if target in _SIZES_FIRST:
        count = _size(kwargs["size"]) if "size" in kwargs else _sizes(args)
    elif target == "torch.full" and args:
        count = _size(args[0])
    elif target in _NEW and len(args) > 1:
        count = _sizes(args[1:])
    elif target == "Tensor.new_full" and len(args) > 1:
        count = _size(args[1])
    elif target == "torch.randint" and args:
        count = _size(kwargs.get("size", args[-1]))
    elif target in ("torch.randperm", "torch.linspace") and args:
        count = _size(args[0] if target == "torch.randperm" else kwargs.get("steps", args[-1]))
    elif target == "torch.eye" and args:
        n, m = _size(args[0]), _size(args[1]) if len(args) > 1 else _size(args[0])
        count = n * m if n is not None and m is not None else None
    elif target == "torch.arange" and args and all(isinstance(a, int | float) for a in args):
        start, end, step = (0, args[0], 1) if len(args) == 1 else (*args[:2], *(args[2:3] or [1]))
        count = max(0, math.ceil((end - start) / step)) if step else None
    return 0 if count is None else count * _element_size(target, kwargs)


def plan_static_bytes(ir: PlanIR) -> int:
    """Bytes the plan's tensor-creating ops with literal sizes allocate, summed."""
    ops = [*ir.ops, *(ir.loop.body.ops if ir.loop is not None else ())]
    return sum(static_bytes(op.target, op.args, op.kwargs) for op in ops)


__all__ = ["plan_static_bytes", "static_bytes"]
