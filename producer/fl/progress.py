"""Progress of a federated run: a terminal progress bar, metrics.csv/JSON and a PNG plot."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TextIO


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

    @staticmethod
    def from_dict(row: dict[str, float | int]) -> RoundMetrics:
        """Inverse of ``dataclasses.asdict`` (for rows kept in checkpoint metadata)."""
        kwargs = {f.name: row[f.name] for f in fields(RoundMetrics) if f.name in row}
        return RoundMetrics(**kwargs)  # type: ignore[arg-type]


class ProgressBar:
    """A one-line progress bar redrawn per round (plain lines when not a terminal).

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(2, stream=out, width=10)
    >>> bar.update(RoundMetrics(1, 8, 0, 0.5, 0.4, 0.9, 0.1, 0.1))
    >>> "round 1/2" in out.getvalue() and "acc 90.00%" in out.getvalue()
    True
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, m: RoundMetrics) -> str:
        """The text shown for round ``m``."""
        done = round(self.width * m.round / max(self.total, 1))
        bar = "#" * done + "-" * (self.width - done)
        retry = f" retries {m.attempts - 1}" if m.attempts > 1 else ""
        return (
            f"[{bar}] round {m.round}/{self.total} | devices {m.participants}"
            f"{f' (failed {m.failures})' if m.failures else ''}{retry} | "
            f"loss {m.train_loss:.4f} | test loss {m.test_loss:.4f} | "
            f"acc {100 * m.test_accuracy:.2f}% | {m.round_seconds:.2f}s "
            f"(total {m.elapsed_seconds:.1f}s)"
        )

    def update(self, m: RoundMetrics) -> None:
        """Redraw for round ``m``."""
        if self._tty:
            self.stream.write("\r\x1b[2K" + self.line(m))
            if m.round >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(self.line(m) + "\n")
        self.stream.flush()


def write_metrics(rows: Sequence[RoundMetrics], directory: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` and ``metrics.json`` in ``directory``; returns both paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = d / "metrics.csv", d / "metrics.json"
    names = [f.name for f in fields(RoundMetrics)]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
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
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(rounds, [100 * r.test_accuracy for r in rows], "o-", color="tab:green")
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
