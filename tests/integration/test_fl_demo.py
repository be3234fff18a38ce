"""`fedplan demo` end to end: killed with SIGKILL and resumed, it equals an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = ["--rounds", "10", "--devices", "4", "--epochs", "2", "--seed", "3"]


def _demo(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "producer.cli", "demo", *ARGS, "--out", str(out), *extra]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / f"{latest['stem']}.safetensors"))


def test_a_demo_killed_midway_and_resumed_ends_with_the_model_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    whole = tmp_path / "whole"
    done = subprocess.run(_demo(whole), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout and (whole / "metrics.png").is_file()

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_demo(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if pointer.exists() and json.loads(pointer.read_text())["round"] >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = json.loads(pointer.read_text())["round"]
    assert 3 <= killed_at < 10, "the run must be killed mid-way"

    resumed = subprocess.run(
        _demo(killed, "--resume"), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after round {killed_at}" in resumed.stdout

    a, b = _final_weights(whole), _final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = json.loads((whole / "metrics.json").read_text())
    rows_b = json.loads((killed / "metrics.json").read_text())
    assert [r["test_loss"] for r in rows_a] == [r["test_loss"] for r in rows_b]
