"""Tests of producer.fl.participants and the traced training plan on embedded devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import producer as fp
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant, PlanParticipant
from producer.fl.rounds import RoundPolicy, RoundRunner
from producer.fl.strategy import FedAvg, FedProx
from producer.fl.training import (
    TrainingSpec,
    build_training_plan,
    evaluate,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
    unflatten,
)
from schemas.errors import ObjectNotFound


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    "spec",
    [
        TrainingSpec(lr=0.1, batch_size=8),
        TrainingSpec(lr=0.1, batch_size=8, epochs=2, proximal_mu=0.5),
    ],
)
def test_the_training_plan_equals_the_eager_local_update(spec: TrainingSpec) -> None:
    net = _net()
    x, y = _data(21, 1)
    w = get_weights(net)
    order = sample_order(21, 1003, spec.epochs)
    plan = build_training_plan(net, spec)
    out = plan(x, y, flatten(w), epochs=spec.epochs, batch_size=spec.batch_size, seed=1003)
    ref, loss = train_eager(scratch_copy(net), spec, w, x, y, order)
    for k, v in unflatten(out[:-1], w).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6)
    assert float(out[-1]) == pytest.approx(loss, rel=1e-5)


def test_one_training_plan_serves_devices_with_any_example_count() -> None:
    net, spec = _net(), TrainingSpec(batch_size=8)
    plan = build_training_plan(net, spec, 21)
    w = get_weights(net)
    for n in (1, 8, 20, 33):
        x, y = _data(n, n)
        out = plan(x, y, flatten(w), epochs=1, batch_size=8, seed=n)
        ref, _ = train_eager(scratch_copy(net), spec, w, x, y, sample_order(n, n))
        torch.testing.assert_close(unflatten(out[:-1], w), ref, rtol=0, atol=1e-6)


def test_flatten_and_unflatten_are_inverse() -> None:
    w = get_weights(_net())
    back = unflatten(flatten(w), w)
    assert list(back) == list(w) and all(torch.equal(back[k], w[k]) for k in w)


def _fleet_job(fleet: fp.Fleet, spec: TrainingSpec, strategy: FedAvg) -> FederatedJob:
    net = _net()
    plan = build_training_plan(net, spec)

    def plan_for(n: int) -> object:
        return plan

    participants = []
    for k in range(3):
        x, y = _data(15 + k, k)
        dev = fleet.device(f"d{k}", data=[fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
        participants.append(PlanParticipant(dev, plan_for, epochs=spec.epochs))
    xt, yt = _data(30, 9)
    return FederatedJob(
        participants=participants, strategy=strategy, evaluate=lambda w: evaluate(_net(), w, xt, yt)
    )


@pytest.mark.parametrize("proximal_mu", [0.0, 0.3])
def test_a_job_on_embedded_devices_ends_with_the_eager_reference_model(
    proximal_mu: float,
) -> None:
    spec = TrainingSpec(lr=0.2, batch_size=4, proximal_mu=proximal_mu)
    strategy = FedProx(proximal_mu=proximal_mu) if proximal_mu else FedAvg()
    with fp.connect() as fleet:
        res = _fleet_job(fleet, spec, strategy).run(get_weights(_net()), num_rounds=3)
    net = _net()
    eager = [EagerParticipant(f"d{k}", net, spec, *_data(15 + k, k)) for k in range(3)]
    xt, yt = _data(30, 9)
    ref = FederatedJob(
        participants=eager, strategy=strategy, evaluate=lambda w: evaluate(_net(), w, xt, yt)
    ).run(get_weights(net), 3)
    for k, v in ref.weights.items():
        torch.testing.assert_close(res.weights[k], v, rtol=0, atol=1e-6)
    assert [m.participants for m in res.history[1:]] == [3, 3, 3]


def test_a_device_without_tagged_training_data_is_refused_with_a_remedy() -> None:
    with fp.connect() as fleet:
        dev = fleet.device("empty")
        with pytest.raises(ObjectNotFound, match=r"fp\.tag"):
            PlanParticipant(dev, lambda n: None)


def test_a_round_skips_a_device_whose_plan_run_fails() -> None:
    spec = TrainingSpec(lr=0.2, batch_size=4)
    net = _net()
    with fp.connect() as fleet:
        good_x, good_y = _data(12, 0)
        good = fleet.device(
            "good", data=[fp.tag(good_x, "train", "x"), fp.tag(good_y, "train", "y")]
        )
        bad_x, _ = _data(12, 1)
        # labels out of range: cross_entropy raises on the device
        bad = fleet.device(
            "bad", data=[fp.tag(bad_x, "train", "x"), fp.tag(torch.full((12,), 7), "train", "y")]
        )
        plan = build_training_plan(net, spec, 12)
        parts = [PlanParticipant(d, lambda n: plan) for d in (good, bad)]
        out = RoundRunner(parts, FedAvg(), RoundPolicy(quorum=0.5)).run_round(1, get_weights(net))
    assert out.committed and [f.device_id for f in out.failures] == ["bad"]
    ref, _ = train_eager(
        scratch_copy(net), spec, get_weights(net), good_x, good_y, sample_order(12, 1000)
    )
    assert out.weights is not None
    for k, v in ref.items():
        torch.testing.assert_close(out.weights[k], v, rtol=0, atol=1e-6)


def test_a_strategy_asking_for_another_proximal_mu_than_the_plan_fails_the_device() -> None:
    spec = TrainingSpec(lr=0.2, batch_size=4)
    net = _net()
    with fp.connect() as fleet:
        x, y = _data(12, 0)
        dev = fleet.device("d", data=[fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
        plan = build_training_plan(net, spec, 12)
        part = PlanParticipant(dev, lambda n: plan, proximal_mu=0.0)
        out = RoundRunner([part], FedProx(proximal_mu=0.1), RoundPolicy(max_attempts=1))
        outcome = out.run_attempt(1, 1, get_weights(net))
    assert not outcome.committed and "proximal_mu" in outcome.failures[0].message
