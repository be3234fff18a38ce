"""`fedplan demo --strategy fedbuff`: SIGKILLed and resumed on the same arrivals, it is exact."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.timeout(1500)  # three or four demo processes each; slow under load

ARGS = [
    "--strategy", "fedbuff", "--buffer-size", "2", "--concurrency", "3", "--rounds", "8",
    "--devices", "4", "--epochs", "2", "--seed", "3", "--tensorboard", "off", "--no-device-eval",
]  # fmt: skip


def _demo(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "producer.cli", "demo", *ARGS, "--out", str(out), *extra]


def _model(out: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    tensors = load_file(str(out / "checkpoints" / f"{latest['stem']}.safetensors"))
    return {k: v for k, v in tensors.items() if not k.startswith("strategy/")}


def _kill_after_version(out: Path, version: int, *extra: str) -> int:
    proc = subprocess.Popen(
        _demo(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["round"] >= version:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return int(json.loads(pointer.read_text())["round"])


def test_a_fedbuff_demo_killed_and_resumed_on_the_same_arrivals_ends_with_the_same_model(
    tmp_path: Path,
) -> None:
    whole = tmp_path / "whole"
    done = subprocess.run(_demo(whole), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    log = whole / "arrivals.json"
    arrivals = json.loads(log.read_text())
    assert len(arrivals) >= 16 and len({n for n, _ in arrivals}) == len(arrivals)

    killed = tmp_path / "killed"
    killed_at = _kill_after_version(killed, 3, "--replay-arrivals", str(log))
    assert 3 <= killed_at < 8, "the run must be killed mid-way"
    resumed = subprocess.run(
        _demo(killed, "--resume", "--replay-arrivals", str(log)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after round {killed_at}" in resumed.stdout
    assert json.loads((killed / "arrivals.json").read_text()) == arrivals  # each update once

    a, b = _model(whole), _model(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = json.loads((whole / "metrics.json").read_text())
    rows_b = json.loads((killed / "metrics.json").read_text())
    assert [r["test_loss"] for r in rows_a] == [r["test_loss"] for r in rows_b]


def test_a_fedbuff_demo_killed_and_resumed_live_folds_no_update_twice(tmp_path: Path) -> None:
    out = tmp_path / "live"
    killed_at = _kill_after_version(out, 2)
    assert 2 <= killed_at < 8
    resumed = subprocess.run(_demo(out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    arrivals = json.loads((out / "arrivals.json").read_text())
    numbers = [n for n, _ in arrivals]
    assert len(numbers) == len(set(numbers))
    folded = [r for r in json.loads((out / "devices.json").read_text()) if r["phase"] == "fit"]
    assert sum(r["status"] == "ok" for r in folded) == 8 * 2
