"""Tests for producer.plans.plan: the PySyft 0.2 Plan behaviours, compared with eager torch."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import producer as fp
from producer.plans.seams import RemoteTensor
from schemas.errors import PlanBuildError, PlanGuardError, PlanNotBuiltError


def double_abs(x: torch.Tensor) -> torch.Tensor:
    x = x + x
    return torch.abs(x)


class TinyNet(fp.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


def eager_tiny(net: TinyNet, x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(net.fc2(F.relu(net.fc1(x))), dim=0)


class TrainStep(fp.Plan):
    """Forward, cross entropy, backward, SGD step with the optimizer made in __init__."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.opt = torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = F.cross_entropy(self.fc2(F.relu(self.fc1(x.flatten(1)))), y)
        loss.backward()
        self.opt.step()
        return loss


def eager_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model.fc2(F.relu(model.fc1(x.flatten(1)))), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


class FakePointerPlan:
    def __init__(self, plan: fp.Plan, device: FakeDevice) -> None:
        self.plan, self.device = plan, device

    def __call__(self, *args: Any) -> Any:
        self.device.calls.append(args)
        return "result-pointer"


class FakeDevice:
    id = "device_1"

    def __init__(self) -> None:
        self.sent: list[fp.Plan] = []
        self.calls: list[tuple[Any, ...]] = []

    def send_plan(self, plan: fp.Plan) -> FakePointerPlan:
        self.sent.append(plan)
        return FakePointerPlan(plan, self)


@RemoteTensor.register  # what a PointerTensor is to a plan: a tensor held by a device
class FakePointer:
    def __init__(self, location: FakeDevice, shape: tuple[int, ...]) -> None:
        self.location, self.shape, self.dtype = location, torch.Size(shape), torch.float32


def test_a_function_plan_is_unbuilt_until_built_and_then_replays_like_eager() -> None:
    plan = fp.func2plan(double_abs)
    assert not plan.is_built
    assert repr(plan).startswith("<Plan double_abs id:") and "built" not in repr(plan)
    plan.build(torch.tensor([1.0, -2.0]))
    assert plan.is_built and repr(plan).endswith("owner:me built>")
    x = torch.tensor([3.0, -0.5, 1.0])
    assert torch.equal(plan(x), double_abs(x))


def test_sending_an_unbuilt_plan_raises_the_pysyft_runtime_error() -> None:
    plan = fp.func2plan()(double_abs)
    with pytest.raises(RuntimeError, match="A plan needs to be built before being sent"):
        plan.send(FakeDevice())
    with pytest.raises(PlanNotBuiltError) as info:
        plan.send(FakeDevice())
    assert str(info.value) == "A plan needs to be built before being sent to a worker."
    assert info.value.plan_id == plan.id


def test_send_hands_the_built_plan_to_the_device() -> None:
    plan = fp.func2plan(double_abs).build(torch.ones(2))
    device = FakeDevice()
    pointer = plan.send(device)
    assert isinstance(pointer, FakePointerPlan) and device.sent == [plan]
    assert plan.ir.ops and plan.ir.name == "double_abs"


def test_plan_code_lists_the_ops_like_a_function() -> None:
    plan = fp.func2plan(double_abs).build(torch.ones(2))
    code = plan.code
    assert code.startswith("def double_abs(x):\n")
    assert "torch.abs(_1)" in code and code.rstrip().endswith("return _2")


def test_args_shape_builds_at_decoration_with_a_symbolic_batch() -> None:
    @fp.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = x + y
        return torch.abs(s)

    assert plan_sum_abs.is_built
    for batch in (1, 4):
        x, y = torch.randn(1, 2), torch.randn(batch, 2)
        assert torch.equal(plan_sum_abs(x, y), torch.abs(x + y))


def test_plan_abs_with_state_accepts_another_dtype_and_size_like_the_seed() -> None:
    @fp.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    x = torch.tensor([-1, 0])
    got = plan_abs(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.abs() + torch.tensor([1]))
    assert list(plan_abs.named_state()) == ["state.0"]


