"""Tests of producer.fl.progress: progress line, metrics files and the PNG plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from producer.fl.progress import ProgressBar, RoundMetrics, plot_metrics, write_metrics

ROWS = [
    RoundMetrics(0, 0, 0, float("nan"), 2.3, 0.1, 0.0, 0.0),
    RoundMetrics(1, 8, 0, 1.2, 1.0, 0.7, 0.5, 0.5),
    RoundMetrics(2, 7, 1, 0.6, 0.5, 0.9, 0.4, 0.9, attempts=2),
]


def test_the_progress_line_shows_participants_failures_loss_accuracy_and_time() -> None:
    out = io.StringIO()
    bar = ProgressBar(2, stream=out)
    for m in ROWS[1:]:
        bar.update(m)
    last = out.getvalue().splitlines()[-1]
    for piece in ("round 2/2", "devices 7", "failed 1", "retries 1", "loss 0.6000", "acc 90.00%"):
        assert piece in last


def test_metrics_are_written_as_csv_and_json_with_one_row_per_round(tmp_path: Path) -> None:
    csv_path, json_path = write_metrics(ROWS, tmp_path)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert float(rows[2]["test_accuracy"]) == 0.9
    loaded = [RoundMetrics.from_dict(r) for r in json.loads(json_path.read_text())]
    assert [repr(r) for r in loaded[1:]] == [repr(r) for r in ROWS[1:]]  # NaN: not measured


def test_the_plot_is_a_png_file(tmp_path: Path) -> None:
    path = plot_metrics(ROWS, tmp_path / "plot.png", title="demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_on_a_terminal_the_bar_is_live_and_stops_after_the_last_round() -> None:
    out = io.StringIO()
    bar = ProgressBar(2, stream=out, force_terminal=True)
    bar.update(ROWS[1])
    assert bar._live is not None and bar._live.live.is_started
    bar.update(ROWS[2])
    assert not bar._live.live.is_started
    text = out.getvalue()
    for piece in ("round 2/2", "devices 7", "failed 1", "retries 1", "acc 90.00%"):
        assert piece in text


def test_a_run_that_stops_early_leaves_no_live_bar_behind() -> None:
    out = io.StringIO()
    try:
        with ProgressBar(5, stream=out, force_terminal=True) as bar:
            bar.update(ROWS[1])
            raise RuntimeError("round 2 failed")
    except RuntimeError:
        pass
    assert bar._live is not None and not bar._live.live.is_started
    assert "round 1/5" in out.getvalue()
