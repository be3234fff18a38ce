"""Secure aggregation vs plain FedAvg on the digits demo task, side by side, one run.

For each device count: round time and bytes per device per round (commands the producer
publishes to a device plus the replies it gets back, as encoded on the wire) for plain
FedAvg and for SecAgg+; then test accuracy of secure rounds at ε = 8 and ε = 1 (distributed
discrete Gaussian DP-FedAvg) against non-private. Embedded devices (threads in this process)
unless ``--broker`` (Celery workers on RabbitMQ, spawned by the demo code).

Usage::

    .venv/bin/python benchmarks/bench_secagg_round.py --devices 8 100 --rounds 5 \\
        --accuracy-rounds 20 --out benchmarks/RESULTS.md

Accuracy only, 100 devices, fixed and adaptive clipping (Andrew et al. 2021, the count
summed securely with the updates), a 20-regular graph for speed::

    .venv/bin/python benchmarks/bench_secagg_round.py --devices --accuracy-devices 100 \\
        --accuracy-rounds 15 --accuracy-quantile 0.5 --accuracy-secagg-k 20
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Tap:
    """Bytes of every command published and every reply delivered, by device."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.plans = 0

    def install(self, fleet: Any) -> None:
        from producer.remote.collector import ReplyCollector

        publish = fleet.transport.publish

        from schemas.wire import decode_command

        def counting_publish(device_id: str, data: bytes, *, command_id: str) -> None:
            if decode_command(data).WhichOneof("body") == "store_plan":
                self.plans += len(data)  # sent once per device, not per round
            else:
                self.sent[device_id] += len(data)
            publish(device_id, data, command_id=command_id)

        fleet.transport.publish = counting_publish
        deliver = ReplyCollector._deliver
        tap = self

        def counting_deliver(collector: Any, pending: Any, reply: Any, sender: Any) -> bool:
            tap.received[pending.device_id] += reply.ByteSize()
            return deliver(collector, pending, reply, sender)

        ReplyCollector._deliver = counting_deliver  # type: ignore[method-assign]


def run(devices: int, rounds: int, extra: list[str], broker: str | None) -> dict[str, Any]:
    """One demo job; returns per-round seconds, bytes per device per round, accuracy, ε."""
    from producer.cli.main import build_parser
    from producer.fl.demo import (
        Workers,
        make_job,
        participants,
        plan_hashes,
        prepare,
        spawn_workers,
        training_plans,
    )
    from producer.fl.progress import ProgressBar
    from producer.fl.training import get_weights
    from producer.remote.fleet import connect

    out = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    argv = ["demo", "--devices", str(devices), "--rounds", str(rounds), "--out", str(out),
            "--tensorboard", "off", "--no-device-eval", "--deadline", "600",
            "--timeout", "600", *extra]
    if broker:
        argv += ["--broker", broker]
    args = build_parser().parse_args(argv)
    setup = prepare(args)
    plans = training_plans(setup)
    workers = Workers()
    if broker:
        workers = spawn_workers(setup.shares, out / "devices", broker,
                                plan_hashes(plans, secure=setup.secure))
    fleet = connect(broker, timeout=600) if broker else connect()
    executor = ThreadPoolExecutor(max(4, 2 * devices))
    tap = Tap()
    try:
        members = participants(args, setup, fleet, executor, spawned=bool(broker), plans=plans)
        tap.install(fleet)
        with open(os.devnull, "w") as sink, ProgressBar(rounds, stream=sink) as bar:
            job = make_job(args, setup, members, bar)
            job.checkpoint_dir = None
            result = job.run(get_weights(setup.model), rounds)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        fleet.close()
        workers.stop()
    trained = result.history[1:]
    total = sum(tap.sent.values()) + sum(tap.received.values())
    return {
        "round_s": statistics.median(m.round_seconds for m in trained),
        "bytes_per_device_round": total / devices / max(1, len(trained)),
        "up": sum(tap.received.values()) / devices / max(1, len(trained)),
        "down": sum(tap.sent.values()) / devices / max(1, len(trained)),
        "accuracy": result.history[-1].test_accuracy,
        "epsilon": result.history[-1].epsilon,
        "rounds": len(trained),
        "plan_bytes": tap.plans / devices,
        "clip_norm": result.outcomes[-1].results[0].metrics.get("clip_norm", float("nan"))
        if result.outcomes and result.outcomes[-1].results else float("nan"),
        "clip_norms": [round(o.results[0].metrics.get("clip_norm", 0.0), 3)
                       for o in result.outcomes if o.results],
        "accuracies": [round(m.test_accuracy, 3) for m in trained],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="*", default=[8, 100],
                   help="device counts of the timing rows (none: accuracy only)")
    p.add_argument("--rounds", type=int, default=5, help="rounds timed per configuration")
    p.add_argument("--accuracy-rounds", type=int, default=20)
    p.add_argument("--accuracy-devices", type=int, nargs="*", default=[8])
    p.add_argument("--accuracy-epsilons", type=float, nargs="+", default=[8.0, 1.0])
    p.add_argument("--accuracy-clip", type=float, default=0.5,
                   help="the DP clip norm C (adaptive rows: the initial C)")
    p.add_argument("--accuracy-quantile", type=float, default=None,
                   help="also run adaptive clipping towards this quantile of the update norms")
    p.add_argument("--accuracy-secagg-k", type=int, default=None,
                   help="k of the k-regular graph of the accuracy rows (default: complete)")
    p.add_argument("--accuracy-secure-baseline", action="store_true",
                   help="also run SecAgg+ without DP (the same model as FedAvg up to rounding)")
    p.add_argument("--secagg-k", type=int, default=None,
                   help="k of the k-regular graph for the secure rows (default: complete)")
    p.add_argument("--broker", default=None)
    p.add_argument("--out", default=None, help="append the results to this markdown file")
    a = p.parse_args()
    lines = []
    start = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    where = f"Celery workers on RabbitMQ ({a.broker})" if a.broker else "embedded devices"
    lines.append(f"## Secure aggregation vs plain FedAvg, digits demo task (issue 12), "
                 f"{start} UTC\n")
    command = " ".join(["benchmarks/bench_secagg_round.py", *sys.argv[1:]])
    lines.append(f"Command: `.venv/bin/python {command}`\n")
    lines.append(
        f"`fedplan demo`'s task ({where}): digits, MLP 64-64-10 (4810 weights), 5 local "
        "epochs, IID split; SecAgg+ on the complete graph (t = majority, up to a third may "
        "drop), 16 fractional bits. Bytes are the encoded commands the producer publishes to "
        "a device plus the replies it receives, per device per round (data setup and the plan, "
        "sent once per device, excluded; the plan is listed apart). "
        f"Round time is the median over {a.rounds} rounds. Machine: {platform.platform()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (times are noisy, bytes exact).\n")
    lines.append("| devices | mode | round s | ratio | bytes/device/round (down + up) | ratio "
                 "| plan bytes/device (once) |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|")
    for n in a.devices:
        plain = run(n, a.rounds, [], a.broker)
        k = ["--secagg-k", str(a.secagg_k)] if a.secagg_k else []
        secure = run(n, a.rounds, ["--secagg", *k], a.broker)
        label = f"SecAgg+ (k = {a.secagg_k})" if a.secagg_k else "SecAgg+ (complete graph)"
        for name, r in (("FedAvg", plain), (label, secure)):
            lines.append(
                f"| {n} | {name} | {r['round_s']:.2f} | {r['round_s'] / plain['round_s']:.2f}x |"
                f" {r['bytes_per_device_round']:,.0f} ({r['down']:,.0f} + {r['up']:,.0f}) | "
                f"{r['bytes_per_device_round'] / plain['bytes_per_device_round']:.2f}x | "
                f"{r['plan_bytes']:,.0f} |")
        print("\n".join(lines[-2:]), flush=True)
    if not a.accuracy_devices:
        return finish(lines, a.out)
    accuracy_rows(a, lines)
    finish(lines, a.out)


