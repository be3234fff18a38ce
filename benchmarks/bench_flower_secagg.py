"""Flower's SecAgg+ against Flower's plain FedAvg on the digits task, 8 and 100 clients.

    .flwr-venv/bin/python benchmarks/bench_flower_secagg.py \\
        [--clients 8 100] [--rounds 20 5] [--json out.json] [--out benchmarks/RESULTS.md]

(``scripts/flower_venv`` makes ``.flwr-venv``.) Every (clients, mode) pair runs in a fresh
process on Flower's simulation engine (Ray, ``num_cpus=1`` per client actor): the task of
``benchmarks/fedavg_digits_task.md`` (model, SGD, batches, sample order, server FedAvg,
central evaluation clock), with the training rows cut into ``n`` IID parts the task's way.
Secure aggregation is Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod``
(``flower_secagg_app.py``). Reported per run: round time (``t_r - t_(r-1)``, median over
warm rounds), bytes each client receives and sends per round (protobuf size of every
message, no framing), final accuracy. The JSON rows use the keys fedplan's secure-
aggregation benchmark can sit next to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench_flower_secagg:start -->", "<!-- bench_flower_secagg:end -->"


def shares_for(n: int) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)``: complete graph for n <= 8; for larger n
    a neighbourhood of 20 plus the client itself and threshold 11, as fedplan's bench."""
    if n <= 8:
        return n, n // 2 + 1
    return 21, 11


def run_one(n: int, mode: str, rounds: int) -> dict[str, Any]:
    """In this process: one Flower simulation, returns its report."""
    sys.path.insert(0, str(HERE))
    counts = Path(tempfile.mkdtemp(prefix="flwr-secagg-")) / "bytes.jsonl"
    shares, threshold = shares_for(n)
    os.environ.update(
        {
            "FLOWER_SECAGG_CLIENTS": str(n),
            "FLOWER_SECAGG_ROUNDS": str(rounds),
            "FLOWER_SECAGG_MODE": mode,
            "FLOWER_SECAGG_SHARES": str(shares),
            "FLOWER_SECAGG_THRESHOLD": str(threshold),
            "FLOWER_SECAGG_BYTES": str(counts),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        }
    )
    import flwr
    from fedavg_task import Timeline
    from flower_secagg_app import client_app, server_app, timeline
    from flwr.simulation import run_simulation

    tl = Timeline(f"Flower {flwr.__version__} {mode}, {n} clients")
    timeline.append(tl)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False},
        },
    )
    report = tl.report()
    rows = [json.loads(line) for line in counts.read_text().splitlines()]
    fit_rounds = len(tl.marks) - 1
    report.update(
        implementation=f"flwr {flwr.__version__} simulation engine",
        mode=mode,
        clients=n,
        num_shares=shares if mode == "secagg" else None,
        reconstruction_threshold=threshold if mode == "secagg" else None,
        messages_per_client_per_round=len(rows) / (n * fit_rounds),
        bytes_received_per_client_per_round=sum(r["received"] for r in rows) / (n * fit_rounds),
        bytes_sent_per_client_per_round=sum(r["sent"] for r in rows) / (n * fit_rounds),
    )
    return report


