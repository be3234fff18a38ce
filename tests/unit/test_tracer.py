"""Tests for producer.plans.tracer: traced plans replay like eager torch, guards and refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from consumer.runtime.interpreter import LoadedPlan
from producer.plans.capture import trace
from schemas.allowlist import is_allowed
from schemas.errors import PlanBuildError, PlanGuardError, PlanShapeError
from schemas.ir import PlanIR, SymExpr, refs_in


def replay(ir: PlanIR, *args: Any, state: dict[str, torch.Tensor] | None = None, **kw: Any) -> Any:
    return LoadedPlan(ir).run(args, kw, state or {})


def test_a_traced_function_names_every_op_with_an_allow_listed_target() -> None:
    ir = trace(lambda x: torch.abs(x + x).sum(0), (torch.randn(3, 2),), name="f").ir
    assert [op.target for op in ir.ops if not op.target.startswith("Tensor.size")]
    assert all(is_allowed(op.target) for op in ir.ops)
    x = torch.randn(5, 2)
    assert torch.equal(replay(ir, x), torch.abs(x + x).sum(0))


def test_a_symbolic_view_replays_on_other_batch_sizes() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return x.view(n * 2, -1).sum(1)

    ir = trace(f, (torch.randn(4, 6),), name="f").ir
    assert any(isinstance(a, SymExpr) for op in ir.ops for a in op.args)
    for batch in (1, 3, 7):
        x = torch.randn(batch, 6)
        assert torch.equal(replay(ir, x), f(x))


def test_flatten_of_the_batch_dim_with_size_arguments_replays_for_several_batches() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.size(0), -1) @ torch.ones(12, 2)

    ir = trace(f, (torch.randn(2, 3, 4),), name="f").ir
    for batch in (1, 5):
        x = torch.randn(batch, 3, 4)
        assert torch.allclose(replay(ir, x), f(x))


def test_a_guard_on_bool_fails_naming_the_line_when_the_branch_changes() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1

    ir = trace(f, (torch.ones(3),), name="f").ir
    guard = next(op for op in ir.ops if op.is_guard)
    assert "test_tracer.py:" in guard.source and "if x.sum() > 0:" in guard.source
    assert torch.equal(replay(ir, torch.full((3,), 2.0)), f(torch.full((3,), 2.0)))
    with pytest.raises(PlanGuardError, match=r"if x\.sum"):
        replay(ir, -torch.ones(3))


def test_a_guard_on_item_fails_when_the_value_changes() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * int(x.max().item())

    ir = trace(f, (torch.tensor([1.0, 3.0]),), name="f").ir
    assert torch.equal(replay(ir, torch.tensor([2.0, 3.0])), f(torch.tensor([2.0, 3.0])))
    with pytest.raises(PlanGuardError):
        replay(ir, torch.tensor([1.0, 4.0]))


def test_unpacking_a_tensor_guards_the_number_of_rows() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        a, b = x
        return a - b

    ir = trace(f, (torch.randn(2, 3),), name="f").ir
    x = torch.randn(2, 3)
    assert torch.equal(replay(ir, x), f(x))
    with pytest.raises(PlanGuardError):
        replay(ir, torch.randn(3, 3))


def test_split_records_one_slot_per_chunk() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        parts = x.split(2)
        return parts[0] + parts[-1]

    ir = trace(f, (torch.randn(4, 2),), name="f").ir
    split = next(op for op in ir.ops if op.target.endswith("split"))
    assert isinstance(split.out, tuple) and len(split.out) == 2
    x = torch.randn(4, 2)
    assert torch.equal(replay(ir, x), f(x))


def test_a_python_loop_over_a_size_is_guarded_with_its_line() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[0]):
            x = x * 2
        return x

    ir = trace(f, (torch.ones(3),), name="f").ir
    assert torch.equal(replay(ir, torch.full((3,), 2.0)), f(torch.full((3,), 2.0)))
    with pytest.raises(PlanGuardError, match="range"):
        replay(ir, torch.ones(4))


def test_a_size_comparison_guards_only_the_condition() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            return x.sum(0)
        return x.mean(0)

    ir = trace(f, (torch.randn(5, 2),), name="f", arg_names=["x"]).ir
    for batch in (3, 9):
        x = torch.randn(batch, 2)
        assert torch.allclose(replay(ir, x), f(x))
    with pytest.raises(PlanGuardError, match=r"if x\.shape\[0\] > 2: \[needs x\.shape\[0\] > 2\]"):
        replay(ir, torch.randn(2, 2))


def test_dims_that_are_not_dynamic_become_input_specs() -> None:
    ir = trace(
        lambda x: x.view(x.shape[0] * 2, x.shape[1] // 2),
        (torch.randn(3, 4),),
        name="f",
        arg_names=["x"],
        dynamic=lambda path, t: (0,),
    ).ir
    assert ir.input_specs[0].sizes == {1: 4}
    x = torch.randn(6, 4)
    assert torch.equal(replay(ir, x), x.view(12, 2))
    with pytest.raises(PlanShapeError):
        replay(ir, torch.randn(6, 5))


def test_dtype_and_unread_sizes_are_not_checked_but_a_dtype_read_is() -> None:
    plain = trace(lambda x: x.abs(), (torch.ones(1),), name="f").ir
    assert plain.input_specs[0].dtype is None and plain.input_specs[0].sizes == {}
    read = trace(lambda x: x.float() if x.dtype == torch.int64 else x, (torch.ones(1),), name="g")
    assert read.ir.input_specs[0].dtype is not None


def test_constants_created_inside_are_recorded_as_ops() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x + torch.tensor([1.0, 2.0]) * torch.arange(2)

    ir = trace(f, (torch.zeros(2),), name="f").ir
    assert not ir.constants
    x = torch.randn(2)
    assert torch.equal(replay(ir, x), f(x))


def test_a_captured_tensor_becomes_a_constant_copy() -> None:
    w = torch.tensor([2.0, 3.0])
    ir = trace(lambda x: x * w, (torch.ones(2),), name="f").ir
    assert len(ir.constants) == 1
    x = torch.randn(2)
    assert torch.equal(replay(ir, x), x * w)


def test_nested_inputs_kwargs_and_tuple_outputs_replay() -> None:
    def f(batch: tuple[torch.Tensor, list[torch.Tensor]], *, scale: torch.Tensor) -> Any:
        a, (b, c) = batch[0], batch[1]
        return a * scale, {"s": b + c}

    args = ((torch.randn(2), [torch.randn(2), torch.randn(2)]),)
    t = trace(f, args, {"scale": torch.tensor(3.0)}, name="f", arg_names=["batch"])
    assert [s.path for s in t.ir.input_specs] == ["batch[0]", "batch[1][0]", "batch[1][1]", "scale"]
    new = (torch.randn(2), [torch.randn(2), torch.randn(2)])
    got = replay(t.ir, new, scale=torch.tensor(-1.0))
    want = f(new, scale=torch.tensor(-1.0))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1]["s"], want[1]["s"])


def test_state_is_traced_by_identity_and_updated_in_place_on_replay() -> None:
    w = torch.randn(3, 2, requires_grad=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(x @ w, y)
        loss.backward()
        with torch.no_grad():
            w.sub_(0.1 * w.grad)
        w.grad = None
        return loss

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    ir = trace(step, (x, y), name="step", state={"w": w}).ir
    assert list(ir.state) == ["w"] and ir.state["w"] not in [r.slot for r in refs_in(ir.inputs)]
    mine = w.detach().clone().requires_grad_(True)
    eager = w.detach().clone().requires_grad_(True)
    for _ in range(3):
        replay(ir, x, y, state={"w": mine})
        loss = F.cross_entropy(x @ eager, y)
        loss.backward()
        with torch.no_grad():
            eager.sub_(0.1 * eager.grad)  # type: ignore[operator]
        eager.grad = None
    assert torch.allclose(mine, eager, atol=1e-6)


def test_a_custom_autograd_function_is_refused() -> None:
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 2 * x * g

    with pytest.raises(PlanBuildError, match=r"autograd\.Function"):
        trace(lambda x: Square.apply(x).sum(), (torch.ones(2, requires_grad=True),), name="f")


def test_an_in_place_write_to_a_captured_tensor_is_refused() -> None:
    counter = torch.zeros(1)

    def f(x: torch.Tensor) -> torch.Tensor:
        counter.add_(1)
        return x + counter

    with pytest.raises(PlanBuildError, match="captured"):
        trace(f, (torch.ones(1),), name="f")


def test_reading_the_grad_of_a_captured_tensor_is_refused() -> None:
    w = torch.ones(2, requires_grad=True)

    def f(x: torch.Tensor) -> Any:
        (x * w).sum().backward()
        return w.grad

    with pytest.raises(PlanBuildError, match="grad"):
        trace(f, (torch.ones(2),), name="f")


def test_momentum_sgd_and_adam_made_outside_the_plan_are_refused() -> None:
    w = torch.randn(2, requires_grad=True)

    def stepping(opt: torch.optim.Optimizer) -> Any:
        def step(x: torch.Tensor) -> torch.Tensor:
            opt.zero_grad()
            loss = (x * w).sum()
            loss.backward()
            opt.step()
            return loss

        return step

    for bad in (torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.Adam([w], lr=0.1)):
        with pytest.raises(PlanBuildError, match="SGD without momentum"):
            trace(stepping(bad), (torch.ones(2),), name="f", state={"w": w})
    trace(stepping(torch.optim.SGD([w], lr=0.1)), (torch.ones(2),), name="f", state={"w": w})


def test_an_optimizer_made_inside_the_plan_may_keep_momentum_for_the_call() -> None:
    def two_steps(w: torch.Tensor) -> Any:
        def run(x: torch.Tensor) -> torch.Tensor:
            opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
            for _ in range(2):
                opt.zero_grad()
                loss = ((x * w).sum() - 1) ** 2
                loss.backward()
                opt.step()
            w.grad = None
            return loss

        return run

    w = torch.randn(3, requires_grad=True)
    eager_w = w.detach().clone().requires_grad_(True)
    plan_w = w.detach().clone().requires_grad_(True)
    ir = trace(two_steps(w), (torch.ones(3),), name="f", state={"w": w}).ir
    eager = two_steps(eager_w)
    for _ in range(3):
        x = torch.randn(3)
        assert torch.allclose(replay(ir, x, state={"w": plan_w}), eager(x), atol=1e-6)
    assert torch.allclose(plan_w, eager_w, atol=1e-6)


def test_inference_mode_inside_a_plan_is_refused() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return x * 2

    with pytest.raises(PlanBuildError, match="inference_mode"):
        trace(f, (torch.ones(2),), name="f")


def test_an_op_outside_the_allow_list_is_refused_naming_the_line() -> None:
    def f(x: torch.Tensor) -> Any:
        return torch.from_numpy(x.numpy())

    with pytest.raises(PlanBuildError, match=r"test_tracer\.py:\d+: .*allow-list"):
        trace(f, (torch.ones(2),), name="f")


def test_print_inside_a_plan_is_dropped() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 3
        print(y)
        return y

    ir = trace(f, (torch.ones(2),), name="f").ir
    assert [op.target for op in ir.ops] == ["Tensor.mul"]


def test_the_guard_only_fallback_guards_each_size_it_hands_out() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0] * 2, -1)

    ir = trace(f, (torch.randn(4, 6),), name="f", symbolic=False).ir
    x = torch.randn(4, 6)
    assert torch.equal(replay(ir, x), f(x))
    with pytest.raises(PlanGuardError):
        replay(ir, torch.randn(5, 6))


def test_a_function_traced_under_no_grad_replays_without_grad() -> None:
    w = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        ir = trace(lambda x: x * w, (torch.ones(2),), name="f", state={"w": w}).ir
    out = replay(ir, torch.ones(2), state={"w": w})
    assert not out.requires_grad and torch.is_grad_enabled()


def test_returning_item_warns_that_the_value_is_baked_in() -> None:
    with pytest.warns(UserWarning, match=r"item\(\)"):
        trace(lambda x: (x * 2, x.sum().item()), (torch.ones(2),), name="f")
