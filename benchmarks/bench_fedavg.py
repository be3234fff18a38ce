"""Run the FedAvg digits task on every implementation, side by side, and record the results.

Each implementation runs in a fresh process (launch-to-final counts its start-up), one
after the other on the same machine:

- ``bench_fedavg_floor.py``: a plain single-process PyTorch loop (the no-overhead floor);
- ``bench_fedavg_fedplan.py --transport embedded`` vs Flower's simulation engine;
- ``bench_fedavg_fedplan.py --transport rabbitmq`` (one Celery worker per device) vs
  Flower's deployment engine (SuperLink + SuperNodes on loopback), when available.

Usage::

    .venv/bin/python benchmarks/bench_fedavg.py [--flower-python PATH] [--skip NAME ...]
        [--write benchmarks/RESULTS.md]

Flower needs protobuf < 7 while fedplan needs protobuf 7, so Flower runs from its own venv
(``--flower-python``; see benchmarks/README.md), reusing this venv's torch 2.13.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- fedavg-digits:begin -->", "<!-- fedavg-digits:end -->"
EXPECTED = (0.8944, 0.9335)


def run_one(name: str, argv: list[str], timeout: float) -> dict[str, object]:
    """Run one implementation; its last ``BENCH-RESULT`` line is the result."""
    print(f"== {name}: {' '.join(argv)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        argv,
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runners clean up their workers on SIGTERM
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return {"name": name, "error": f"timed out after {timeout:.0f}s"}
    proc_out = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    proc = proc_out  # type: ignore[assignment]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        return {"name": name, "error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, object] = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    acc, loss = float(result["final_accuracy"]), float(result["final_loss"])  # type: ignore[arg-type]
    result["same_model"] = abs(acc - EXPECTED[0]) < 5e-4 and abs(loss - EXPECTED[1]) < 5e-4
    print(f"   {json.dumps(result)}", flush=True)
    return result


def _ms(value: object) -> str:
    return "—" if value is None else f"{1000 * float(value):.0f} ms"  # type: ignore[arg-type]


def _s(value: object) -> str:
    return "—" if value is None else f"{float(value):.2f} s"  # type: ignore[arg-type]


def table(results: list[dict[str, object]]) -> str:
    """A markdown table of the results."""
    head = (
        "| implementation | round (warm median) | round 1 | 20 rounds | launch to final "
        "| peak RSS (process tree) | final accuracy / loss |\n"
        "|---|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | failed: {str(r['error']).splitlines()[0]} ||||||")
            continue
        ok = "" if r.get("same_model") else " (**differs from the task's 0.8944 / 0.9335**)"
        rows.append(
            f"| {r['name']} | {_ms(r['round_warm_median_s'])} | {_ms(r['round_first_s'])} "
            f"| {_s(r['rounds_total_s'])} | {_s(r['launch_to_final_s'])} "
            f"| {float(r['peak_rss_tree_mib']):.0f} MiB "  # type: ignore[arg-type]
            f"| {float(r['final_accuracy']):.4f} / {float(r['final_loss']):.4f}{ok} |"  # type: ignore[arg-type]
        )
    return head + "\n".join(rows) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace the FedAvg section of RESULTS.md (between its markers), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        _, after = rest.split(END, 1)
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo_flower = Path(__file__).resolve().parent.parent / ".flwr-venv" / "bin" / "python"
    default_flower = str(repo_flower) if repo_flower.exists() else ""
    parser.add_argument(
        "--flower-python",
        default=os.environ.get("FLOWER_PYTHON", default_flower),
        help="a Python with flwr (default: .flwr-venv, see scripts/flower_venv; empty: no Flower)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="floor, embedded, rabbitmq, flower-sim, flower-deploy",
    )
    parser.add_argument("--write", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per implementation")
    args = parser.parse_args()

    py = sys.executable
    plan: list[tuple[str, str, list[str]]] = [
        ("floor", "plain PyTorch loop (floor)", [py, "bench_fedavg_floor.py"]),
        (
            "embedded",
            "fedplan embedded",
            [py, "bench_fedavg_fedplan.py", "--transport", "embedded"],
        ),
        (
            "flower-sim",
            "Flower simulation engine",
            [args.flower_python, "bench_fedavg_flower.py", "--engine", "simulation"],
        ),
        (
            "rabbitmq",
            "fedplan RabbitMQ + Celery",
            [py, "bench_fedavg_fedplan.py", "--transport", "rabbitmq"],
        ),
        (
            "flower-deploy",
            "Flower deployment engine",
            [args.flower_python, "bench_fedavg_flower.py", "--engine", "deployment"],
        ),
    ]
    results = []
    for key, name, argv in plan:
        if key in args.skip or (key.startswith("flower") and not args.flower_python):
            continue
        results.append(run_one(name, argv, args.timeout))

    flwr_version = ""
    if args.flower_python:
        out = subprocess.run(
            [args.flower_python, "-c", "import flwr; print(flwr.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        flwr_version = out.stdout.strip()
    import torch

    body = (
        "## FedAvg on digits, 8 IID devices, MLP 64-64-10, 20 rounds\n\n"
        "The task of `benchmarks/fedavg_digits_task.md`, run by every implementation in a "
        "fresh process, one after the other, on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}{', flwr ' + flwr_version if flwr_version else ''}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        "Command: `.venv/bin/python benchmarks/bench_fedavg.py` (see benchmarks/README.md).\n\n"
        + table(results)
        + "\nRound = dispatch + local training + aggregation + central evaluation "
        "(`t_r - t_(r-1)`); 20 rounds = `t_20 - t_0`; launch to final = `t_20` minus the "
        "start of the measured process (`/proc/self/stat`); peak RSS sums the process and "
        "all its descendants (workers, Ray, SuperNodes), sampled every 50 ms.\n"
    )
    notes = [f"- {r['name']}: {r['notes']}" for r in results if r.get("notes")]
    if notes:
        body += "\nNotes:\n" + "\n".join(notes) + "\n"
    print(body)
    if args.write:
        write_section(Path(args.write), body)
        print(f"wrote {args.write}")
    return 0 if all("error" not in r and r.get("same_model") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
