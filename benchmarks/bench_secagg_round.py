"""Secure aggregation vs plain FedAvg on the digits demo task, side by side, one run.

For each device count: round time and bytes per device per round (commands the producer
publishes to a device plus the replies it gets back, as encoded on the wire) for plain
FedAvg and for SecAgg+; then test accuracy of secure rounds at ε = 8 and ε = 1 (distributed
discrete Gaussian DP-FedAvg) against non-private. Embedded devices (threads in this process)
unless ``--broker`` (Celery workers on RabbitMQ, spawned by the demo code).

Usage::

    .venv/bin/python benchmarks/bench_secagg_round.py --devices 8 100 --rounds 5 \\
        --secagg-k auto 0 20 --accuracy-rounds 20 --out benchmarks/RESULTS.md

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


class RoundCpu:
    """CPU seconds of this process (the producer and, embedded, every device thread) spent
    in each ``run_round``: steadier than wall time on a shared machine, since another job's
    load delays a round's wall clock but does not add to this process's CPU time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> RoundCpu:
        from producer.fl.rounds import RoundRunner
        from producer.fl.secure_rounds import SecureRoundRunner

        for cls in (RoundRunner, SecureRoundRunner):
            original = cls.run_round
            self._saved.append((cls, original))
            setattr(cls, "run_round", self._timed(original))  # noqa: B010 - a class patch
        return self

    def _timed(self, original: Any) -> Any:
        def run_round(runner: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return original(runner, *args, **kwargs)
            finally:
                self.seconds.append(time.process_time() - start)

        return run_round

    def __exit__(self, *exc: object) -> None:
        for cls, original in self._saved:
            setattr(cls, "run_round", original)  # noqa: B010
        self.seconds = self.seconds[1:]  # the first round also loads the plans


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
    cpu = RoundCpu()
    executor = ThreadPoolExecutor(max(4, 2 * devices))
    tap = Tap()
    try:
        members = participants(args, setup, fleet, executor, spawned=bool(broker), plans=plans)
        tap.install(fleet)
        with open(os.devnull, "w") as sink, ProgressBar(rounds, stream=sink) as bar, cpu:
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
        "cpu_s": statistics.median(cpu.seconds) if cpu.seconds else float("nan"),
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
    p.add_argument("--secagg-k", type=_degree, nargs="*", default=[None],
                   help="k of the k-regular graph for the secure rows, one row per value "
                   "('auto', the default: SecureAggregation's safe k; 0: the complete graph)")
    p.add_argument("--accuracy-epsilons", type=float, nargs="+", default=[8.0, 1.0])
    p.add_argument("--accuracy-clip", type=float, default=0.5,
                   help="the DP clip norm C (adaptive rows: the initial C)")
    p.add_argument("--accuracy-quantile", type=float, default=None,
                   help="also run adaptive clipping towards this quantile of the update norms")
    p.add_argument("--accuracy-secagg-k", type=int, default=None,
                   help="k of the k-regular graph of the accuracy rows (default: the safe k)")
    p.add_argument("--accuracy-secure-baseline", action="store_true",
                   help="also run SecAgg+ without DP (the same model as FedAvg up to rounding)")
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
        "epochs, IID split; SecAgg+ with t = a majority of the k neighbours, up to a third "
        "may drop, 16 fractional bits; 'P(fail)' is the bound on a round failing when a "
        "random third drops (0: impossible whichever third drops). Bytes are the encoded "
        "commands the producer publishes to a device plus the replies it receives, per device "
        "per round (data setup and the plan, sent once per device, excluded; the plan is "
        "listed apart). "
        f"Round time is the median over {a.rounds} rounds; round CPU is this process's CPU time "
        "per round (producer and embedded devices; not the Celery workers'), median over the "
        f"rounds after the first. Machine: {platform.platform()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (times are noisy, bytes exact).\n")
    lines.append("| devices | mode | round s | ratio | round CPU s | ratio | bytes/device/round "
                 "(down + up) | ratio | plan bytes/device (once) |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in a.devices:
        plain = run(n, a.rounds, [], a.broker)
        rows = [("FedAvg", plain)]
        for k in a.secagg_k:
            flag = [] if k is None else ["--secagg-k", str(k or n - 1)]
            rows.append((secure_label(n, k), run(n, a.rounds, ["--secagg", *flag], a.broker)))
        for name, r in rows:
            lines.append(
                f"| {n} | {name} | {r['round_s']:.2f} | {r['round_s'] / plain['round_s']:.2f}x |"
                f" {r['cpu_s']:.2f} | {r['cpu_s'] / plain['cpu_s']:.2f}x |"
                f" {r['bytes_per_device_round']:,.0f} ({r['down']:,.0f} + {r['up']:,.0f}) | "
                f"{r['bytes_per_device_round'] / plain['bytes_per_device_round']:.2f}x | "
                f"{r['plan_bytes']:,.0f} |")
        print("\n".join(lines[-len(rows):]), flush=True)
    if not a.accuracy_devices:
        return finish(lines, a.out)
    accuracy_rows(a, lines)
    finish(lines, a.out)


def accuracy_rows(a: argparse.Namespace, lines: list[str]) -> None:
    """Test accuracy of secure DP-FedAvg at each ε (fixed and adaptive clip) vs non-private."""
    k = ["--secagg-k", str(a.accuracy_secagg_k)] if a.accuracy_secagg_k else []
    graph = f"{a.accuracy_secagg_k}-regular" if a.accuracy_secagg_k else "default (safe k)"
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


def _degree(value: str) -> int | None:
    return None if value == "auto" else int(value)


def secure_label(n: int, k: int | None) -> str:
    """The secure row's name: k (and whether it is the default), t and P(fail)."""
    from producer.fl.secure_rounds import SecureAggregation

    secure = SecureAggregation(neighbours=k or n - 1 if k is not None else None)
    degree = secure.degree(n)
    graph = "complete" if degree == n - 1 else f"k = {degree}"
    default = ", default" if k is None else ""
    return (f"SecAgg+ ({graph}{default}, t = {secure.threshold(degree)}, "
            f"P(fail) ≤ {secure.dropout_failure_probability(n):.2g})")


def finish(lines: list[str], out: str | None) -> None:
    """Print the section and append it to ``out``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
