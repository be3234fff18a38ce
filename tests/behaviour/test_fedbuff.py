"""FedBuff on devices running the training plan, on every transport, against eager torch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import producer as fp
from producer.fl.buffered import FedBuff
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant, PlanParticipant
from producer.fl.rounds import RoundPolicy
from producer.fl.training import TrainingSpec, build_training_plan, evaluate, get_weights
from tests.behaviour.conftest import DeviceFactory, TransportCase

SPEC = TrainingSpec(lr=0.2, batch_size=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _shares() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(3, 6, generator=g) * 2
    out = []
    for k in range(4):
        y = torch.randint(0, 3, (16 + 4 * k,), generator=g)
        out.append((f"fb-{k}", centers[y] + torch.randn(len(y), 6, generator=g), y))
    return out


@pytest.mark.timeout(1500)  # a Celery worker started for this test may take minutes under load
def test_fedbuff_on_plan_devices_improves_the_model_and_matches_eager_torch_on_its_arrivals(
    fleet: fp.Fleet, transport_case: TransportCase, device: DeviceFactory
) -> None:
    for name, _, _ in _shares():  # wait for each device to answer once, however slow to start
        fleet.device(transport_case.device_id(name)).delete_objects([]).reply(900)
    net = _net()
    executor = ThreadPoolExecutor(8)
    x_all = torch.cat([x for _, x, _ in _shares()])
    y_all = torch.cat([y for _, _, y in _shares()])
    planned = [
        PlanParticipant(
            device(name, [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")]),
            lambda n: build_training_plan(net, SPEC, n),
            executor=executor,
            timeout=600,
        )
        for name, x, y in _shares()
    ]
    try:
        got = FederatedJob(
            participants=planned,
            strategy=FedBuff(buffer_size=2, concurrency=3),
            evaluate=lambda w: evaluate(_net(), w, x_all, y_all),
            policy=RoundPolicy(deadline=600.0),
        ).run(get_weights(net), num_rounds=5)
    finally:
        executor.shutdown(wait=False)

    assert [m.round for m in got.history] == list(range(6))
    assert got.history[-1].test_loss < 0.8 * got.history[0].test_loss
    fits = [r for r in got.devices if r.phase == "fit"]
    assert all(r.status == "ok" and r.model_version >= 0 for r in fits)
    assert all(r.staleness == r.round - 1 - r.model_version for r in fits)
    assert max(r.staleness for r in fits) >= 1  # 3 train at once, a fold every 2

    eager = [EagerParticipant(name, net, SPEC, x, y) for name, x, y in _shares()]
    want = FederatedJob(
        participants=eager,
        strategy=FedBuff(buffer_size=2, concurrency=3),
        arrival_log=got.arrivals,
    ).run(get_weights(net), num_rounds=5)
    assert want.arrivals == got.arrivals
    for k in want.weights:  # same arrivals: the plan's updates are eager torch's
        assert torch.allclose(got.weights[k], want.weights[k], atol=1e-5), k
