"""Pace steering on RabbitMQ: a stopped worker is not sampled, and is again once restarted."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

import producer as fp
from producer.fl.aggregate import weighted_average
from producer.fl.pace import PaceSteering, probe_for
from producer.fl.participants import PlanParticipant
from producer.fl.rounds import RoundPolicy, RoundRunner
from producer.fl.strategy import FedAvg
from producer.fl.training import (
    TrainingSpec,
    build_training_plan,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
)
from tests.integration.broker import WorkerProcess

pytestmark = pytest.mark.rabbitmq
SPEC = TrainingSpec(lr=0.2, batch_size=4)
IDS = ["pace-a", "pace-b", "pace-c"]


def _data(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return torch.randn(10 + k, 3, generator=g), torch.randint(0, 2, (10 + k,), generator=g)


def _wait(pace: PaceSteering, predicate: Callable[[list[str], dict[str, str]], bool]) -> None:
    """Poll the management API (its counters lag by the stats interval) for up to 60 s."""
    deadline = time.monotonic() + 60
    ok, skipped = pace.eligible(IDS)
    while not predicate(ok, skipped):
        assert time.monotonic() < deadline, f"pace steering still sees {ok}, skipped {skipped}"
        time.sleep(0.5)
        ok, skipped = pace.eligible(IDS)


def _eager_round(net: nn.Module, w: dict, server_round: int, indices: list[int]) -> dict:  # type: ignore[type-arg]
    updates = []
    for k in indices:
        x, y = _data(k)
        order = sample_order(len(x), 1000 * server_round + k)
        new, _ = train_eager(scratch_copy(net), SPEC, w, x, y, order)
        updates.append((new, len(x)))
    return weighted_average(updates)


def test_a_stopped_worker_is_skipped_and_sampled_again_once_it_is_back(
    vhost, workers: Callable[..., WorkerProcess]
) -> None:  # type: ignore[no-untyped-def]
    procs = [workers(d) for d in IDS]
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    with fp.connect(vhost.url, timeout=60) as fleet:
        members = []
        for k, device_id in enumerate(IDS):
            dev = fleet.device(device_id)
            dev.clear_objects()
            x, y = _data(k)
            dev.send_tensor(fp.tag(x, "train", "x")).wait()
            dev.send_tensor(fp.tag(y, "train", "y")).wait()
            members.append(
                PlanParticipant(dev, lambda n: build_training_plan(net, SPEC, n), timeout=60)
            )
        pace = PaceSteering(probe_for(fleet))
        runner = RoundRunner(members, FedAvg(), RoundPolicy(deadline=60.0), pace=pace)
        _wait(pace, lambda ok, _: ok == IDS)

        w0 = get_weights(net)
        r1 = runner.run_round(1, w0)
        assert r1.asked == IDS and not r1.skipped and not r1.failures

        procs[1].stop()  # the device goes offline: its queue keeps no consumer
        _wait(pace, lambda _, skipped: skipped == {"pace-b": "offline"})
        assert r1.weights is not None
        r2 = runner.run_round(2, r1.weights)
        assert r2.asked == ["pace-a", "pace-c"] and r2.skipped == {"pace-b": "offline"}
        assert not r2.failures and r2.attempt == 1  # no timeout on the offline device
        want = _eager_round(net, r1.weights, 2, [0, 2])
        assert r2.weights is not None
        assert all(torch.allclose(r2.weights[k], want[k], atol=1e-6) for k in want)

        procs[1].start().wait_ready()  # back online, with its data dir (data and plan) intact
        _wait(pace, lambda ok, _: ok == IDS)
        r3 = runner.run_round(3, r2.weights)
        assert r3.asked == IDS and not r3.skipped and not r3.failures
        want = _eager_round(net, r2.weights, 3, [0, 1, 2])
        assert r3.weights is not None
        assert all(torch.allclose(r3.weights[k], want[k], atol=1e-6) for k in want)
