"""fedplan over RabbitMQ + Celery vs raw pika, side by side on the same broker in one run.

(a) p50/p99 latency of a 10-op plan call + get on a 1 KiB tensor vs a raw pika RPC echo
    with the same durability (persistent messages, durable queues, publisher confirms,
    reply published with confirms before the ack);
(b) messages published per call of an n-op plan (n = 1, 10, 100) vs op-by-op remote
    execution, read from the broker's counters (management API);
(c) pipelined plan calls per second from one producer to 4 devices vs a raw pika
    publish -> consume -> reply pipeline over 4 echo consumers;
(d) MB/s moving a 1 MiB and a 256 MiB tensor to a device and back vs raw pika moving the
    same bytes (16 MiB chunks, like fedplan).

Run from the repository root (needs RabbitMQ with the management plugin):

    .venv/bin/python benchmarks/bench_amqp.py [--quick] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pika  # noqa: E402
import torch  # noqa: E402

import producer as fp  # noqa: E402
from broker_config import names  # noqa: E402
from tests.integration.broker import RunVhost, WorkerProcess  # noqa: E402

MIB = 1024 * 1024
CHUNK = 16 * MIB
ECHO_PREFIX = "bench.echo."


# -- the raw pika side ---------------------------------------------------------------------


def echo_server(url: str, queue: str) -> None:
    """Consume ``queue``; publish each body back to ``reply_to`` with confirms, then ack."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue, durable=True)
    ch.basic_qos(prefetch_count=1)

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        ch.basic_publish(
            "",
            props.reply_to,
            body,
            pika.BasicProperties(correlation_id=props.correlation_id, delivery_mode=2),
        )
        ch.basic_ack(method.delivery_tag)

    ch.basic_consume(queue, on_message)
    ch.start_consuming()