def accuracy_rows(a: argparse.Namespace, lines: list[str]) -> None:
    """Test accuracy of secure DP-FedAvg at each ε (fixed and adaptive clip) vs non-private."""
    k = ["--secagg-k", str(a.accuracy_secagg_k)] if a.accuracy_secagg_k else []
    graph = f"{a.accuracy_secagg_k}-regular" if a.accuracy_secagg_k else "complete"
    lines.append("")
    lines.append(
        f"Test accuracy after {a.accuracy_rounds} rounds, every device sampled each round "
        f"(q = 1), δ = 1e-5, SecAgg+ on the {graph} graph with distributed discrete Gaussian "
        f"noise; the noise multiplier z is calibrated so that the planned rounds spend the "
        f"budget, and each device's share is calibrated so that min_survivors = n - floor(n/3) "
        f"devices carry z·C (with every device surviving the sum carries sqrt(n / "
        f"min_survivors) = 1.22x that). Fixed clip C = {a.accuracy_clip}; adaptive rows start "
        f"from it and follow quantile {a.accuracy_quantile} with learning rate 0.2 (Andrew et "
        f"al. 2021), the count summed securely with the updates, count noise sigma_b = n/20, "
        f"or z if larger. "
        f"Started {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, load average "
        f"{_loadavg()}.\n")
    command = " ".join(["benchmarks/bench_secagg_round.py", *sys.argv[1:]])
    lines.append(f"Command: `.venv/bin/python {command}`\n")
    lines.append("| devices | mode | test accuracy | ε spent | final C |")
    lines.append("|---:|---|---:|---:|---:|")
    clip = ["--dp-clip", str(a.accuracy_clip)]
    cases = [("FedAvg, non-private", [])]
    if a.accuracy_secure_baseline:
        cases.append(("SecAgg+, non-private", ["--secagg", *k]))
    for eps in a.accuracy_epsilons:
        dp = ["--secagg", *k, "--dp-epsilon", str(eps), *clip]
        cases.append((f"SecAgg+ + DP, ε = {eps:g}, fixed C", dp))
        if a.accuracy_quantile is not None:
            cases.append((f"SecAgg+ + DP, ε = {eps:g}, adaptive C",
                          [*dp, "--adaptive-clip", str(a.accuracy_quantile)]))
    for n in a.accuracy_devices:
        for name, flags in cases:
            r = run(n, a.accuracy_rounds, flags, a.broker)
            eps = f"{r['epsilon']:.3g}" if r["epsilon"] == r["epsilon"] else "∞"
            final = f"{r['clip_norm']:.3f}" if r["clip_norm"] == r["clip_norm"] else (
                f"{a.accuracy_clip:g}" if "--dp-epsilon" in flags else "-")
            lines.append(f"| {n} | {name} | {100 * r['accuracy']:.2f}% | {eps} | {final} |")
            print(lines[-1], f"(load {_loadavg()}) accuracy by round {r['accuracies']}, "
                  f"C by round {r['clip_norms']}", flush=True)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def finish(lines: list[str], out: str | None) -> None:
    """Print the section and append it to ``out``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