def test_a_plan_subclass_builds_and_replays_its_forward_with_named_state() -> None:
    net = TinyNet()
    net.build(torch.tensor([1.0, 2.0]))
    assert sorted(net.named_state()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert repr(net).startswith("<TinyNet TinyNet id:")
    x = torch.tensor([-1.0, 2.0])
    assert torch.allclose(net(x), eager_tiny(net, x))


def test_method2plan_makes_the_forward_a_plan_bound_to_the_module() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 3)
            self.fc2 = nn.Linear(3, 2)

        @fp.method2plan
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.fc1(x))
            return F.log_softmax(self.fc2(x), dim=0)

    net = Net()
    assert isinstance(net.forward, fp.Plan) and net.forward is net.forward
    assert repr(net.forward).startswith("<Plan forward id:")
    x = torch.tensor([-1.0, 2.0])
    want = F.log_softmax(net.fc2(F.relu(net.fc1(x))), dim=0)
    assert torch.allclose(net(x), want)  # built on first call, then replayed
    assert net.forward.is_built and torch.allclose(net.forward(x), want)
    want.sum().backward()  # building did not poison the graph that was alive meanwhile
    assert net.fc1.weight.grad is not None
    assert sorted(net.forward.named_state()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


def test_a_training_step_with_the_optimizer_made_in_init_matches_five_eager_steps() -> None:
    torch.manual_seed(0)
    plan = TrainStep()
    eager = TrainStep()
    eager.load_state_dict(plan.state_dict())
    batches = [(torch.randn(6, 2, 2), torch.randint(0, 3, (6,))) for _ in range(5)]
    with pytest.warns(UserWarning, match="grad"):
        plan.build(*batches[0])
    assert torch.equal(plan.fc1.weight, eager.fc1.weight)  # building trained nothing
    losses = [plan(x, y) for x, y in batches]
    want = eager_steps(eager, batches)
    for got, expected in zip(losses, want, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)
    for name, value in plan.named_state().items():
        assert torch.allclose(value, eager.named_state()[name], atol=1e-6), name


def test_a_training_step_with_the_optimizer_made_inside_runs_on_other_batch_sizes() -> None:
    model = nn.Module()
    model.fc1, model.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
    reference = nn.Module()
    reference.fc1, reference.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
    reference.load_state_dict(model.state_dict())

    class Step(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
            loss = F.cross_entropy(self.model.fc2(F.relu(self.model.fc1(x.flatten(1)))), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

    step = Step().build(torch.randn(4, 2, 2), torch.randint(0, 3, (4,)))
    batches = [(torch.randn(n, 2, 2), torch.randint(0, 3, (n,))) for n in (1, 3, 7, 2, 5)]
    losses = [step(x, y) for x, y in batches]
    for got, expected in zip(losses, eager_steps(reference, batches), strict=True):
        assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(model.fc2.weight, reference.fc2.weight, atol=1e-6)


def test_a_conv_batchnorm_training_step_updates_running_stats_like_eager() -> None:
    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
        )

    class Step(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.net = make()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(self.net(x), y)
            loss.backward()
            with torch.no_grad():
                for p in self.net.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
            return loss

    step = Step().build(torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,)))
    eager = make()
    for _ in range(3):
        x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
        got = step(x, y)
        loss = F.cross_entropy(eager(x), y)
        loss.backward()
        with torch.no_grad():
            for p in eager.parameters():
                p -= 0.05 * p.grad
                p.grad = None
        assert torch.allclose(got, loss, atol=1e-6)
    for name, value in eager.state_dict().items():
        assert torch.allclose(step.named_state()[f"net.{name}"].double(), value.double(), atol=1e-6)
    assert int(step.named_state()["net.1.num_batches_tracked"]) == 3


def test_calling_a_plan_against_its_guard_raises_naming_the_line() -> None:
    @fp.func2plan(args_shape=[(-1,)])
    def sign_scale(x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x

    assert torch.equal(sign_scale(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([2.0, 4.0, 6.0]))
    with pytest.raises(PlanGuardError, match=r"if x\.sum\(\) > 0"):
        sign_scale(torch.tensor([-1.0]))


def test_kwargs_tuple_outputs_and_constants_created_inside() -> None:
    def f(x: torch.Tensor, *, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ramp = torch.arange(x.shape[0]) * torch.tensor(0.5)
        return x + shift, x * ramp

    plan = fp.func2plan(f).build(torch.randn(3), shift=torch.ones(3))
    x, shift = torch.randn(6), torch.randn(6)
    got, want = plan(x, shift=shift), f(x, shift=shift)
    assert isinstance(got, tuple) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_copy_has_a_new_id_the_same_behaviour_and_independent_state() -> None:
    torch.manual_seed(2)
    plan = TrainStep()
    with pytest.warns(UserWarning):
        plan.build(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    twin = plan.copy()
    assert twin.id != plan.id and twin.is_built and twin.code == plan.code
    before = {k: v.detach().clone() for k, v in plan.named_state().items()}
    x, y = torch.randn(3, 4), torch.tensor([2, 1, 0])
    twin(x, y)
    for key, value in plan.named_state().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(twin.named_state()["fc1.weight"], before["fc1.weight"])
    assert torch.allclose(plan(x, y), eager_steps(_clone_of(before), [(x, y)])[0], atol=1e-6)


def _clone_of(state: dict[str, torch.Tensor]) -> nn.Module:
    model = nn.Module()
    model.fc1, model.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
    model.load_state_dict(state)
    return model


def test_load_state_copies_values_into_the_live_tensors() -> None:
    net = TinyNet().build(torch.ones(2))
    weight = net.fc1.weight
    net.load_state({"fc1.weight": torch.zeros(3, 2)})
    assert net.fc1.weight is weight and torch.equal(weight, torch.zeros(3, 2))
    with pytest.raises(fp.PlanInputError, match="no state named"):
        net.load_state({"nope": torch.zeros(1)})


def test_calling_with_pointers_builds_from_their_shapes_and_runs_on_their_device() -> None:
    plan = fp.func2plan(double_abs)
    device = FakeDevice()
    pointer = FakePointer(device, (2,))
    assert plan(pointer) == "result-pointer"
    assert plan.is_built and device.sent == [plan] and device.calls == [(pointer,)]
    plan(pointer)
    assert device.sent == [plan] and len(device.calls) == 2


def test_python_side_state_changes_are_refused_at_build() -> None:
    class Counting(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * 2

    with pytest.raises(PlanBuildError, match="calls"):
        Counting().build(torch.ones(2))


def test_calling_a_plan_after_switching_to_eval_mode_asks_for_a_rebuild() -> None:
    class Norm(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    plan = Norm().build(torch.randn(4, 2))
    plan.eval()
    with pytest.raises(PlanBuildError, match="training"):
        plan(torch.randn(4, 2))
    plan.build(torch.randn(4, 2))
    x = torch.randn(3, 2)
    assert torch.allclose(plan(x), F.batch_norm(x, plan.bn.running_mean, plan.bn.running_var))


def test_a_failed_self_check_leaves_the_plan_unbuilt() -> None:
    calls: list[int] = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * len(calls)

    plan = fp.func2plan(counting)
    with pytest.raises(PlanBuildError):
        plan.build(torch.ones(2))
    assert not plan.is_built


def test_send_records_the_location_in_the_repr() -> None:
    plan = fp.func2plan(double_abs).build(torch.ones(2))
    plan.send(FakeDevice())
    assert "location:device_1" in repr(plan)


def test_a_plan_called_inside_another_plan_is_traced_inline_once() -> None:
    class Norm(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    class Outer(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Norm()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    outer = Outer().build(torch.randn(4, 2))
    assert sum(op.target.endswith("batch_norm") for op in outer.ir.ops) == 1
    assert not outer.inner.is_built  # the inner plan ran as plain Python code
    reference = nn.BatchNorm1d(2)
    x = torch.randn(5, 2)
    assert torch.allclose(outer(x), reference(x) * 2, atol=1e-6)
    assert torch.allclose(outer.inner.bn.running_mean, reference.running_mean, atol=1e-6)
    assert int(outer.named_state()["inner.bn.num_batches_tracked"]) == 1


def test_build_falls_back_to_guarded_sizes_when_symbolic_sizes_fail(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from producer.plans.shapes import SymbolicSizes, SymbolicUnsupported

    def unsupported(self: SymbolicSizes, value: Any) -> Any:
        raise SymbolicUnsupported("not expressible")

    monkeypatch.setattr(SymbolicSizes, "lower", unsupported)
    caplog.set_level("INFO", logger="producer.plans.plan")

    @fp.func2plan(args_shape=[(-1, 4)])
    def halves(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0] * 2, 2)

    assert any(op.is_guard and op.target == "Tensor.size" for op in halves.ir.ops)
    assert "symbolic sizes cannot express this trace (not expressible)" in caplog.text
    x = torch.randn(2, 4)
    assert torch.equal(halves(x), x.view(4, 2))
    with pytest.raises(PlanGuardError):
        halves(torch.randn(3, 4))


def test_copy_of_a_method_plan_is_bound_to_a_copy_of_its_module() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        @fp.method2plan
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).tanh()

    net = Net()
    net.forward.build(torch.ones(2))
    net.forward.send(FakeDevice())
    twin = net.forward.copy()
    assert twin.id != net.forward.id and twin.location is None
    twin.load_state({"fc.bias": torch.full((2,), 5.0)})
    x = torch.tensor([0.5, -1.0])
    assert torch.allclose(net(x), torch.tanh(net.fc(x)))  # the original is untouched
    assert torch.allclose(twin(x), torch.tanh(F.linear(x, net.fc.weight, torch.full((2,), 5.0))))


def test_args_shape_minus_one_lets_view_and_flatten_follow_the_batch() -> None:
    weight = torch.randn(4, 3)

    @fp.func2plan(args_shape=[(-1, 2, 2)])
    def head(x: torch.Tensor) -> torch.Tensor:
        flat = x.view(x.shape[0], -1)
        return flat @ weight + x.flatten(1).sum(1, keepdim=True)

    assert 0 not in head.ir.input_specs[0].sizes  # the batch dim stays free
    for batch in (1, 2, 9):
        x = torch.randn(batch, 2, 2)
        assert torch.allclose(head(x), x.view(batch, -1) @ weight + x.flatten(1).sum(1, True))


def test_args_shape_fixed_dims_that_are_read_are_checked() -> None:
    @fp.func2plan(args_shape=[(-1, 4)])
    def pairs(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, x.shape[1] // 2, 2).sum(2)

    assert pairs.ir.input_specs[0].sizes == {1: 4}
    x = torch.randn(3, 4)
    assert torch.equal(pairs(x), x.view(-1, 2, 2).sum(2))
    with pytest.raises(fp.PlanShapeError):
        pairs(torch.randn(3, 6))


def test_replacing_a_state_tensor_object_is_refused_and_undone() -> None:
    class Replacing(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.scale = self.scale * 2
            return x * self.scale

    plan = Replacing()
    scale = plan.scale
    with pytest.raises(PlanBuildError, match="replaces its state"):
        plan.build(torch.ones(2))
    assert plan.scale is scale and torch.equal(scale, torch.ones(2))


def test_rebuilding_a_plan_gives_it_a_new_id_so_devices_get_the_new_ops() -> None:
    plan = fp.func2plan(double_abs)
    device = FakeDevice()
    plan(FakePointer(device, (2,)))
    first_id = plan.id
    plan.build(torch.ones(3))
    assert plan.id != first_id
    plan(FakePointer(device, (3,)))
    assert len(device.sent) == 2


def test_the_listing_shows_guards_with_their_source_and_state_by_name() -> None:
    class Gate(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 1:
                return self.fc(x).sum(0)
            return self.fc(x)[0]

    code = Gate().build(torch.ones(3, 2)).code
    assert "torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)" in code
    assert "# test_plan.py:" in code and "if x.shape[0] > 1: [needs x.shape[0] > 1]" in code


def test_self_check_can_be_turned_off_for_a_plan() -> None:
    calls: list[int] = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * len(calls)

    plan = fp.func2plan(counting)
    plan.self_check = False
    plan.build(torch.ones(2))
    assert plan.is_built and len(calls) == 1


def test_momentum_sgd_made_in_init_carries_its_buffers_as_plan_state() -> None:
    class MomentumStep(TrainStep):
        def __init__(self) -> None:
            super().__init__()
            self.opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(3)
    plan = MomentumStep()
    model = nn.Module()
    model.fc1, model.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
    model.load_state_dict({k: v for k, v in plan.state_dict().items() if "." in k})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(5)]
    with pytest.warns(UserWarning):
        plan.build(*batches[0])
    assert "opt.momentum_buffer.fc1.weight" in plan.ir.state
    for x, y in batches:
        got = plan(x, y)
        opt.zero_grad()
        loss = F.cross_entropy(model.fc2(F.relu(model.fc1(x))), y)
        loss.backward()
        opt.step()
        assert torch.allclose(got, loss, atol=1e-6)
    assert torch.allclose(plan.fc1.weight, model.fc1.weight, atol=1e-6)
    momentum = opt.state[model.fc1.weight]["momentum_buffer"]
    assert torch.allclose(plan.named_state()["opt.momentum_buffer.fc1.weight"], momentum, atol=1e-6)


def test_adam_made_in_init_is_refused() -> None:
    class AdamStep(TrainStep):
        def __init__(self) -> None:
            super().__init__()
            self.opt = torch.optim.Adam(self.parameters(), lr=0.1)

    with pytest.raises(PlanBuildError, match="created outside the plan"):
        AdamStep().build(torch.randn(5, 4), torch.randint(0, 3, (5,)))


def test_a_plan_takes_named_tuples_of_tensors_like_eager_torch() -> None:
    pair = namedtuple("pair", "a b")

    def shifted(p: Any, size: torch.Size) -> torch.Tensor:
        return p.a + p.b.sum() + torch.zeros(size)

    plan = fp.func2plan(shifted)
    plan.build(pair(torch.ones(2), torch.ones(3)), torch.Size([2]))
    for p in (pair(torch.randn(2), torch.randn(3)), pair(torch.zeros(2), torch.ones(1))):
        assert torch.allclose(plan(p, torch.Size([2])), shifted(p, torch.Size([2])))
