"""Tests for producer.plans.shapes: SymInt expressions lowered to SymExpr trees, size guards."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch

from producer.plans.shapes import SymbolicSizes, make_symbolic_sizes
from schemas.ir import Ref, SymExpr

_OPS: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "floordiv": operator.floordiv, "mod": operator.mod, "truediv": operator.truediv,
    "pow": operator.pow, "max": max, "min": min, "neg": operator.neg,
}  # fmt: skip


def evaluate(expr: SymExpr | Ref | int, slots: dict[int, int]) -> Any:
    """A reference evaluator written for the test (plain Python arithmetic)."""
    if isinstance(expr, Ref):
        return slots[expr.slot]
    if isinstance(expr, SymExpr):
        return _OPS[expr.op](*(evaluate(a, slots) for a in expr.args))
    return expr


def sizes_with_guards() -> tuple[SymbolicSizes, list[tuple[Any, str]]]:
    guards: list[tuple[Any, str]] = []
    sizes = make_symbolic_sizes(lambda ind, text: guards.append((ind, text)))
    assert sizes is not None
    return sizes, guards


@pytest.mark.parametrize(
    "build",
    [
        lambda n, m: n * 2,
        lambda n, m: n // 4 + m,
        lambda n, m: n % 4,
        lambda n, m: n * m - 3,
        lambda n, m: -n + 10,
        lambda n, m: torch.sym_max(n, m),
    ],
)
def test_size_expressions_lower_to_trees_that_compute_like_python(build: Any) -> None:
    sizes, guards = sizes_with_guards()
    n, m = sizes.symint(0, 6), sizes.symint(1, 5)
    lowered = sizes.lower(build(n, m))
    assert not guards
    for a, b in [(6, 5), (1, 9), (13, 2), (0, 0)]:
        assert evaluate(lowered, {0: a, 1: b}) == build(a, b)


def test_hint_gives_the_observed_value_without_a_guard() -> None:
    sizes, guards = sizes_with_guards()
    n = sizes.symint(0, 7)
    assert SymbolicSizes.hint(n * 3) == 21 and not guards


@pytest.mark.parametrize(
    "escape",
    [
        lambda n: n > 4,
        lambda n: n >= 7,
        lambda n: n < 3,
        lambda n: n <= 7,
        lambda n: n == 7,
        lambda n: n != 2,
        lambda n: n * 2 == 14,
    ],
)
def test_a_size_escaping_to_python_becomes_a_guard_true_exactly_when_the_condition_holds(
    escape: Any,
) -> None:
    sizes, guards = sizes_with_guards()
    n = sizes.symint(0, 7)
    observed = bool(escape(n))
    assert len(guards) == 1
    indicator, _ = guards[0]
    for value in range(0, 12):
        assert (evaluate(indicator, {0: value}) == 1) == (bool(escape(value)) == observed)


def test_int_of_a_size_guards_its_exact_value() -> None:
    sizes, guards = sizes_with_guards()
    n = sizes.symint(3, 5)
    assert list(range(n)) == [0, 1, 2, 3, 4]
    indicator, text = guards[0]
    assert "5" in text
    assert [evaluate(indicator, {3: v}) for v in (4, 5, 6)] == [0, 1, 0]


def test_symbolic_sizes_that_torch_cannot_give_fall_back_with_a_logged_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: SymbolicSizes, slot: int, value: int, label: str = "") -> Any:
        raise AttributeError("ShapeEnv.create_symbol moved")

    monkeypatch.setattr(SymbolicSizes, "symint", broken)
    assert make_symbolic_sizes(lambda ind, text: None) is None
    assert "symbolic sizes are unavailable" in caplog.text
    assert "ShapeEnv.create_symbol moved" in caplog.text