class RawClient:
    """Publishes persistent messages with confirms; collects replies from a durable queue."""

    def __init__(self, url: str) -> None:
        params = pika.URLParameters(url)
        params.heartbeat = 0  # idle between measurements; no I/O loop to answer heartbeats
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.reply_queue = f"bench.replies.{os.getpid()}"
        self.ch.queue_declare(self.reply_queue, durable=True)
        self.received = 0
        self.ch.basic_consume(self.reply_queue, self._on_reply)

    def _on_reply(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.received += 1
        ch.basic_ack(method.delivery_tag)

    def publish(self, queue: str, body: bytes, cid: str) -> None:
        props = pika.BasicProperties(delivery_mode=2, correlation_id=cid, reply_to=self.reply_queue)
        self.ch.basic_publish("", queue, body, props, mandatory=True)

    def wait_replies(self, count: int) -> None:
        while self.received < count:
            self.conn.process_data_events(time_limit=0.01)

    def rpc(self, queue: str, body: bytes) -> None:
        target = self.received + 1
        self.publish(queue, body, str(target))
        self.wait_replies(target)

    def close(self) -> None:
        self.ch.queue_delete(self.reply_queue)
        self.conn.close()


# -- measurements --------------------------------------------------------------------------


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return statistics.median(ordered), p99


def timed(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def make_plan(n_ops: int, size: int) -> Any:
    """A plan of exactly ``n_ops`` elementwise ops on a ``size``-element float tensor."""

    def chain(x: torch.Tensor) -> torch.Tensor:
        for i in range(n_ops):
            x = x * 1.0001 if i % 2 == 0 else x + 0.5
        return x

    chain.__name__ = f"chain{n_ops}"
    return fp.func2plan(args_shape=[(size,)])(chain)


def published(vhost: RunVhost) -> int:
    """fedplan messages published so far (commands + replies), once the counters settle.

    Read from the commands and results exchanges' ``publish_in`` counters: Celery's own
    event messages (worker heartbeats) go elsewhere and are not counted.
    """
    paths = [
        f"exchanges/{vhost.client.vq()}/{vhost.client.q(name)}"
        for name in (names.commands_exchange(), names.results_exchange())
    ]
    last, stable_since = -1, time.monotonic()
    while True:
        value = 0
        for path in paths:
            stats = vhost.client.request("GET", path).get("message_stats") or {}
            value += int(stats.get("publish_in", 0))
        if value != last:
            last, stable_since = value, time.monotonic()
        elif time.monotonic() - stable_since > 6.0:  # stats are emitted every 5 s
            return value
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echo", nargs=2, metavar=("URL", "QUEUE"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=None, help="write a Markdown table here")
    args = parser.parse_args()
    if args.echo:
        echo_server(*args.echo)
        return 0

    reps = 50 if args.quick else 300
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up workers and vhost
    vhost = RunVhost(f"bench{os.getpid()}").create()
    root = Path(f"/tmp/fedplan-bench-{os.getpid()}")
    devices = [f"d{i}" for i in range(4)]
    workers = [WorkerProcess(d, root / d, vhost).start() for d in devices]
    echoes = [
        subprocess.Popen([sys.executable, __file__, "--echo", vhost.url, ECHO_PREFIX + d])
        for d in devices
    ]
    rows: list[tuple[str, str, str]] = []
    try:
        for w in workers:
            w.wait_ready()
        fleet = fp.connect(vhost.url, timeout=600, producer_id=f"bench{os.getpid()}")
        devs = [fleet.device(d) for d in devices]
        raw = RawClient(vhost.url)
        time.sleep(1.0)  # echo consumers up

        # (a) latency
        plan10 = make_plan(10, 256)
        x_ptrs = [fp.send(torch.randn(256), dev) for dev in devs]  # 256 float32 = 1 KiB
        lat = timed(lambda: plan10(x_ptrs[0]).get(), reps, 10)
        raw_lat = timed(lambda: raw.rpc(ECHO_PREFIX + "d0", os.urandom(1024)), reps, 10)
        (p50, p99), (r50, r99) = percentiles(lat), percentiles(raw_lat)
        rows.append(
            (
                "(a) 10-op plan call + get, 1 KiB: p50 / p99 ms",
                f"{p50:.2f} / {p99:.2f}",
                f"{r50:.2f} / {r99:.2f} (RPC echo)",
            )
        )
        print(rows[-1], flush=True)

        # (b) messages per call
        calls = 10
        for n in (1, 10, 100):
            plan = make_plan(n, 256)
            plan(x_ptrs[1]).get()  # build + send once, outside the count
            before = published(vhost)
            for _ in range(calls):
                plan(x_ptrs[1]).get()
            per_plan = (published(vhost) - before) / calls
            before = published(vhost)
            for _ in range(calls):
                y = x_ptrs[1]
                for i in range(n):
                    y = y * 1.0001 if i % 2 == 0 else y + 0.5
                y.get()
            per_op = (published(vhost) - before) / calls
            rows.append(
                (
                    f"(b) messages per call, {n}-op plan vs op by op",
                    f"{per_plan:.1f}",
                    f"{per_op:.1f} (op-by-op remote)",
                )
            )
            print(rows[-1], flush=True)

        # (c) pipelined throughput, 4 devices
        total = reps * 4
        plan10(x_ptrs[2]).get()
        for p in x_ptrs:
            plan10(p).get()
        start = time.perf_counter()
        pending = [plan10(x_ptrs[i % 4]) for i in range(total)]
        for ptr in pending:
            ptr.get()
        fp_rate = total / (time.perf_counter() - start)
        body = os.urandom(1024)
        start = time.perf_counter()
        base = raw.received
        for i in range(total):
            raw.publish(ECHO_PREFIX + devices[i % 4], body, str(i))
        raw.wait_replies(base + total)
        raw_rate = total / (time.perf_counter() - start)
        rows.append(
            (
                "(c) pipelined calls/s, 1 producer -> 4 devices",
                f"{fp_rate:.0f}",
                f"{raw_rate:.0f} (publish->consume->reply)",
            )
        )
        print(rows[-1], flush=True)

        # (d) bandwidth
        for size, n in ((MIB, 10), (256 * MIB, 1)):
            t = torch.randn(size // 4)
            start = time.perf_counter()
            for _ in range(n):
                back = fp.send(t, devs[3]).get()
            fp_mbs = 2 * size * n / MIB / (time.perf_counter() - start)
            assert torch.equal(back, t)
            data = t.numpy().tobytes()
            start = time.perf_counter()
            for _ in range(n):
                pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
                base = raw.received
                for j, piece in enumerate(pieces):
                    raw.publish(ECHO_PREFIX + "d3", piece, str(j))
                raw.wait_replies(base + len(pieces))
            raw_mbs = 2 * size * n / MIB / (time.perf_counter() - start)
            label = f"{size // MIB} MiB"
            rows.append(
                (
                    f"(d) MB/s to a device and back, {label}",
                    f"{fp_mbs:.0f}",
                    f"{raw_mbs:.0f} (same bytes, 16 MiB chunks)",
                )
            )
            print(rows[-1], flush=True)
        raw.close()
        fleet.close()
    finally:
        for e in echoes:
            e.terminate()
        for w in workers:
            w.stop()
        vhost.delete()
    table = format_results(rows, quick=args.quick)
    print(table)
    if args.out:
        write_section(Path(args.out), table)
    return 0


START, END = "<!-- bench_amqp:start -->", "<!-- bench_amqp:end -->"


def write_section(path: Path, table: str) -> None:
    """Put ``table`` between this benchmark's markers in ``path``, keeping other sections."""
    block = f"{START}\n{table}\n{END}"
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = block + "\n\n" + text if text else block + "\n"
    path.write_text(text)


def format_results(rows: list[tuple[str, str, str]], *, quick: bool) -> str:
    lines = [
        "## fedplan over RabbitMQ + Celery vs raw pika (issue 3)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_amqp.py{' --quick' if quick else ''}"
        " --out benchmarks/RESULTS.md`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}; RabbitMQ on 127.0.0.1; "
        "4 Celery workers (prefork, concurrency 1) and 4 raw pika echo consumers running "
        f"at once, all on the same machine; load average {os.getloadavg()[0]:.1f} at the end "
        "(other jobs share the 2 CPUs: wall times are noisy; message counts are exact).",
        "",
        "| measurement | fedplan plan (Celery worker) | baseline |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
