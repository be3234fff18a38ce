"""Progress of a federated run: a progress bar (rich), metrics.csv/JSON and a PNG plot."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column

from producer.fl.evaluation import DeviceMetrics


@dataclass(frozen=True, slots=True)
class RoundMetrics:
    """One row of ``metrics.csv``: round 0 is the evaluation before training."""

    round: int
    participants: int
    failures: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    round_seconds: float
    elapsed_seconds: float
    attempts: int = 1
    device_loss: float = float("nan")
    """Federated evaluation: example-weighted loss of the devices' own test data (NaN: off)."""
    device_accuracy: float = float("nan")
    device_examples: int = 0
    mean_staleness: float = float("nan")
    """FedBuff: mean staleness of the updates folded into this version (NaN: rounds)."""
    stale_dropped: int = 0
    """FedBuff: updates dropped since the last version for exceeding ``max_staleness``."""
    epsilon: float = float("nan")
    """DP-FedAvg: ε spent after this round at the job's δ (NaN: no differential privacy)."""

    @staticmethod
    def from_dict(row: dict[str, float | int]) -> RoundMetrics:
        """Inverse of ``dataclasses.asdict`` (for rows kept in checkpoint metadata)."""
        kwargs = {f.name: row[f.name] for f in fields(RoundMetrics) if f.name in row}
        return RoundMetrics(**kwargs)  # type: ignore[arg-type]


class ProgressBar:
    """Round progress drawn by ``rich``: a live bar on a terminal, one line per round otherwise.

    Use it as a context manager (or call :meth:`close`) so that a run that stops early
    leaves the terminal clean.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> with ProgressBar(2, stream=out, width=10) as bar:
    ...     bar.update(RoundMetrics(1, 8, 0, 0.5, 0.4, 0.9, 0.1, 0.1))
    >>> "round 1/2" in out.getvalue() and "acc 90.00%" in out.getvalue()
    True
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        width: int = 24,
        force_terminal: bool | None = None,
    ) -> None:
        self.total = total
        self.console = Console(
            file=stream if stream is not None else sys.stderr,
            force_terminal=force_terminal,
            highlight=False,
            soft_wrap=True,
        )
        self._live: Progress | None = None
        if self.console.is_terminal:
            self._live = Progress(
                TextColumn("round {task.completed}/{task.total}"),
                BarColumn(bar_width=width),
                TextColumn(
                    "{task.fields[stats]}", markup=False, table_column=Column(overflow="fold")
                ),
                console=self.console,
            )
            self._task = self._live.add_task("rounds", total=total, stats="")

    def stats(self, m: RoundMetrics) -> str:
        """Devices, failures, retries, losses, accuracy and time of round ``m``."""
        retry = f" retries {m.attempts - 1}" if m.attempts > 1 else ""
        server = (
            f" | test loss {m.test_loss:.4f} | acc {100 * m.test_accuracy:.2f}%"
            if m.test_loss == m.test_loss  # NaN: no server-side evaluation
            else ""
        )
        federated = (
            f" | device acc {100 * m.device_accuracy:.2f}% ({m.device_examples} rows)"
            if m.device_examples
            else ""
        )
        private = f" | ε {m.epsilon:.3g}" if m.epsilon == m.epsilon else ""  # NaN: no DP
        return (
            f"devices {m.participants}{f' (failed {m.failures})' if m.failures else ''}"
            f"{retry} | loss {m.train_loss:.4f}{server}{federated}{private} | "
            f"{m.round_seconds:.2f}s "
            f"(total {m.elapsed_seconds:.1f}s)"
        )

    def line(self, m: RoundMetrics) -> str:
        """The line written for round ``m`` when the stream is not a terminal."""
        return f"round {m.round}/{self.total} | {self.stats(m)}"

    def update(self, m: RoundMetrics) -> None:
        """Show round ``m``; the live bar stops after the last round."""
        if self._live is None:
            self.console.print(self.line(m), markup=False)
            return
        self._live.update(self._task, completed=m.round, stats=self.stats(m))
        self._live.start()  # idempotent
        if m.round >= self.total:
            self.close()

    def close(self) -> None:
        """Stop the live bar (the last state stays on screen); harmless when not started."""
        if self._live is not None:
            self._live.stop()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_metrics(rows: Sequence[RoundMetrics], directory: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` and ``metrics.json`` in ``directory``; returns both paths."""
    return _write_rows(RoundMetrics, rows, Path(directory), "metrics")


def write_device_metrics(rows: Sequence[DeviceMetrics], directory: str | Path) -> tuple[Path, Path]:
    """Write ``devices.csv`` and ``devices.json``: one row per device, round and phase."""
    return _write_rows(DeviceMetrics, rows, Path(directory), "devices")


def _write_rows(
    kind: type[Any], rows: Sequence[Any], directory: Path, stem: str
) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.json`` of dataclass rows of ``kind``."""
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / f"{stem}.csv", directory / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(kind)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return csv_path, json_path


def plot_metrics(rows: Sequence[RoundMetrics], path: str | Path, *, title: str = "") -> Path:
    """A PNG with loss (train and test) and test accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in rows if r.round > 0]
    ax_loss.plot([r.round for r in trained], [r.train_loss for r in trained], "o-", label="train")
    ax_loss.plot(rounds, [r.test_loss for r in rows], "s-", label="test")
    if any(r.device_examples for r in rows):
        ax_loss.plot(rounds, [r.device_loss for r in rows], "^-", label="devices' test")
        ax_acc.plot(rounds, [100 * r.device_accuracy for r in rows], "^-", label="devices")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(
        rounds, [100 * r.test_accuracy for r in rows], "o-", color="tab:green", label="server"
    )
    ax_acc.legend()
    spent = [r for r in rows if r.epsilon == r.epsilon]  # DP runs: ε per round
    if spent:
        ax_eps = ax_acc.twinx()
        ax_eps.plot([r.round for r in spent], [r.epsilon for r in spent], "d--",
                    color="tab:purple", label="ε")
        ax_eps.set_ylabel("ε spent (at the run's δ)")
        ax_eps.legend(loc="center right")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
