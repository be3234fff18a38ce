"""Federated evaluation and non-MLP models on devices, on every transport, against eager torch."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import producer as fp
from producer.fl.job import FederatedJob
from producer.fl.models import make_model
from producer.fl.participants import EagerParticipant, PlanParticipant
from producer.fl.training import (
    TrainingSpec,
    build_evaluation_plan,
    build_training_plan,
    get_weights,
)
from tests.behaviour.conftest import DeviceFactory

SPEC = TrainingSpec(lr=0.2, batch_size=8)


def _rows(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _shares() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(f"fe-{k}", *_rows(k, 18 + 5 * k), *_rows(50 + k, 6 + 4 * k)) for k in range(2)]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return make_model(name, 64, 10, hidden=8)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "gru"])
def test_devices_train_and_evaluate_with_plans_exactly_as_eager_torch_does(
    device: DeviceFactory, model_name: str
) -> None:
    net = _model(model_name)
    executor = ThreadPoolExecutor(4)
    planned, eager = [], []
    for name, x, y, xt, yt in _shares():
        data = [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")]
        data += [fp.tag(xt, "test", "x"), fp.tag(yt, "test", "y")]
        planned.append(
            PlanParticipant(
                device(name, data),
                lambda n: build_training_plan(net, SPEC, n),
                evaluation_plan_for=lambda n: build_evaluation_plan(net, n),
                executor=executor,
                timeout=120,
            )
        )
        eager.append(EagerParticipant(name, net, SPEC, x, y, x_test=xt, y_test=yt))
    try:
        remote = FederatedJob(participants=planned, strategy="fedavg", evaluate_on_devices=True)
        got = remote.run(get_weights(net), num_rounds=2)
    finally:
        executor.shutdown(wait=False)
    local = FederatedJob(participants=eager, strategy="fedavg", evaluate_on_devices=True)
    want = local.run(get_weights(net), num_rounds=2)

    for k in want.weights:  # step for step: the plan's SGD is the eager SGD
        assert torch.allclose(got.weights[k], want.weights[k], atol=1e-5), k
    assert [m.device_examples for m in got.history] == [6 + 10] * 3
    for a, b in zip(got.history, want.history, strict=True):
        assert a.device_loss == pytest.approx(b.device_loss, abs=1e-5)
        assert a.device_accuracy == pytest.approx(b.device_accuracy, abs=1e-6)
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-5) or math.isnan(b.train_loss)
    rows = [(r.round, r.phase, r.status, r.num_examples) for r in got.devices]
    assert rows == [(r.round, r.phase, r.status, r.num_examples) for r in want.devices]
    assert all(r.seconds > 0 for r in got.devices)


def test_a_device_without_test_data_trains_but_is_not_asked_to_evaluate(
    device: DeviceFactory,
) -> None:
    net = _model("mlp")
    x, y = _rows(1, 12)
    dev = device("fe-train-only", [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
    p = PlanParticipant(
        dev,
        lambda n: build_training_plan(net, SPEC, n),
        evaluation_plan_for=lambda n: build_evaluation_plan(net, n),
    )
    assert not p.evaluates
    res = FederatedJob(participants=[p], strategy="fedavg", evaluate_on_devices=True).run(
        get_weights(net), num_rounds=1
    )
    assert res.history[-1].device_examples == 0
    assert [r.phase for r in res.devices] == ["fit"]
