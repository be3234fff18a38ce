"""Classic vs quorum device queues, side by side: the same calls alternating between two devices.

Two real Celery workers in one vhost, one consuming a classic device queue and one a quorum
device queue (``FEDPLAN_QUEUE_TYPE``); rounds alternate between them so both see the same
machine load. Measured per queue type: p50/p99 of a sequential ``StoreObject`` round trip
(1 KiB tensor, persistent message, publisher confirms, reply with confirms before the ack)
and pipelined commands per second (a window of 32 in flight).

Run from the repository root (needs RabbitMQ with the management plugin):

    .venv/bin/python benchmarks/bench_queue_type.py [--rounds 5] [--calls 100]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from producer.transport.amqp import AmqpTransport  # noqa: E402
from schemas.wire import new_id  # noqa: E402
from tests.integration import commands as cmd  # noqa: E402
from tests.integration.broker import Replies, RunVhost, WorkerProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    vhost = RunVhost(secrets.token_hex(4)).create()
    root = Path(tempfile.mkdtemp(prefix="fedplan-qtype-"))
    kinds = ("classic", "quorum")
    replies = Replies()
    transports: dict[str, AmqpTransport] = {}
    workers: list[WorkerProcess] = []
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    rate: dict[str, list[float]] = {k: [] for k in kinds}
    x = torch.randn(256)  # 1 KiB
    try:
        for kind in kinds:
            pid = f"q{kind}{secrets.token_hex(2)}"
            s = vhost.settings.replace(producer_id=pid, queue_type=kind)
            t = transports[kind] = AmqpTransport(on_reply=replies.on_reply, settings=s)
            t.ensure_device(kind)
            env = {"FEDPLAN_QUEUE_TYPE": kind}
            workers.append(WorkerProcess(kind, root / kind, vhost, env).start().wait_ready())
            q = vhost.queue(f"fedplan.device.{kind}")
            print(kind, "queue type on the broker:", q.get("type"))
        for r in range(args.rounds + 1):  # round 0 warms up
            for kind in kinds if r % 2 else reversed(kinds):
                t = transports[kind]
                samples = []
                for _ in range(args.calls):
                    cid = new_id()
                    t0 = time.perf_counter()
                    t.publish(kind, cmd.store_object(cid, kind, "x", x), command_id=cid)
                    replies.wait(cid, 60)
                    samples.append((time.perf_counter() - t0) * 1000)
                cids = [new_id() for _ in range(args.calls)]
                t0 = time.perf_counter()
                for i, cid in enumerate(cids):
                    t.publish(kind, cmd.store_object(cid, kind, "x", x), command_id=cid)
                    if i >= 32:
                        replies.wait(cids[i - 32], 60)
                for cid in cids:
                    replies.wait(cid, 60)
                per_s = len(cids) / (time.perf_counter() - t0)
                if r:
                    lat[kind] += samples
                    rate[kind].append(per_s)
    finally:
        for t in transports.values():
            t.close()
        for w in workers:
            w.stop()
        vhost.delete()
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.calls} calls")
    print("| queue type | round trip p50 / p99 ms | pipelined commands/s (median of rounds) |")
    print("|---|---|---|")
    for kind in kinds:
        q = statistics.quantiles(lat[kind], n=100)
        print(f"| {kind} | {q[49]:.2f} / {q[98]:.2f} | {statistics.median(rate[kind]):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
