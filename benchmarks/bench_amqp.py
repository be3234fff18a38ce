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

``--huge MIB`` runs instead one round trip of a MIB MiB float32 tensor (e.g. 3072: 3 GiB) to
a device and back, checks it comes back equal (``torch.equal``) and reports MB/s and the peak
RSS of the producer and of the worker (main + pool process). It runs in a vhost of its own
(deleted at the end, on failure too) with the limits a tensor that size needs raised for
that run only: ``FEDPLAN_MAX_COMMAND_SIZE``, ``FEDPLAN_MAX_PENDING_CHUNK_BYTES``,
``FEDPLAN_MAX_REPLY_SIZE`` (device and producer), the device store's
``FEDPLAN_STORE_MAX_BYTES`` and ``FEDPLAN_STORE_MAX_REPLY_BYTES`` (``get()`` deletes the
object, so its reply is cached for a redelivery) and the confirm timeout.

Run from the repository root (needs RabbitMQ with the management plugin):

    .venv/bin/python benchmarks/bench_amqp.py [--quick] [--parts abcd] [--out benchmarks/RESULTS.md]
    .venv/bin/python benchmarks/bench_amqp.py --huge 3072
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
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
    parser.add_argument("--parts", default="abcd", help="which measurements (default abcd)")
    parser.add_argument("--huge", type=int, metavar="MIB", help="one round trip of MIB MiB")
    args = parser.parse_args()
    if args.echo:
        echo_server(*args.echo)
        return 0
    if args.huge:
        print(huge_round_trip(args.huge))
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

        plan10 = make_plan(10, 256)
        x_ptrs = [fp.send(torch.randn(256), dev) for dev in devs]  # 256 float32 = 1 KiB
        if "a" in args.parts:
            measure_latency(rows, plan10, x_ptrs, raw, reps)
        if "b" in args.parts:
            measure_messages(rows, vhost, x_ptrs)
        if "c" in args.parts:
            measure_pipelined(rows, plan10, x_ptrs, raw, reps, devices)
        if "d" in args.parts:
            measure_bandwidth(rows, devs, raw)
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


def measure_latency(
    rows: list[tuple[str, str, str]], plan10: Any, x_ptrs: list[Any], raw: RawClient, reps: int
) -> None:
    """(a) p50/p99 of a 10-op plan call + get against a raw pika RPC echo."""
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


def measure_messages(rows: list[tuple[str, str, str]], vhost: RunVhost, x_ptrs: list[Any]) -> None:
    """(b) messages published per call of an n-op plan vs op-by-op remote execution."""
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


def measure_pipelined(
    rows: list[tuple[str, str, str]],
    plan10: Any,
    x_ptrs: list[Any],
    raw: RawClient,
    reps: int,
    devices: list[str],
) -> None:
    """(c) pipelined plan calls/s from one producer to 4 devices vs a raw pika pipeline."""
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


def measure_bandwidth(rows: list[tuple[str, str, str]], devs: list[Any], raw: RawClient) -> None:
    """(d) MB/s of a tensor to a device and back vs raw pika moving the same bytes."""
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


def peak_rss_mib(pgid: int) -> float:
    """Peak RSS (VmHWM) summed over the live processes of a process group, in MiB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def huge_round_trip(mib: int) -> str:
    """One ``mib`` MiB float32 tensor to a device and back; limits raised for this run only."""
    size = mib * MIB
    room = size + 64 * MIB  # the tensor and its envelope
    limits = {
        "max_command_size": room,
        "max_pending_chunk_bytes": room,
        "max_reply_size": room,
        "store_max_bytes": 3 * room,
        "store_max_reply_bytes": room,
        "confirm_timeout": 1800.0,
    }
    env = {f"FEDPLAN_{k.upper()}": str(v) for k, v in limits.items()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up the worker and vhost
    vhost = RunVhost(f"benchhuge{os.getpid()}").create()
    root = Path(f"/tmp/fedplan-bench-huge-{os.getpid()}")
    worker = WorkerProcess("huge", root / "huge", vhost, env).start()
    try:
        worker.wait_ready()
        producer = {k: v for k, v in limits.items() if k in ("max_reply_size", "confirm_timeout")}
        fleet = fp.connect(vhost.url, timeout=1800, producer_id=f"huge{os.getpid()}", **producer)
        dev = fleet.device("huge")
        t = torch.randn(size // 4)
        start = time.perf_counter()
        ptr = fp.send(t, dev)
        ptr.wait()
        stored = time.perf_counter()
        back = ptr.get()
        end = time.perf_counter()
        equal = torch.equal(back, t)
        del back
        worker_rss = peak_rss_mib(worker.proc.pid) if worker.proc else float("nan")
        producer_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fleet.close()
    finally:
        worker.stop()
        vhost.delete()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return (
        f"{mib} MiB float32 round trip: equal={equal}, send+store {stored - start:.1f} s, "
        f"get {end - stored:.1f} s, {2 * size / MIB / (end - start):.0f} MB/s; peak RSS "
        f"producer {producer_rss:.0f} MiB, worker (main + pool) {worker_rss:.0f} MiB; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


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
