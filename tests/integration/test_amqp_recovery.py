"""A producer SIGKILLed with calls in flight: a new one with its producer id gets every result.

The killed producer's journal names what it had in flight; ``fp.connect`` with the same
producer id re-registers those commands before consuming the durable results queue, so the
replies that came meanwhile (results, plain Python outputs, typed errors) are delivered by
id instead of being dropped as replies to unknown commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import producer as fp
from schemas.errors import ObjectNotFound, PlanShapeError
from tests.integration.broker import REPO, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq

SCRIPT = Path(__file__).with_name("killed_producer.py")


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"the producer process ended early:\n{proc.stderr.read()[-4000:]}")
    return line.strip()


def test_a_killed_producers_pending_results_reach_a_new_producer_with_its_id(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    producer_id = f"k{os.getpid()}{tmp_path.name[-6:]}".replace("_", "")
    journal = tmp_path / "journal"
    worker = workers("alice")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), vhost.url, producer_id, str(journal)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _line(proc) == "READY"
        worker.stop()  # the calls wait in alice's durable queue
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ids = json.loads(_line(proc))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    workers("alice")  # alice comes back (same data dir) and answers into the results queue

    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as fleet:
        recovered = fleet.recover()
        assert ids["missing_command"] in recovered
        assert len(recovered) == 3
        collector = fleet.collector
        x = torch.tensor([1.0, -2.0, 3.0, -4.0])
        assert torch.equal(
            collector.for_result(ids["tensor"]).value(ids["tensor"], 120), x.abs() * 2
        )
        assert collector.for_result(ids["value"]).value(ids["value"], 120) == 4  # plain output
        with pytest.raises(PlanShapeError) as shape_err:
            collector.wait_result(ids["failing"], 120)
        assert shape_err.value.device_id == "alice"
        with pytest.raises(ObjectNotFound, match="no-such-object") as missing:
            recovered[ids["missing_command"]].reply(120)
        assert missing.value.device_id == "alice"
        assert collector.journal is not None
        assert collector.journal.in_flight() == []
