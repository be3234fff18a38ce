"""Device workers of two checkouts side by side in one run: (a) call + get and (c) pipelined.

The same producer (this checkout) calls 4 Celery workers running the code of a *base*
checkout (e.g. ``git archive main | tar -x -C /tmp/base``) and 4 running this checkout's,
alternating blocks of calls, with the raw pika echo of ``bench_amqp.py`` alongside. On a
shared machine whose load swings between runs, this is the before/after of a device-side
change measured under the same load: (a) p50/p99 of a 10-op plan call + get, (c) pipelined
calls/s over 4 devices, and the workers' CPU time per call in (a) (main + pool process,
from ``/proc/<pid>/stat``), which depends much less on the load than wall times do.

Run from the repository root (needs RabbitMQ with the management plugin):

    .venv/bin/python benchmarks/bench_worker_ab.py --base /tmp/base [--calls 50] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_amqp import (  # noqa: E402
    ECHO_PREFIX,
    RawClient,
    make_plan,
    percentiles,
    timed,
)

import producer as fp  # noqa: E402
from tests.integration.broker import RunVhost, WorkerProcess  # noqa: E402

KINDS = ("base", "branch")


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a process so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def workers_cpu_ms(workers: list[WorkerProcess]) -> float:
    """CPU time of the workers' main processes and their pool processes."""
    total = 0.0
    for w in workers:
        assert w.proc is not None
        out = subprocess.run(["pgrep", "-P", str(w.proc.pid)], capture_output=True, text=True)
        total += sum(cpu_ms(pid) for pid in [w.proc.pid, *map(int, out.stdout.split())])
    return total


def pipelined(plan: Any, xs: list[Any], total: int) -> float:
    """Calls per second: ``total`` calls round-robin over the devices, then every get."""
    start = time.perf_counter()
    pending = [plan(xs[i % len(xs)]) for i in range(total)]
    for ptr in pending:
        ptr.get()
    return total / (time.perf_counter() - start)


def raw_pipelined(raw: RawClient, total: int) -> float:
    body = os.urandom(1024)
    start, base = time.perf_counter(), raw.received
    for i in range(total):
        raw.publish(f"{ECHO_PREFIX}e{i % 4}", body, str(i))
    raw.wait_replies(base + total)
    return total / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="checkout of the 'before'")
    parser.add_argument("--calls", type=int, default=50, help="calls per block")
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks")
    args = parser.parse_args()
    vhost = RunVhost(f"ab{os.getpid()}").create()
    root = Path(f"/tmp/fedplan-bench-ab-{os.getpid()}")
    repos = {"base": args.base.resolve(), "branch": REPO}
    ids = {kind: [f"{kind[0]}{i}" for i in range(4)] for kind in KINDS}
    workers = {
        kind: [WorkerProcess(d, root / d, vhost, repo=repos[kind]).start() for d in ids[kind]]
        for kind in KINDS
    }
    echo = [sys.executable, str(REPO / "benchmarks" / "bench_amqp.py"), "--echo", vhost.url]
    echoes = [subprocess.Popen([*echo, f"{ECHO_PREFIX}e{i}"]) for i in range(4)]
    try:
        for w in workers["base"] + workers["branch"]:
            w.wait_ready()
        fleet = fp.connect(vhost.url, timeout=600, producer_id=f"ab{os.getpid()}")
        raw = RawClient(vhost.url)
        time.sleep(1.0)  # echo consumers up
        setup = {}
        for kind in KINDS:
            plan = make_plan(10, 256)  # one plan per kind: a plan is sent once per device
            xs = [fp.send(torch.randn(256), fleet.device(d)) for d in ids[kind]]
            for x in xs:
                plan(x).get()
            setup[kind] = (plan, xs)
        lat: dict[str, list[float]] = {k: [] for k in (*KINDS, "raw")}
        rate: dict[str, list[float]] = {k: [] for k in (*KINDS, "raw")}
        cpu = dict.fromkeys(KINDS, 0.0)
        n = args.calls
        for r in range(args.rounds):
            for kind in KINDS:
                plan, xs = setup[kind]
                before = workers_cpu_ms(workers[kind])
                lat[kind] += timed(lambda p=plan, x=xs[0]: p(x).get(), n, 0)
                cpu[kind] += workers_cpu_ms(workers[kind]) - before
            lat["raw"] += timed(lambda: raw.rpc(f"{ECHO_PREFIX}e0", os.urandom(1024)), n, 0)
            for kind in KINDS:
                rate[kind].append(pipelined(*setup[kind], 4 * n))
            rate["raw"].append(raw_pipelined(raw, 4 * n))
            print(f"round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", flush=True)
        raw.close()
        fleet.close()
    finally:
        for e in echoes:
            e.terminate()
        for w in workers["base"] + workers["branch"]:
            w.stop()
        vhost.delete()
    r50, raw_rate = percentiles(lat["raw"])[0], statistics.median(rate["raw"])
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average at the end:")
    print(Path("/proc/loadavg").read_text().strip())
    print(
        "| workers | (a) p50 / p99 ms | (a) / raw | worker CPU per call | (c) calls/s | (c) / raw |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        p50, p99 = percentiles(lat[kind])
        c = statistics.median(rate[kind])
        print(
            f"| {kind} ({repos[kind]}) | {p50:.2f} / {p99:.2f} | {p50 / r50:.2f}x | "
            f"{cpu[kind] / (n * args.rounds):.2f} ms | {c:.0f} | {c / raw_rate:.2f}x |"
        )
    p50, p99 = percentiles(lat["raw"])
    print(f"| raw pika echo | {p50:.2f} / {p99:.2f} | 1x | - | {raw_rate:.0f} | 1x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
