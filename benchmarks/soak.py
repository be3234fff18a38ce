"""Soak: RSS growth of a device worker's main process and of the producer over N plan calls.

One real Celery worker (prefork, concurrency 1) on RabbitMQ in a vhost of its own, driven by
the public API (``plan_ptr(x_ptr)`` then ``.get()``, two commands per call). The RSS of the
worker's main process, of its pool process and of this (producer) process is read from
``/proc`` after a warm-up and then every ``--every`` calls; the growth is measured from the
warm-up sample to the last one (goal: < 5% over 100,000 calls, issue 10 item 4).

Run from the repository root (needs RabbitMQ with the management plugin):

    .venv/bin/python benchmarks/soak.py --calls 20000 [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import producer as fp  # noqa: E402
from tests.integration.broker import RunVhost, WorkerProcess  # noqa: E402

START, END = "<!-- soak:start -->", "<!-- soak:end -->"


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@fp.func2plan(args_shape=[(-1,)])
def double_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.abs(x + x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--every", type=int, default=2_000)
    parser.add_argument("--out", default=None, help="write a Markdown section here")
    args = parser.parse_args()

    vhost = RunVhost(secrets.token_hex(4)).create()
    root = Path(tempfile.mkdtemp(prefix="fedplan-soak-"))
    worker = WorkerProcess("soak", root / "soak", vhost).start()
    samples: list[tuple[int, int, int, int]] = []  # calls, main, pool, producer
    started = time.monotonic()
    try:
        with fp.connect(vhost.url, producer_id=f"soak{secrets.token_hex(3)}") as fleet:
            dev = fleet.device("soak")
            worker.wait_ready()
            assert worker.proc is not None
            x_ptr = fp.send(torch.tensor([1.0, -2.0, 3.0]), dev)
            plan_ptr = double_abs.send(dev)
            expect = torch.tensor([2.0, 4.0, 6.0])
            for i in range(1, args.calls + 1):
                got = plan_ptr(x_ptr).get()
                if i == 1:
                    assert torch.equal(got, expect), got
                if i == args.warmup or (i > args.warmup and i % args.every == 0):
                    gc.collect()
                    pool = children(worker.proc.pid)
                    samples.append(
                        (
                            i,
                            rss_kib(worker.proc.pid),
                            rss_kib(pool[0]) if pool else 0,
                            rss_kib(os.getpid()),
                        )
                    )
                    c, m, p, prod = samples[-1]
                    print(f"{c:>7} calls: main {m} KiB, pool {p} KiB, producer {prod} KiB")
    finally:
        worker.stop()
        vhost.delete()
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    section = format_section(samples, args, elapsed)
    print(section)
    if args.out:
        write_section(Path(args.out), section)
    return 0


def _growth(first: int, last: int) -> str:
    return f"{first} -> {last} KiB ({100.0 * (last - first) / first:+.1f}%)" if first else "-"


def format_section(
    samples: list[tuple[int, int, int, int]], args: argparse.Namespace, elapsed: float
) -> str:
    first, last = samples[0], samples[-1]
    calls = last[0] - first[0]
    load = os.getloadavg()[0]
    lines = [
        START,
        "## Soak: worker and producer RSS over many calls (issue 10, item 4)",
        "",
        f"Command: `.venv/bin/python benchmarks/soak.py --calls {args.calls}"
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}; one Celery worker "
        f"(prefork, concurrency 1), RabbitMQ on 127.0.0.1; {args.calls} calls of a plan "
        f"(`plan_ptr(x_ptr).get()`, two commands each) in {elapsed:.0f} s; load average "
        f"{load:.1f} at the end.",
        "",
        f"| process | RSS after {first[0]} calls -> after {last[0]} calls ({calls} calls) |",
        "|---|---|",
        f"| worker main process | {_growth(first[1], last[1])} |",
        f"| worker pool process | {_growth(first[2], last[2])} |",
        f"| producer | {_growth(first[3], last[3])} |",
        "",
        "Samples (calls: main / pool / producer KiB): "
        + "; ".join(f"{c}: {m} / {p} / {prod}" for c, m, p, prod in samples),
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