def _attempt(argv: list[str], timeout: float) -> tuple[int, str]:
    """One run in a session of its own; on timeout the whole process group is killed."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out + f"\n(timed out after {timeout:.0f} s)"


def drive(
    clients: list[int],
    rounds: list[int],
    modes: list[str],
    *,
    keep: list[dict[str, Any]],
    timeout: float,
    attempts: int,
) -> list[dict[str, Any]]:
    """Each run in a fresh process, one after the other; the report is its last line.

    Ray's raylet can die at start on a loaded machine (it times out waiting for its metrics
    agent), which leaves Flower's simulation waiting forever: a run that fails or exceeds
    ``timeout`` is killed and retried, up to ``attempts`` times. Rows in ``keep`` (from an
    earlier ``--json``) are reused instead of run again.
    """
    kept = {(r["clients"], r["mode"], r["rounds"]): r for r in keep if "error" not in r}
    out = []
    for n, r in zip(clients, rounds * len(clients) if len(rounds) == 1 else rounds, strict=True):
        for mode in modes:
            if (n, mode, r) in kept:
                out.append(kept[(n, mode, r)])
                continue
            argv = [sys.executable, __file__, "--one", str(n), mode, "--rounds", str(r)]
            for attempt in range(1, attempts + 1):
                t0 = time.time()
                rc, text = _attempt(argv, timeout)
                lines = [ln for ln in text.splitlines() if ln.startswith("BENCH-RESULT ")]
                if rc == 0 and lines:
                    row = json.loads(lines[-1].split(" ", 1)[1])
                    row["attempt"] = attempt
                    print(f"{n} clients, {mode}: {json.dumps(row)} ({time.time() - t0:.0f} s)")
                    out.append(row)
                    break
                print(f"{n} clients, {mode}, attempt {attempt}: FAILED rc={rc}\n{text[-2000:]}")
            else:
                out.append({"clients": n, "mode": mode, "error": text[-3000:], "rc": rc})
            sys.stdout.flush()
    return out


def markdown(rows: list[dict[str, Any]], argv: str) -> str:
    import flwr  # noqa: F401 - only to fail early outside the Flower venv

    load = os.getloadavg()[0]
    lines = [
        START,
        "## Flower SecAgg+ vs Flower FedAvg on digits, 8 and 100 clients (issue 12, item 6)",
        "",
        f"Command: `{argv}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.platform()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
        f"{load:.1f} at the end (other jobs share the CPUs: times are noisy, bytes are exact). "
        "Flower's simulation engine (Ray, one CPU per client actor), the task of "
        "`benchmarks/fedavg_digits_task.md` with the training rows cut into n IID parts; "
        "SecAgg+ is `SecAggPlusWorkflow` (default clipping range 8, quantization range 2^22, "
        "modulus 2^32, `max_weight` = largest n_k) with `secaggplus_mod` on the clients. "
        "Bytes are the protobuf size of every message a client receives and sends "
        "(`message_to_proto(msg).ByteSize()`, no framing), per client per round.",
        "",
        "| clients | mode | shares / threshold | rounds | round (warm median) | round 1 "
        "| rounds total "
        "| msgs / client / round | bytes received / sent per client per round "
        "| final accuracy / loss |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['clients']} | {r['mode']} | failed (rc {r['rc']}) | | | | | | | |")
            continue
        sh = (
            f"{r['num_shares']} / {r['reconstruction_threshold']}" if r["mode"] == "secagg" else "-"
        )
        lines.append(
            f"| {r['clients']} | {r['mode']} | {sh} | {r['rounds']} "
            f"| {r['round_warm_median_s'] * 1000:.0f} ms "
            f"| {r['round_first_s'] * 1000:.0f} ms | {r['rounds_total_s']:.1f} s "
            f"| {r['messages_per_client_per_round']:.0f} "
            f"| {r['bytes_received_per_client_per_round']:,.0f} / "
            f"{r['bytes_sent_per_client_per_round']:,.0f} "
            f"| {r['final_accuracy']:.4f} / {r['final_loss']:.4f} |"
        )
    by = {(r["clients"], r["mode"]): r for r in rows if "error" not in r}
    ratios = []
    for n in sorted({r["clients"] for r in rows}):
        s, p = by.get((n, "secagg")), by.get((n, "plain"))
        if s and p:
            sent, got = "bytes_sent_per_client_per_round", "bytes_received_per_client_per_round"
            ratios.append(
                f"- {n} clients: SecAgg+ / plain = "
                f"{s['round_warm_median_s'] / p['round_warm_median_s']:.2f}x round time, "
                f"{s[sent] / p[sent]:.2f}x bytes sent, {s[got] / p[got]:.2f}x bytes received "
                "per client per round."
            )
    lines += ["", *ratios, END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--modes", nargs="+", default=["plain", "secagg"])
    parser.add_argument(
        "--rounds", type=int, nargs="+", default=[20], help="one for all, or one per --clients"
    )
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--out", type=Path, help="write a markdown section into this file")
    parser.add_argument("--keep", type=Path, help="reuse the rows of an earlier --json")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per attempt")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        report = run_one(int(args.one[0]), args.one[1], args.rounds[0])
        sys.stdout.flush()
        print("BENCH-RESULT " + json.dumps(report), flush=True)
        return
    keep = json.loads(args.keep.read_text()) if args.keep else []
    rows = drive(
        args.clients,
        args.rounds,
        args.modes,
        keep=keep,
        timeout=args.timeout,
        attempts=args.attempts,
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    argv = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
    section = markdown(rows, argv)
    print(section)
    if args.out:
        write_section(args.out, section)


if __name__ == "__main__":
    cli()
