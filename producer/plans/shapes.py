"""Symbolic sizes for the tracer: SymInts from a private ShapeEnv, lowered to ``SymExpr`` trees.

User code that reads ``x.shape`` while tracing receives ``torch.SymInt`` values backed by the
tracer's own ``ShapeEnv(specialize_zero_one=False, duck_shape=False)``; every symbol stands for
a slot holding the size (a recorded ``Tensor.size`` op). Arithmetic on those SymInts builds
sympy expressions, which :meth:`SymbolicSizes.lower` turns into ``SymExpr`` trees (never
strings). When a size escapes into Python (``int()``, ``range``, ``==``, ``if n > 1``) the
ShapeEnv records a guard; :class:`SymbolicSizes` hands it to a callback as an integer
*indicator* expression (1 when the condition holds) with the user's source line.

These are internal torch APIs (torch is pinned): :func:`make_symbolic_sizes` returns ``None``
when they are unavailable, and the tracer falls back to guarding every size it hands out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sympy
import torch

from schemas.errors import PlanBuildError
from schemas.ir import Ref, SymExpr

log = logging.getLogger(__name__)

GuardSink = Callable[[SymExpr | Ref | int, str], None]
"""Receives ``(indicator, condition_text)`` for each new guard; indicator must replay as 1."""

Lowered = SymExpr | Ref | int


class SymbolicUnsupported(PlanBuildError):
    """Symbolic sizes cannot express this trace; build again with guarded concrete sizes."""


class _GuardList(list[Any]):
    """``ShapeEnv.guards`` replacement that reports every guard as it is appended."""

    def __init__(self, on_guard: Callable[[Any], None]) -> None:
        super().__init__()
        self._on_guard = on_guard

    def append(self, guard: Any) -> None:
        super().append(guard)
        self._on_guard(guard)


class SymbolicSizes:
    """Symbols for sizes read while tracing, their slots, and the guards taken on them.

    Parameters
    ----------
    on_guard
        Called with ``(indicator, text)`` whenever user code makes a symbolic size concrete.
    """

    def __init__(self, on_guard: GuardSink) -> None:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self._env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
        self._env.guards = _GuardList(self._guard_added)
        self._on_guard = on_guard
        self._slot_of: dict[sympy.Symbol, int] = {}
        self._labels: dict[sympy.Symbol, sympy.Symbol] = {}
        self._count = 0

    def symint(self, slot: int, value: int, label: str = "") -> torch.SymInt:
        """A fresh SymInt standing for the int held in ``slot`` (observed ``value``).

        ``label`` (``x.shape[0]``) names it in guard conditions.
        """
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        self._count += 1
        symbol = self._env.create_symbol(
            value,
            ConstantSource(f"fedplan_size_{self._count}"),
            dynamic_dim=DimDynamic.DYNAMIC,
            positive=True,
        )
        if not isinstance(symbol, sympy.Symbol):  # ShapeEnv specialised it: keep it concrete
            raise SymbolicUnsupported(f"symbolic size {value} was specialised by the ShapeEnv")
        self._slot_of[symbol] = slot
        if label:
            self._labels[symbol] = sympy.Symbol(label)
        node = self._env.create_symintnode(symbol, hint=value)
        assert isinstance(node, torch.SymInt)
        return node

    @staticmethod
    def hint(value: torch.SymInt | torch.SymFloat | torch.SymBool) -> int | float | bool:
        """The concrete value observed while tracing, without recording a guard."""
        node = value.node
        hint = node.hint
        if hint is None:
            hint = node.shape_env.size_hint(node.expr)
        if isinstance(value, torch.SymInt):
            return int(hint)
        if isinstance(value, torch.SymBool):
            return bool(hint)
        return float(hint)

    def lower(self, value: torch.SymInt | torch.SymFloat | torch.SymBool) -> Lowered:
        """The ``SymExpr``/``Ref``/number for a SymInt's expression over size slots."""
        return self._lower_expr(value.node.expr)

    # -- sympy -> SymExpr -----------------------------------------------------------------

    def _lower_expr(self, expr: Any) -> Lowered:
        if isinstance(expr, sympy.Symbol):
            slot = self._slot_of.get(expr)
            if slot is None:
                raise SymbolicUnsupported(f"symbolic size {expr} has no slot")
            return Ref(slot)
        if isinstance(expr, sympy.Integer | sympy.logic.boolalg.BooleanAtom):
            return int(expr)
        if isinstance(expr, sympy.Rational):
            return SymExpr("truediv", (int(expr.p), int(expr.q)))
        kind = type(expr).__name__
        args = [self._lower_expr(a) for a in expr.args]
        if kind == "Add":
            return _fold("add", args)
        if kind == "Mul":
            return _fold("mul", args)
        if kind in {"Max", "Min"}:
            return _fold(kind.lower(), args)
        if kind == "FloorDiv":
            return SymExpr("floordiv", tuple(args))
        if kind in {"Mod", "PythonMod"}:
            return SymExpr("mod", tuple(args))
        if kind in {"IntTrueDiv", "FloatTrueDiv", "TrueDiv"}:
            return SymExpr("truediv", tuple(args))
        if kind in {"Pow", "PowByNatural", "FloatPow"}:
            return SymExpr("pow", tuple(args))
        raise SymbolicUnsupported(
            f"size expression {expr} uses {kind}, which plans cannot express; compute it "
            "with tensor ops or pass the value as an input"
        )

    def _indicator(self, cond: Any) -> Lowered:
        """An int expression that is 1 when ``cond`` holds and 0 otherwise."""
        kind = type(cond).__name__
        if kind == "BooleanTrue":
            return 1
        if kind == "BooleanFalse":
            return 0
        if kind == "Not":
            return SymExpr("sub", (1, self._indicator(cond.args[0])))
        if kind == "And":
            return _fold("min", [self._indicator(a) for a in cond.args])
        if kind == "Or":
            return _fold("max", [self._indicator(a) for a in cond.args])
        lhs, rhs = (self._lower_expr(a) for a in cond.args)
        if kind in {"Eq", "Equality"}:
            return SymExpr("sub", (1, _ne(lhs, rhs)))
        if kind in {"Ne", "Unequality"}:
            return _ne(lhs, rhs)
        if kind == "StrictGreaterThan":
            return _positive(SymExpr("sub", (lhs, rhs)))
        if kind == "GreaterThan":
            return _positive(SymExpr("add", (SymExpr("sub", (lhs, rhs)), 1)))
        if kind == "StrictLessThan":
            return _positive(SymExpr("sub", (rhs, lhs)))
        if kind == "LessThan":
            return _positive(SymExpr("add", (SymExpr("sub", (rhs, lhs)), 1)))
        raise SymbolicUnsupported(f"size condition {cond} ({kind}) cannot be guarded in a plan")

    def _guard_added(self, guard: Any) -> None:
        try:
            indicator = self._indicator(guard.expr)
        except SymbolicUnsupported:
            raise
        except Exception as exc:  # torch internals changed under us
            raise SymbolicUnsupported(f"cannot read size guard {guard!r}: {exc}") from exc
        self._on_guard(indicator, str(guard.expr.xreplace(self._labels)))


def _fold(op: str, args: list[Lowered]) -> Lowered:
    result = args[0]
    for arg in args[1:]:
        result = SymExpr(op, (result, arg))
    return result


def _positive(diff: SymExpr) -> SymExpr:
    """1 when the integer ``diff`` is > 0, else 0: ``min(max(diff, 0), 1)``."""
    return SymExpr("min", (SymExpr("max", (diff, 0)), 1))


def _ne(lhs: Lowered, rhs: Lowered) -> SymExpr:
    """1 when the integers differ, else 0."""
    return SymExpr(
        "add",
        (
            _positive(SymExpr("sub", (lhs, rhs))),
            _positive(SymExpr("sub", (rhs, lhs))),
        ),
    )


def make_symbolic_sizes(on_guard: GuardSink) -> SymbolicSizes | None:
    """A :class:`SymbolicSizes`, or ``None`` if torch's ShapeEnv API is unavailable."""
    try:
        sizes = SymbolicSizes(on_guard)
        sizes.symint(-1, 2)  # probe the internal API once
        return sizes
    except Exception:  # torch internals changed: trace with every size guarded instead
        log.warning(
            "symbolic sizes are unavailable in this torch; plans guard every size they read",
            exc_info=True,
        )
        return None
