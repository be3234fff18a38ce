"""A three-node RabbitMQ cluster losing the node every client is connected to, mid-run.

Producers (pika, a list of nodes) and Celery workers (kombu failover URLs) move to the other
nodes; the quorum queues keep every command. Node 1 is first in every URL list, so every
connection is on the node that is killed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from producer.transport.amqp import AmqpTransport
from tests.conftest import ci_mode
from tests.integration.broker import Replies, WorkerProcess
from tests.integration.cluster import Cluster, ClusterVhost, CounterRun, cluster_problem

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    problem = cluster_problem()
    if problem is not None:
        if ci_mode():
            pytest.fail(f"{problem}; CI=true needs it for the cluster tests", pytrace=False)
        pytest.skip(problem)
    c = Cluster(tmp_path_factory.mktemp("cluster") / "nodes")
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cvhost(cluster: Cluster) -> Iterator[ClusterVhost]:
    v = ClusterVhost(cluster, secrets.token_hex(4))
    v.create()
    yield v
    v.delete()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_node_killed_under_300_counter_calls_loses_none_and_runs_none_twice(
    cluster: Cluster, cvhost: ClusterVhost, tmp_path: Path
) -> None:
    replies = Replies()
    settings = cvhost.settings.replace(producer_id=f"t{secrets.token_hex(4)}")
    transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    worker = WorkerProcess(
        "carol", tmp_path / "carol", cvhost, {"FEDPLAN_QUEUE_TYPE": "quorum"}
    ).start()
    try:
        worker.wait_ready()
        run = CounterRun(transport, replies, "carol")
        run.setup()
        run.publish(100)
        _wait(lambda: run.answered() >= 30, 120, "30 replies before the kill")
        cluster.kill_node(1)
        run.publish(200)  # published through the surviving nodes
        _wait(lambda: run.answered() >= 150, 180, "150 replies with node 1 down")
        cluster.start_node(1)
        assert run.wait_all(180), f"{len(run.cids) - run.answered()} calls never answered"
        tally = run.tally()
        assert tally.clean, tally
        assert tally.executions == 300
        assert transport.reconnects >= 1
        assert "Connection to broker lost" in worker.log_path.read_text(errors="replace")
    finally:
        transport.close()
        worker.stop()


ARGS = ["--rounds", "5", "--devices", "2", "--epochs", "1", "--seed", "5", "--quorum", "1.0"]


def _demo(url: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "producer.cli", "demo", *ARGS, "--broker", url, "--out", str(out)]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / f"{latest['stem']}.safetensors"))


def _round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def test_the_fedavg_demo_with_a_node_killed_and_restarted_ends_with_the_undisturbed_model(
    cluster: Cluster, cvhost: ClusterVhost, tmp_path: Path
) -> None:
    env = dict(os.environ, FEDPLAN_QUEUE_TYPE="quorum")
    calm = tmp_path / "calm"
    done = subprocess.run(
        _demo(cvhost.url, calm), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr

    hit = tmp_path / "hit"
    log = (tmp_path / "hit.log").open("wb")
    proc = subprocess.Popen(_demo(cvhost.url, hit), env=env, stdout=log, stderr=log)
    try:
        _wait(lambda: _round(hit) >= 1 or proc.poll() is not None, 240, "round 1")
        cluster.kill_node(1)
        killed_at = _round(hit)
        cluster.start_node(1)  # the demo goes on over nodes 2 and 3 while node 1 boots
        assert proc.wait(timeout=300) == 0, (tmp_path / "hit.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert 1 <= killed_at < 5, "node 1 must die mid-run"

    a, b = _final_weights(calm), _final_weights(hit)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = json.loads((calm / "metrics.json").read_text())
    rows_b = json.loads((hit / "metrics.json").read_text())
    assert [r["test_loss"] for r in rows_a] == [r["test_loss"] for r in rows_b]
    trained = [r for r in rows_b if r["round"] > 0]
    assert [(r["participants"], r["failures"]) for r in trained] == [(2, 0)] * 5
    assert "broker connection lost" in (tmp_path / "hit.log").read_text()
    device_logs = [p.read_text(errors="replace") for p in (hit / "devices").glob("*.log")]
    assert device_logs and all("Connection to broker lost" in t for t in device_logs)
