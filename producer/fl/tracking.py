"""Experiment tracking for federated jobs: TensorBoard and (optionally) MLflow.

A :class:`Tracker` receives every round's :class:`~producer.fl.progress.RoundMetrics` and
the round's per-device rows (participation, failures, durations, per-device evaluation).
They are written alongside ``metrics.csv`` / ``devices.csv``, never instead of them.

Scalars written (step = round):

- ``train/loss``, ``server/test_loss``, ``server/test_accuracy`` (when evaluated on the
  server), ``federated/test_loss``, ``federated/test_accuracy``, ``federated/examples``;
- ``round/participants``, ``round/failures``, ``round/attempts``, ``round/seconds``;
- per device ``device/<id>/fit_seconds``, ``.../fit_loss``, ``.../fit_ok`` (1 when it
  delivered, 0 when it failed or timed out), ``.../eval_accuracy``, ``.../eval_loss``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from producer.fl.evaluation import DeviceMetrics
from producer.fl.progress import RoundMetrics


class Tracker(Protocol):
    """Receives a job's metrics as rounds end; ``close`` flushes at the end of a run."""

    def log_round(self, metrics: RoundMetrics, devices: Sequence[DeviceMetrics]) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: RoundMetrics, devices: Sequence[DeviceMetrics]) -> dict[str, float]:
    """The finite scalars of one round, by tag (what every tracker writes).

    Examples
    --------
    >>> m = RoundMetrics(1, 2, 0, 0.5, 0.4, 0.9, 1.5, 3.0)
    >>> d = DeviceMetrics(1, "dev-0", "fit", "ok", 10, 0.5, seconds=1.2)
    >>> s = scalars(m, [d])
    >>> s["server/test_accuracy"], s["device/dev-0/fit_seconds"], s["device/dev-0/fit_ok"]
    (0.9, 1.2, 1.0)
    """
    out: dict[str, float] = {
        "train/loss": metrics.train_loss,
        "server/test_loss": metrics.test_loss,
        "server/test_accuracy": metrics.test_accuracy,
        "round/participants": metrics.participants,
        "round/failures": metrics.failures,
        "round/attempts": metrics.attempts,
        "round/seconds": metrics.round_seconds,
        "privacy/epsilon": metrics.epsilon,
    }
    if metrics.device_examples:
        out["federated/test_loss"] = metrics.device_loss
        out["federated/test_accuracy"] = metrics.device_accuracy
        out["federated/examples"] = metrics.device_examples
    for row in devices:
        name = _tag(row.device_id)
        if row.phase == "fit":
            out[f"{name}/fit_ok"] = 1.0 if row.status == "ok" else 0.0
            out[f"{name}/fit_seconds"] = row.seconds
            out[f"{name}/fit_loss"] = row.loss
        else:
            out[f"{name}/eval_loss"] = row.loss
            out[f"{name}/eval_accuracy"] = row.accuracy
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def _tag(device_id: str) -> str:
    """A device id as a safe tag/metric name (letters, digits, ``-_.`` only)."""
    return "device/" + re.sub(r"[^A-Za-z0-9_.-]", "_", device_id)[:100]


class TensorBoardTracker:
    """Writes the scalars to a TensorBoard event file in ``logdir`` (``torch.utils.tensorboard``).

    Needs the ``tensorboard`` package (a fedplan dependency). View with
    ``tensorboard --logdir <logdir>``.

    Examples
    --------
    >>> import tempfile
    >>> t = TensorBoardTracker(tempfile.mkdtemp())
    >>> t.log_round(RoundMetrics(1, 2, 0, 0.5, 0.4, 0.9, 1.5, 3.0), [])
    >>> t.close()
    """

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log_round(self, metrics: RoundMetrics, devices: Sequence[DeviceMetrics]) -> None:
        for tag, value in scalars(metrics, devices).items():
            self.writer.add_scalar(tag, value, global_step=metrics.round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """Logs the scalars as MLflow metrics (step = round) in one run; the ``mlflow`` extra.

    ``tracking_uri`` defaults to MLflow's own default (``./mlruns``); ``params`` are
    logged once (the job's settings).
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str = "fedplan",
        run_name: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        try:
            import mlflow
        except ImportError as exc:  # an optional extra
            raise ImportError(
                "MLflow tracking needs the mlflow package: pip install 'fedplan[mlflow]'"
            ) from exc
        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_name=run_name)
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_round(self, metrics: RoundMetrics, devices: Sequence[DeviceMetrics]) -> None:
        values = {k.replace("/", "."): v for k, v in scalars(metrics, devices).items()}
        self._mlflow.log_metrics(values, step=metrics.round)

    def close(self) -> None:
        self._mlflow.end_run()
