"""Tests of producer.fl.tracking: a job's metrics land in TensorBoard event files and MLflow."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from producer.fl.evaluation import DeviceMetrics
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant
from producer.fl.progress import RoundMetrics
from producer.fl.rounds import Deliver, FitReply, FitTask, RoundPolicy
from producer.fl.tracking import MLflowTracker, TensorBoardTracker, scalars
from producer.fl.training import TrainingSpec, evaluate, get_weights

SPEC = TrainingSpec(lr=0.2, batch_size=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _rows(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class _Failing(EagerParticipant):
    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        deliver(FitReply(task.task_id, self.device_id, error="PlanRuntimeError: out of memory"))


def test_a_jobs_rounds_and_devices_are_written_as_tensorboard_scalars(tmp_path: Path) -> None:
    x, y = _rows(0, 16)
    xt, yt = _rows(1, 9)
    ok = EagerParticipant("d-ok", _net(), SPEC, x, y, x_test=xt, y_test=yt)
    bad = _Failing("d/bad", _net(), SPEC, x, y)
    job = FederatedJob(
        participants=[ok, bad],
        strategy="fedavg",
        evaluate=lambda w: evaluate(_net(), w, xt, yt),
        evaluate_on_devices=True,
        policy=RoundPolicy(quorum=0.5),
        trackers=[TensorBoardTracker(tmp_path)],
    )
    res = job.run(get_weights(_net()), num_rounds=3)

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    acc = series("server/test_accuracy")
    assert acc == [(m.round, pytest.approx(m.test_accuracy)) for m in res.history]
    fed = series("federated/test_accuracy")
    assert fed == [(m.round, pytest.approx(m.device_accuracy)) for m in res.history]
    assert [v for _, v in series("round/failures")][1:] == [1.0, 1.0, 1.0]
    assert [v for _, v in series("device/d-ok/fit_ok")] == [1.0, 1.0, 1.0]
    assert [v for _, v in series("device/d_bad/fit_ok")] == [0.0, 0.0, 0.0]  # '/' made safe
    assert all(v >= 0 for _, v in series("device/d-ok/fit_seconds"))
    assert "device/d-ok/eval_accuracy" in tags and "train/loss" in tags


def test_nan_metrics_are_left_out_rather_than_written() -> None:
    m = RoundMetrics(0, 0, 0, float("nan"), 2.0, 0.1, 0.0, 0.0)
    row = DeviceMetrics(0, "a", "fit", "timeout")
    s = scalars(m, [row])
    assert "train/loss" not in s and "device/a/fit_seconds" not in s
    assert s["device/a/fit_ok"] == 0.0 and s["server/test_loss"] == 2.0


def test_mlflow_gets_the_same_scalars_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))  # type: ignore[attr-defined]
    fake.set_experiment = lambda name: calls.append(("experiment", name))  # type: ignore[attr-defined]
    fake.start_run = lambda run_name=None: calls.append(("start", run_name))  # type: ignore[attr-defined]
    fake.log_params = lambda p: calls.append(("params", p))  # type: ignore[attr-defined]
    fake.log_metrics = lambda m, step: calls.append(("metrics", (step, m)))  # type: ignore[attr-defined]
    fake.end_run = lambda: calls.append(("end", None))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", fake)

    t = MLflowTracker(tracking_uri="file:/tmp/x", run_name="r", params={"lr": 0.1})
    m = RoundMetrics(2, 1, 0, 0.5, 0.4, 0.9, 1.0, 2.0)
    t.log_round(m, [DeviceMetrics(2, "a", "fit", "ok", 5, 0.5, seconds=0.25)])
    t.close()
    logged = dict(calls)
    assert logged["params"] == {"lr": "0.1"}
    step, metrics = logged["metrics"]
    assert step == 2 and metrics["server.test_accuracy"] == 0.9
    assert metrics["device.a.fit_seconds"] == 0.25
    assert calls[-1] == ("end", None)


def test_mlflow_without_the_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"fedplan\[mlflow\]"):
        MLflowTracker()
