"""Tests for the plan interpreter: hand-written plans replayed and compared with eager torch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from consumer.runtime.interpreter import LoadedPlan
from schemas.errors import (
    OpNotAllowedError,
    PlanExecutionError,
    PlanGuardError,
    PlanInputError,
    PlanShapeError,
    WireError,
)
from schemas.ir import (
    Device,
    DType,
    EllipsisValue,
    InputSpec,
    Op,
    PlanIR,
    Ref,
    Slice,
    SymExpr,
)

R = Ref


def _double_abs() -> PlanIR:
    return PlanIR(
        name="double_abs",
        inputs=(R(0),),
        ops=[
            Op("Tensor.__add__", (R(0), R(0)), {}, R(1)),
            Op("torch.abs", (R(1),), {}, R(2)),
        ],
        outputs=R(2),
        num_slots=3,
    )


def _mlp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}


def _mlp_forward_ops() -> tuple[list[Op], dict[str, int]]:
    """x=0; state fc1.weight=1 fc1.bias=2 fc2.weight=3 fc2.bias=4; logits in slot 7."""
    state = {"fc1.weight": 1, "fc1.bias": 2, "fc2.weight": 3, "fc2.bias": 4}
    ops = [
        Op("torch.nn.functional.linear", (R(0), R(1), R(2)), {}, R(5)),
        Op("torch.nn.functional.relu", (R(5),), {}, R(6)),
        Op("torch.nn.functional.linear", (R(6), R(3), R(4)), {}, R(7)),
    ]
    return ops, state


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _training_step_plan(lr: float) -> PlanIR:
    """Forward, cross_entropy, backward, SGD update under no_grad; returns the detached loss."""
    ops, state = _mlp_forward_ops()
    x, y, loss = R(0), R(8), R(9)
    ops += [
        Op("torch.nn.functional.cross_entropy", (R(7), y), {}, loss),
        Op("Tensor.backward", (loss,), {}, None),
        Op("torch._C._set_grad_enabled", (False,), {}, None),
    ]
    free = 10
    for param in state.values():  # p -= lr * p.grad
        grad, step, updated = R(free), R(free + 1), R(free + 2)
        ops += [
            Op("Tensor.grad.__get__", (R(param),), {}, grad),
            Op("Tensor.__rmul__", (grad, lr), {}, step),
            Op("Tensor.sub_", (R(param), step), {}, updated),
        ]
        free += 3
    ops += [
        Op("torch._C._set_grad_enabled", (True,), {}, None),
        Op("Tensor.detach", (loss,), {}, R(free)),
    ]
    return PlanIR(
        name="train_step",
        inputs=(x, y),
        ops=ops,
        outputs=R(free),
        num_slots=free + 1,
        state=state,
    )


def test_double_abs_matches_eager() -> None:
    x = torch.tensor([-1.0, 2.0, -3.5])
    out = LoadedPlan(_double_abs()).run((x,), {}, {})
    assert torch.equal(out, torch.abs(x + x))


def test_an_mlp_forward_with_state_by_name_matches_the_eager_module() -> None:
    torch.manual_seed(0)
    model = _MLP()
    ops, state = _mlp_forward_ops()
    ir = PlanIR(name="mlp", inputs=(R(0),), ops=ops, outputs=R(7), num_slots=8, state=state)
    plan = LoadedPlan(ir, plan_id="p1", device_id="d1")
    for batch in (1, 5, 17):
        x = torch.randn(batch, 4)
        out = plan.run((x,), {}, dict(model.state_dict()))
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_a_training_step_replayed_five_times_equals_five_eager_sgd_steps() -> None:
    torch.manual_seed(1)
    model = _MLP()
    state = _mlp_state(model)
    plan = LoadedPlan(_training_step_plan(lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        loss = plan.run((x, y), {}, state)
        opt.zero_grad()
        eager_loss = F.cross_entropy(model(x), y)
        eager_loss.backward()
        opt.step()
        torch.testing.assert_close(loss, eager_loss.detach(), rtol=0, atol=1e-6)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name].detach(), tensor, rtol=0, atol=1e-6)
        assert state[name].grad is None  # .grad policy: cleared at the end of each call
    assert torch.is_grad_enabled()


def test_grad_of_state_is_cleared_at_the_start_of_each_call() -> None:
    torch.manual_seed(2)
    model = _MLP()
    state = _mlp_state(model)
    for tensor in state.values():
        tensor.grad = torch.full_like(tensor, 100.0)  # stale grads must not leak into the step
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    LoadedPlan(_training_step_plan(lr=0.5)).run((x, y), {}, state)
    torch.optim.SGD(model.parameters(), lr=0.5).zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name].detach(), tensor, rtol=0, atol=1e-6)


def _split_plan() -> PlanIR:
    return PlanIR(
        name="halves",
        inputs=(R(0),),
        ops=[
            Op("Tensor.split", (R(0), 2), {}, (R(1), R(2)), source="f.py:3: a, b = x.split(2)"),
            Op("torch.sub", (R(1), R(2)), {}, R(3)),
        ],
        outputs=R(3),
        num_slots=4,
    )


def test_split_with_the_traced_output_count_matches_eager() -> None:
    x = torch.arange(4.0)
    a, b = x.split(2)
    assert torch.equal(LoadedPlan(_split_plan()).run((x,), {}, {}), a - b)


def test_split_with_another_output_count_fails_its_guard_naming_the_source() -> None:
    with pytest.raises(PlanGuardError, match=r"f\.py:3.*traced 2 outputs, now 3") as info:
        LoadedPlan(_split_plan(), plan_id="p9").run((torch.arange(6.0),), {}, {})
    assert info.value.op_index == 0
    assert info.value.plan_id == "p9"


def _item_guard_plan() -> PlanIR:
    return PlanIR(
        name="positive",
        inputs=(R(0),),
        ops=[
            Op("torch.sum", (R(0),), {}, R(1)),
            Op("Tensor.__gt__", (R(1), 0), {}, R(2)),
            Op("Tensor.item", (R(2),), {}, R(3), expect=True, source="m.py:10: if x.sum() > 0:"),
            Op("torch.mul", (R(0), 2), {}, R(4)),
        ],
        outputs=(R(4), R(3)),
        num_slots=5,
    )


def test_an_item_guard_passes_when_the_value_is_the_same() -> None:
    x = torch.tensor([1.0, 2.0])
    out, flag = LoadedPlan(_item_guard_plan()).run((x,), {}, {})
    assert torch.equal(out, x * 2)
    assert flag is True


def test_an_item_guard_fails_when_the_value_changes() -> None:
    with pytest.raises(PlanGuardError, match=r"guard failed at m\.py:10: .*traced True, now False"):
        LoadedPlan(_item_guard_plan()).run((torch.tensor([-1.0, -2.0]),), {}, {})


def test_a_symbolic_view_follows_the_batch_size() -> None:
    # y = x.view(x.size(0) * 2, -1)[..., 1:3].to(float64)
    size0 = R(1)
    ir = PlanIR(
        name="sym_view",
        inputs=(R(0),),
        ops=[
            Op("Tensor.size", (R(0), 0), {}, size0),
            Op("Tensor.view", (R(0), SymExpr("mul", (size0, 2)), -1), {}, R(2)),
            Op("Tensor.__getitem__", (R(2), (EllipsisValue(), Slice(1, 3, None))), {}, R(3)),
            Op("Tensor.to", (R(3),), {"dtype": DType("float64")}, R(4)),
            Op("Tensor.to", (R(4), Device("cpu")), {}, R(5)),
        ],
        outputs=(R(5), SymExpr("floordiv", (size0, 1))),
        num_slots=6,
        input_specs=[InputSpec(slot=0, path="x", ndim=2, dtype=DType("float32"))],
    )
    plan = LoadedPlan(ir)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 8)
        out, n = plan.run((x,), {}, {})
        assert n == batch
        assert torch.equal(out, x.view(batch * 2, -1)[..., 1:3].to(torch.float64))


def _state_then(target: str, *args: Any) -> PlanIR:
    return PlanIR(
        name="sneaky",
        inputs=(R(0),),
        ops=[
            Op("Tensor.add_", (R(1), 1.0), {}, R(2)),
            Op(target, args, {}, R(3)),
        ],
        outputs=R(3),
        num_slots=4,
        state={"w": 1},
    )


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("os.system", ("echo pwned",)),
        ("builtins.eval", ("1+1",)),
        ("torch.load", ("/etc/passwd",)),
        ("Tensor.__reduce_ex__", (R(0), 2)),
    ],
)
def test_a_forbidden_op_is_refused_before_any_op_runs(target: str, args: tuple[Any, ...]) -> None:
    weight = torch.zeros(2)
    with pytest.raises(OpNotAllowedError, match="not in the allow-list") as info:
        plan = LoadedPlan(_state_then(target, *args), plan_id="p7", device_id="dev")
        plan.run((torch.ones(2),), {}, {"w": weight})
    assert (info.value.op_index, info.value.plan_id, info.value.device_id) == (1, "p7", "dev")
    assert info.value.plan_name == "sneaky"
    assert torch.equal(weight, torch.zeros(2))  # the in-place add_ on state never ran


def test_wrong_number_of_inputs_is_an_input_error() -> None:
    plan = LoadedPlan(_double_abs())
    with pytest.raises(PlanInputError, match="takes 1 positional input"):
        plan.run((torch.ones(1), torch.ones(1)), {}, {})
    with pytest.raises(PlanInputError, match="keywords"):
        plan.run((torch.ones(1),), {"y": torch.ones(1)}, {})


def test_nested_and_keyword_inputs_bind_and_check_structure_and_constants() -> None:
    ir = PlanIR(
        name="nested",
        inputs=((R(0), R(1)), "sum"),
        kwinputs={"scale": R(2)},
        ops=[
            Op("torch.add", (R(0), R(1)), {}, R(3)),
            Op("torch.mul", (R(3), R(2)), {}, R(4)),
        ],
        outputs={"out": R(4)},
        num_slots=5,
    )
    plan = LoadedPlan(ir)
    a, b = torch.ones(2), torch.arange(2.0)
    assert torch.equal(plan.run(((a, b), "sum"), {"scale": 3}, {})["out"], (a + b) * 3)
    with pytest.raises(PlanInputError, match=r"args\[0\]: expected a sequence of 2 items"):
        plan.run(((a,), "sum"), {"scale": 3}, {})
    with pytest.raises(PlanInputError, match=r"args\[1\]: the plan was built with the constant"):
        plan.run(((a, b), "mean"), {"scale": 3}, {})


def test_input_specs_reject_wrong_ndim_dtype_and_relied_on_size() -> None:
    ir = _double_abs()
    ir.input_specs = [InputSpec(slot=0, path="x", ndim=2, dtype=DType("float32"), sizes={1: 3})]
    plan = LoadedPlan(ir)
    torch.testing.assert_close(plan.run((-torch.ones(4, 3),), {}, {}), torch.full((4, 3), 2.0))
    with pytest.raises(PlanShapeError, match=r"input x: expected 2 dims, received shape \(3,\)"):
        plan.run((torch.ones(3),), {}, {})
    with pytest.raises(PlanShapeError, match=r"input x: expected dtype torch\.float32"):
        plan.run((torch.ones(4, 3, dtype=torch.int64),), {}, {})
    with pytest.raises(PlanShapeError, match="size 3 in dim 1"):
        plan.run((torch.ones(4, 5),), {}, {})
    with pytest.raises(PlanInputError, match=r"input x: .* expects a tensor"):
        plan.run(([1.0, 2.0],), {}, {})


def test_missing_state_is_an_input_error_naming_it() -> None:
    ops, state = _mlp_forward_ops()
    ir = PlanIR(name="mlp", inputs=(R(0),), ops=ops, outputs=R(7), num_slots=8, state=state)
    with pytest.raises(PlanInputError, match=r"fc2\.bias"):
        LoadedPlan(ir).run((torch.ones(1, 4),), {}, dict(_MLP().state_dict()) | {"fc2.bias": 1})


def test_an_op_that_raises_becomes_an_execution_error_and_grad_mode_is_restored() -> None:
    ir = PlanIR(
        name="bad_mm",
        inputs=(R(0), R(1)),
        ops=[
            Op("torch._C._set_grad_enabled", (False,), {}, None),
            Op("torch.mm", (R(0), R(1)), {}, R(2), source="f.py:2: x @ y"),
        ],
        outputs=R(2),
        num_slots=3,
    )
    plan = LoadedPlan(ir, plan_id="pid", device_id="dev")
    assert torch.is_grad_enabled()
    with pytest.raises(PlanExecutionError, match=r"op 1 \(torch.mm\) at f.py:2.*RuntimeError") as e:
        plan.run((torch.ones(2, 3), torch.ones(2, 3)), {}, {})
    assert isinstance(e.value.__cause__, RuntimeError)
    assert (e.value.op_index, e.value.plan_id, e.value.device_id) == (1, "pid", "dev")
    assert torch.is_grad_enabled()


def test_grad_mode_is_restored_when_the_caller_had_it_off() -> None:
    ir = PlanIR(
        name="enable",
        inputs=(R(0),),
        ops=[
            Op("torch._C._set_grad_enabled", (True,), {}, None),
            Op("torch.neg", (R(0),), {}, R(1)),
        ],
        outputs=R(1),
        num_slots=2,
    )
    with torch.no_grad():
        out = LoadedPlan(ir).run((torch.ones(1, requires_grad=True),), {}, {})
        assert not torch.is_grad_enabled()
    assert out.requires_grad


@pytest.mark.parametrize(
    ("ops", "outputs", "message"),
    [
        ([Op("torch.neg", (R(5),), {}, R(1))], R(1), "reads slot 5 before it is written"),
        ([Op("torch.neg", (R(0),), {}, R(9))], R(0), "writes slot 9 of 4"),
        ([Op("torch.neg", (R(0),), {}, R(0))], R(0), "writes slot 0 a second time"),
        ([Op("torch.neg", (R(0),), {}, "x")], R(0), "writes its result to 'x'"),
        ([Op("torch.neg", (R(0),), {}, R(1))], R(3), "outputs reads slot 3"),
        ([Op("Tensor.to", (R(0), DType("evil")), {}, R(1))], R(1), "unknown dtype 'evil'"),
        ([Op("Tensor.to", (R(0), Device("file:/x")), {}, R(1))], R(1), "unknown device"),
        ([Op("Tensor.view", (R(0), SymExpr("exec", (1,))), {}, R(1))], R(1), "size expression"),
        ([Op("torch.neg", (R(0),), {}, R(1), expect=R(0))], R(1), "expects a slot value"),
        ([Op("torch.neg", (object(),), {}, R(1))], R(1), "holds a object"),
    ],
)
def test_a_malformed_plan_is_a_wire_error_not_a_crash(
    ops: list[Op], outputs: Any, message: str
) -> None:
    ir = PlanIR(name="broken", inputs=(R(0),), ops=ops, outputs=outputs, num_slots=4)
    with pytest.raises(WireError, match=message):
        LoadedPlan(ir)


def test_intermediate_slots_are_freed_after_their_last_use_but_outputs_and_state_are_kept() -> None:
    ir = PlanIR(
        name="chain",
        inputs=(R(0),),
        ops=[
            Op("torch.mul", (R(0), R(1)), {}, R(2)),
            Op("torch.neg", (R(2),), {}, R(3)),
            Op("torch.abs", (R(3),), {}, R(4)),
            Op("torch.exp", (R(2),), {}, R(5)),  # result unused
        ],
        outputs=R(4),
        num_slots=6,
        state={"w": 1},
    )
    plan = LoadedPlan(ir)
    assert [free for _, free in plan._program] == [(0,), (), (3,), (2, 5)]
    w = torch.tensor(2.0)
    torch.testing.assert_close(plan.run((torch.ones(2),), {}, {"w": w}), torch.full((2,), 2.0))


def test_a_plan_runs_the_same_twice_and_in_place_state_updates_persist() -> None:
    ir = PlanIR(
        name="counter",
        inputs=(),
        ops=[Op("Tensor.add_", (R(0), R(1)), {}, R(2))],
        outputs=R(2),
        num_slots=3,
        state={"n": 0},
        constants={1: torch.tensor(1)},
    )
    n = torch.tensor(0)
    plan = LoadedPlan(ir)
    plan.run((), {}, {"n": n})
    out = plan.run((), {}, {"n": n})
    assert int(n) == 2 and out is n


def test_autograd_grad_and_foreach_updates_over_lists_of_state_match_eager() -> None:
    # g1, g2 = torch.autograd.grad((w1 * x).sum() + (w2 * x).sum(), [w1, w2])
    # torch._foreach_add_([w1, w2], [g1, g2], alpha=-0.5)
    w1, w2 = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    state = {"w1": w1.detach().clone().requires_grad_(), "w2": w2.detach().clone().requires_grad_()}
    x = torch.randn(3)
    ir = PlanIR(
        name="grads",
        inputs=(R(0),),
        ops=[
            Op("torch.mul", (R(1), R(0)), {}, R(3)),
            Op("Tensor.sum", (R(3),), {}, R(4)),
            Op("torch.mul", (R(2), R(0)), {}, R(5)),
            Op("Tensor.sum", (R(5),), {}, R(6)),
            Op("Tensor.__add__", (R(4), R(6)), {}, R(7)),
            Op("torch.autograd.grad", (R(7), [R(1), R(2)]), {}, (R(8), R(9))),
            Op("torch._C._set_grad_enabled", (False,), {}, None),
            Op("torch._foreach_add_", ([R(1), R(2)], [R(8), R(9)]), {"alpha": -0.5}, None),
            Op("torch._C._set_grad_enabled", (True,), {}, None),
        ],
        outputs=[R(8), R(9)],
        num_slots=10,
        state={"w1": 1, "w2": 2},
    )
    grads = LoadedPlan(ir).run((x,), {}, state)
    eager = torch.autograd.grad((w1 * x).sum() + (w2 * x).sum(), [w1, w2])
    with torch.no_grad():
        torch._foreach_add_([w1, w2], list(eager), alpha=-0.5)
    assert isinstance(grads, list) and len(grads) == 2
    for got, want in zip(grads, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(state["w1"].detach(), w1.detach(), rtol=0, atol=0)
    torch.testing.assert_close(state["w2"].detach(), w2.detach(), rtol=0, atol=0)


def test_deeply_nested_values_and_huge_slot_counts_do_not_crash_the_device() -> None:
    nested: Any = R(0)
    for _ in range(5000):
        nested = (nested,)
    deep = PlanIR(
        name="deep", inputs=(R(0),), ops=[Op("torch.cat", (nested,), {}, R(1))], outputs=R(1),
        num_slots=2,
    )  # fmt: skip
    with pytest.raises(WireError, match="nested too deeply"):
        LoadedPlan(deep)
    wide = _double_abs()
    wide.num_slots = 10**12
    x = torch.tensor([-2.0])
    assert torch.equal(LoadedPlan(wide).run((x,), {}, {}), torch.abs(x + x))


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        (SymExpr("pow", (10, 10**9)), "OverflowError"),
        (SymExpr("floordiv", (R(0), 0)), "ZeroDivisionError"),
    ],
)
def test_bad_size_arithmetic_is_an_execution_error_when_run(expr: SymExpr, message: str) -> None:
    ir = PlanIR(
        name="sizes",
        inputs=(R(0),),
        ops=[Op("torch.zeros", (expr,), {}, R(1))],
        outputs=R(1),
        num_slots=2,
    )
    plan = LoadedPlan(ir)  # loading evaluates nothing
    with pytest.raises(PlanExecutionError, match=message):
        plan.run((3,), {}, {})
