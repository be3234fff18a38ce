"""Tests of producer.fl.job: the whole loop against plain PyTorch, and crash + resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from producer.fl.aggregate import weighted_average
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant
from producer.fl.rounds import Deliver, FitTask
from producer.fl.strategy import FedAdam, FedAvg, FedProx, Strategy
from producer.fl.training import TrainingSpec, evaluate, get_weights, sample_order, train_eager
from schemas.errors import FedplanError

SPEC = TrainingSpec(lr=0.2, batch_size=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def _parts(n_devices: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(20 + k, 5, generator=g), torch.randint(0, 3, (20 + k,), generator=g))
        for k in range(n_devices)
    ]


def _job(strategy: Strategy | str, ckpt: Path | None = None, participants=None) -> FederatedJob:  # type: ignore[no-untyped-def]
    net = _net()
    xt, yt = _parts(1)[0]
    participants = participants or [
        EagerParticipant(f"d{k}", net, SPEC, x, y) for k, (x, y) in enumerate(_parts())
    ]
    return FederatedJob(
        participants=participants,
        strategy=strategy,
        evaluate=lambda w: evaluate(_net(), w, xt, yt),
        checkpoint_dir=ckpt,
        settings={"test": "job"},
    )


def test_a_fedavg_job_ends_with_the_model_of_a_plain_pytorch_loop() -> None:
    res = _job(FedAvg()).run(get_weights(_net()), num_rounds=3)
    scratch = _net()
    w = get_weights(_net())
    for r in range(1, 4):
        updates = []
        for k, (x, y) in enumerate(_parts()):
            new, _ = train_eager(scratch, SPEC, w, x, y, sample_order(len(x), 1000 * r + k))
            updates.append((new, len(x)))
        w = weighted_average(updates)
    assert all(torch.equal(res.weights[k], w[k]) for k in w)
    assert [m.round for m in res.history] == [0, 1, 2, 3]
    assert all(m.participants == 3 for m in res.history[1:])


class Crash(BaseException):
    """Stands for the process being killed."""


class CrashAt:
    """Wraps a participant; kills the 'process' when asked to train in a given round."""

    def __init__(self, inner: EagerParticipant, round_: int) -> None:
        self.inner, self.round = inner, round_

    @property
    def device_id(self) -> str:
        return self.inner.device_id

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        if task.server_round == self.round:
            raise Crash
        self.inner.start_fit(task, deliver)


@pytest.mark.parametrize("make_strategy", [FedAvg, lambda: FedAdam(lr=0.05)])
def test_a_job_killed_midway_and_resumed_ends_with_the_uninterrupted_model(
    tmp_path: Path, make_strategy
) -> None:  # type: ignore[no-untyped-def]
    full = _job(make_strategy()).run(get_weights(_net()), num_rounds=4)

    net = _net()
    crashing = [
        CrashAt(EagerParticipant(f"d{k}", net, SPEC, x, y), 3) for k, (x, y) in enumerate(_parts())
    ]
    with pytest.raises(Crash):
        _job(make_strategy(), tmp_path, crashing).run(get_weights(_net()), num_rounds=4)
    resumed = _job(make_strategy(), tmp_path).run(get_weights(_net()), num_rounds=4, resume=True)

    assert resumed.resumed_from == 2
    assert all(torch.equal(resumed.weights[k], full.weights[k]) for k in full.weights)
    assert [m.round for m in resumed.history] == [0, 1, 2, 3, 4]
    assert [m.test_loss for m in resumed.history] == [m.test_loss for m in full.history]


def test_resuming_another_jobs_checkpoint_is_refused(tmp_path: Path) -> None:
    _job(FedAvg(), tmp_path).run(get_weights(_net()), num_rounds=1)
    other = _job(FedAvg(), tmp_path)
    other.settings = {"test": "another"}
    with pytest.raises(FedplanError, match="another job"):
        other.run(get_weights(_net()), num_rounds=2, resume=True)


def test_a_job_takes_its_strategy_by_registered_name_with_options() -> None:
    job = FederatedJob(
        participants=[],
        strategy="fedprox",
        strategy_options={"proximal_mu": 0.2},
        evaluate=lambda w: (0.0, 1.0),
    )
    assert isinstance(job.strategy, FedProx) and job.strategy.proximal_mu == 0.2
    with pytest.raises(FedplanError, match="no strategy named 'nope'"):
        FederatedJob(participants=[], strategy="nope", evaluate=lambda w: (0.0, 1.0))


def test_a_job_by_strategy_name_trains_like_one_given_the_strategy_object() -> None:
    by_object = _job(FedAvg()).run(get_weights(_net()), num_rounds=2)
    by_name = _job("fedavg").run(get_weights(_net()), num_rounds=2)
    for key, value in by_object.weights.items():
        torch.testing.assert_close(by_name.weights[key], value, rtol=0, atol=0)
