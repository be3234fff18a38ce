"""Loop plans: one traced step the device runs over its batches, checked against eager torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import producer as fp
from consumer.runtime.interpreter import LoadedPlan
from consumer.runtime.loop import MAX_SEED
from producer.fl.training import (
    TrainingSpec,
    build_training_plan,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
    unflatten,
)
from producer.plans.selfcheck import clone_tensor
from schemas import plan_codec
from schemas.errors import (
    LoopLimitError,
    PlanInputError,
    PlanShapeError,
    SchemaVersionError,
    WireError,
)
from schemas.ir import LOOP_SCHEMA_VERSION, Op, Ref
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.plan_pb2 import LoopProto


class Train(fp.LoopPlan):
    def __init__(self, momentum: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.opt = torch.optim.SGD(self.parameters(), lr=0.3, momentum=momentum)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.fc2(torch.relu(self.fc1(x))), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach()


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class Recorded(Train):
    """Train, also writing its parameters after every step into a state buffer."""

    def __init__(self, momentum: float, steps: int) -> None:
        super().__init__(momentum)
        self.register_buffer("history", torch.zeros(steps, 4 * 6 + 6 + 6 * 3 + 3))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = super().step(x, y)
        with torch.no_grad():
            self.history[self.count] = _flat(self)
            self.count.add_(1)
        return loss


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _eager_steps(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int, m: float
) -> tuple[list[torch.Tensor], list[float]]:
    """Plain torch: the weights after every step and the losses, in sample_order's order."""
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=m)
    order = sample_order(len(x), seed, epochs).view(epochs, -1)
    after, losses = [], []
    for e in range(epochs):
        for start in range(0, len(x), batch):
            idx = order[e, start : start + batch]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            after.append(_flat(net).clone())
            losses.append(float(loss.detach()))
    return after, losses


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_loop_plan_trains_like_the_eager_loop_step_for_step(momentum: float) -> None:
    torch.manual_seed(3)
    plan = Recorded(momentum, steps=3 * 5).build(*_data(8))
    plan.load_state({"count": torch.tensor(0), "history": torch.zeros_like(plan.history)})
    x, y = _data(23, seed=1)
    net = nn.Sequential(scratch_copy(plan.fc1), nn.ReLU(), scratch_copy(plan.fc2))
    loss = plan(x, y, epochs=3, batch_size=5, seed=12)
    after, losses = _eager_steps(net, x, y, 3, 5, 12, momentum)
    assert len(after) == 3 * 5  # 23 rows: 4 full batches and one of 3, three epochs
    assert int(plan.count) == len(after)
    for step, weights in enumerate(after):
        assert torch.allclose(plan.history[step], weights, atol=1e-5), step
    assert torch.allclose(_flat(plan), after[-1], atol=1e-5)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_drop_last_skips_the_short_batch_and_refuses_a_call_with_no_full_batch() -> None:
    class Sum(fp.LoopPlan):
        data_inputs = 1
        drop_last = True

        def step(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum().to(torch.float32)

    plan = Sum().build(torch.ones(4))
    assert plan(torch.ones(7), epochs=2, batch_size=3, seed=0).item() == 3.0
    with pytest.raises(PlanInputError, match="no step to run"):
        plan(torch.ones(2), epochs=1, batch_size=3, seed=0)


def test_the_training_plan_is_the_same_plan_for_every_example_count() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    spec = TrainingSpec(batch_size=4, epochs=2)
    small, large = (build_training_plan(net, spec, n, feature_shape=(5,)) for n in (5, 300))
    assert len(small.ir.ops) + len(small.ir.loop.body.ops) == len(large.ir.ops) + len(
        large.ir.loop.body.ops
    )
    assert plan_codec.plan_content_hash(small.ir) == plan_codec.plan_content_hash(large.ir)
    w = get_weights(net)
    for n in (3, 9, 41):
        x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
        out = small(x, y, flatten(w), epochs=2, batch_size=4, seed=n)
        ref, loss = train_eager(scratch_copy(net), spec, w, x, y, sample_order(n, n, 2))
        assert torch.allclose(out[:-1], flatten(ref), atol=1e-5), n
        assert out[-1].item() == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("spec", [TrainingSpec(momentum=0.9), TrainingSpec(proximal_mu=0.5)])
def test_the_training_plan_matches_eager_sgd_with_momentum_and_fedprox(
    spec: TrainingSpec,
) -> None:
    torch.manual_seed(1)
    net = nn.Linear(6, 4)
    spec = dataclasses.replace(spec, batch_size=3, lr=0.2, epochs=2)
    plan = build_training_plan(net, spec)
    x, y = torch.randn(17, 6), torch.randint(0, 4, (17,))
    w = get_weights(net)
    for round_seed in (1, 2):  # momentum starts from zero again every round
        out = plan(x, y, flatten(w), epochs=2, batch_size=3, seed=round_seed)
        ref, loss = train_eager(scratch_copy(net), spec, w, x, y, sample_order(17, round_seed, 2))
        assert torch.allclose(out[:-1], flatten(ref), atol=1e-5)
        assert out[-1].item() == pytest.approx(loss, abs=1e-5)
        w = unflatten(out[:-1], w)


def test_a_loop_plan_round_trips_through_the_wire_and_refuses_old_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(2)
    plan = Train(0.9).build(*_data(6))
    proto = plan_to_proto(plan.ir, plan_id="p")
    assert proto.schema_version == LOOP_SCHEMA_VERSION
    decoded, _ = plan_from_proto(proto)
    assert plan_to_proto(decoded, plan_id="p").SerializeToString(
        deterministic=True
    ) == proto.SerializeToString(deterministic=True)
    assert decoded.loop is not None and decoded.loop.body.ops == plan.ir.loop.body.ops
    x, y = _data(10, seed=9)
    state = {k: clone_tensor(t) for k, t in plan.ir.state_values.items()}
    a = LoadedPlan(decoded).run((x, y), {"epochs": 2, "batch_size": 3, "seed": 4}, state)
    b = plan(x, y, epochs=2, batch_size=3, seed=4)
    assert torch.allclose(a, b)
    monkeypatch.setattr(plan_codec, "PLAN_SCHEMA_VERSIONS", (1,))  # a device before loops
    with pytest.raises(SchemaVersionError, match="schema version 2"):
        plan_from_proto(proto)


def test_a_version_one_plan_carrying_a_loop_or_a_loop_inside_a_body_is_refused() -> None:
    plan = Train().build(*_data(6))
    proto = plan_to_proto(plan.ir, plan_id="p")
    proto.schema_version = 1
    proto.content_hash = plan_codec._hash(proto)
    with pytest.raises(WireError, match="loop section"):
        plan_from_proto(proto)
    proto = plan_to_proto(plan.ir, plan_id="p")
    nested = LoopProto()
    nested.CopyFrom(proto.loop)
    proto.loop.body.loop.CopyFrom(nested)
    proto.content_hash = plan_codec._hash(proto)
    with pytest.raises(WireError, match="loop of its own"):
        plan_from_proto(proto)


@pytest.mark.parametrize(
    ("loop_kwargs", "error", "match"),
    [
        ({"epochs": 10**9, "batch_size": 1, "seed": 0}, PlanInputError, "epochs must be"),
        ({"epochs": 500, "batch_size": 1, "seed": 0}, LoopLimitError, "at most 1000"),
        ({"epochs": 1, "batch_size": 0, "seed": 0}, PlanInputError, "batch_size must be"),
        ({"epochs": -1, "batch_size": 2, "seed": 0}, PlanInputError, "epochs must be"),
        ({"epochs": 1, "batch_size": 2, "seed": -5}, PlanInputError, "seed must be"),
        ({"epochs": 1, "batch_size": 2, "seed": MAX_SEED + 1}, PlanInputError, "seed must be"),
        ({"epochs": 1.5, "batch_size": 2, "seed": 0}, PlanInputError, "must be an int"),
        ({"epochs": True, "batch_size": 2, "seed": 0}, PlanInputError, "must be an int"),
    ],
)
def test_hostile_loop_settings_are_refused_before_any_step_runs(
    loop_kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    plan = Train().build(*_data(6))
    loaded = LoadedPlan(plan.ir, max_loop_steps=1000)
    state = {k: t.clone() for k, t in plan.ir.state_values.items()}
    before = {k: t.clone() for k, t in state.items()}
    with pytest.raises(error, match=match):
        loaded.run(_data(20), dict(loop_kwargs), state)
    assert all(torch.equal(before[k], t) for k, t in state.items())


def test_dataset_tensors_with_different_row_counts_are_refused() -> None:
    plan = Train().build(*_data(6))
    x, y = _data(10)
    with pytest.raises(PlanShapeError, match="rows"):
        plan(x, y[:7], epochs=1, batch_size=2, seed=0)


def _loaded(ir: object) -> LoadedPlan:
    return LoadedPlan(ir)  # type: ignore[arg-type]


def test_a_loop_that_reads_slots_it_should_not_is_refused_at_load() -> None:
    ir = Train().build(*_data(6)).ir
    unwritten = dataclasses.replace(
        ir, loop=dataclasses.replace(ir.loop, extras=(Ref(ir.num_slots - 1),))
    )
    with pytest.raises(WireError):
        _loaded(unwritten)
    outside = dataclasses.replace(ir, loop=dataclasses.replace(ir.loop, data=(Ref(10**6),)))
    with pytest.raises(WireError):
        _loaded(outside)
    over_input = dataclasses.replace(ir, loop=dataclasses.replace(ir.loop, out=Ref(0)))
    with pytest.raises(WireError, match="second time"):
        _loaded(over_input)
    body = dataclasses.replace(ir.loop.body, state={**ir.loop.body.state, "secret": 0})
    with pytest.raises(WireError, match="state"):
        _loaded(dataclasses.replace(ir, loop=dataclasses.replace(ir.loop, body=body)))
    late = dataclasses.replace(ir, loop=dataclasses.replace(ir.loop, at=len(ir.ops) + 1))
    with pytest.raises(WireError, match="runs after op"):
        _loaded(late)
    reading = dataclasses.replace(
        ir.loop.body, ops=[Op("torch.abs", (Ref(ir.loop.body.num_slots + 5),), {}, Ref(0))]
    )
    with pytest.raises(WireError):
        _loaded(dataclasses.replace(ir, loop=dataclasses.replace(ir.loop, body=reading)))
