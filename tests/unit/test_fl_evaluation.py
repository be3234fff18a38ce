"""Tests of federated evaluation: the evaluation plan, the runner, the job's device metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from producer.fl.evaluation import EvaluateReply, EvaluateTask, EvaluationRunner
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant
from producer.fl.progress import write_device_metrics
from producer.fl.strategy import EvaluateResult, FedAvg
from producer.fl.training import (
    TrainingSpec,
    build_evaluation_plan,
    evaluate,
    flatten,
    get_weights,
)
from schemas.errors import PlanGuardError

SPEC = TrainingSpec(lr=0.2, batch_size=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def _split(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + k)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _devices(n_devices: int = 3) -> list[EagerParticipant]:
    out = []
    for k in range(n_devices):
        x, y = _split(k, 20 + k)
        xt, yt = _split(100 + k, 7 + 3 * k)
        out.append(EagerParticipant(f"d{k}", _net(), SPEC, x, y, x_test=xt, y_test=yt))
    return out


@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
def test_the_evaluation_plan_computes_the_eager_loss_and_accuracy(loss: str) -> None:
    net = _net()
    x, y = _split(0, 13)
    w = {k: v + 0.1 for k, v in get_weights(net).items()}
    out = build_evaluation_plan(net, 13, loss=loss)(x, y, flatten(w))
    ref = evaluate(_net(), w, x, y, loss)
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float32), atol=1e-6)


def test_the_evaluation_plan_refuses_another_row_count() -> None:
    plan = build_evaluation_plan(_net(), 4)
    x, y = _split(0, 5)
    with pytest.raises(PlanGuardError, match=r"x.shape\[0\], 4"):
        plan(x, y, flatten(get_weights(_net())))


def test_the_strategy_weighs_device_evaluations_by_their_example_counts() -> None:
    s = FedAvg().aggregate_evaluate(
        1, [EvaluateResult("a", 10, 2.0, 0.5), EvaluateResult("b", 30, 1.0, 0.9)]
    )
    assert (s.loss, s.accuracy, s.num_examples, s.devices) == (1.25, 0.8, 40, 2)
    empty = FedAvg().aggregate_evaluate(1, [])
    assert math.isnan(empty.loss) and empty.num_examples == 0


class _Broken(EagerParticipant):
    def start_evaluate(self, task: EvaluateTask, deliver) -> None:  # type: ignore[no-untyped-def]
        deliver(EvaluateReply(task.task_id, self.device_id, error="PlanRuntimeError: boom"))


class _Silent(EagerParticipant):
    def start_evaluate(self, task: EvaluateTask, deliver) -> None:  # type: ignore[no-untyped-def]
        pass  # never answers


def test_failing_and_silent_devices_are_recorded_and_left_out_of_the_summary() -> None:
    good = _devices(1)[0]
    x, y = _split(5, 4)
    broken = _Broken("bad", _net(), SPEC, x, y, x_test=x, y_test=y)
    silent = _Silent("mute", _net(), SPEC, x, y, x_test=x, y_test=y)
    no_test = EagerParticipant("train-only", _net(), SPEC, x, y)
    runner = EvaluationRunner([good, broken, silent, no_test], FedAvg(), deadline=0.5)
    out = runner.run(2, get_weights(_net()))
    assert [r.device_id for r in out.results] == ["d0"]
    assert {f.device_id: f.kind for f in out.failures} == {"bad": "error", "mute": "timeout"}
    assert out.summary.num_examples == len(good.x_test)  # type: ignore[arg-type]
    rows = {r.device_id: r for r in out.device_rows()}
    assert set(rows) == {"d0", "bad", "mute"}
    assert rows["bad"].error == "PlanRuntimeError: boom" and rows["mute"].status == "timeout"
    assert rows["d0"].status == "ok" and rows["d0"].seconds >= 0


def test_a_job_with_device_evaluation_reports_the_weighted_eager_metrics_every_round(
    tmp_path: Path,
) -> None:
    devices = _devices()
    job = FederatedJob(participants=devices, strategy="fedavg", evaluate_on_devices=True)
    res = job.run(get_weights(_net()), num_rounds=2)
    weights_by_round = [get_weights(_net()), res.outcomes[0].weights, res.outcomes[1].weights]
    for m, w in zip(res.history, weights_by_round, strict=True):
        assert w is not None
        per = [(evaluate(_net(), w, d.x_test, d.y_test), len(d.x_test)) for d in devices]  # type: ignore[arg-type]
        n = sum(k for _, k in per)
        assert m.device_examples == n
        assert m.device_loss == pytest.approx(sum(v[0] * k for v, k in per) / n)
        assert m.device_accuracy == pytest.approx(sum(v[1] * k for v, k in per) / n)
        assert math.isnan(m.test_loss)  # no server-side evaluation was asked for
    phases = [(r.round, r.phase) for r in res.devices]
    assert phases.count((0, "evaluate")) == 3 and phases.count((2, "fit")) == 3
    assert all(r.status == "ok" and r.seconds >= 0 for r in res.devices)
    csv_path, json_path = write_device_metrics(res.devices, tmp_path)
    assert len(json.loads(json_path.read_text())) == len(res.devices) == 3 * 5
    assert csv_path.read_text().splitlines()[0].startswith("round,device_id,phase,status")


def test_device_metrics_survive_a_resume(tmp_path: Path) -> None:
    def job() -> FederatedJob:
        return FederatedJob(
            participants=_devices(),
            strategy="fedavg",
            evaluate_on_devices=True,
            checkpoint_dir=tmp_path,
        )

    full = FederatedJob(participants=_devices(), strategy="fedavg", evaluate_on_devices=True)
    whole = full.run(get_weights(_net()), num_rounds=3)
    job().run(get_weights(_net()), num_rounds=2)
    resumed = job().run(get_weights(_net()), num_rounds=3, resume=True)

    def key(rows: list) -> list[str]:  # type: ignore[type-arg]
        return [repr((r.round, r.device_id, r.phase, r.loss, r.accuracy)) for r in rows]  # NaN-safe

    assert key(resumed.devices) == key(whole.devices)
    assert resumed.resumed_from == 2


@pytest.mark.parametrize("values", [[-1.0, 0.5], [0.3, 5.0], [float("nan"), 0.5]])
def test_an_impossible_evaluation_from_a_device_is_a_failure_not_a_metric(
    values: list[float],
) -> None:
    import producer as fp
    from producer.fl.participants import PlanParticipant
    from producer.plans.plan import Plan

    class Lying(Plan):
        def forward(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
            return x.sum() * 0 + torch.tensor(values)

    x, y = _split(0, 6)
    lying = Lying(name="lying").build(x, y, flatten(get_weights(_net())))
    with fp.connect() as fleet:
        data = [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")]
        data += [fp.tag(x.clone(), "test", "x"), fp.tag(y.clone(), "test", "y")]
        p = PlanParticipant(
            fleet.device("liar", data=data), lambda n: None, evaluation_plan_for=lambda n: lying
        )
        out = EvaluationRunner([p], FedAvg(), deadline=30).run(1, get_weights(_net()))
    assert not out.results and out.failures[0].kind == "error"
    assert "a loss must be finite" in out.failures[0].message
    assert out.summary.num_examples == 0
