"""Example-level DP-SGD plans on the digits task: accuracy at ε = 8 and 1, and plan cost.

    .venv/bin/python benchmarks/bench_dpsgd.py [--rounds 20] [--out benchmarks/RESULTS.md]

The task of ``benchmarks/fedavg_digits_task.md`` (data, 8 IID clients, 64-64-10 MLP from
``torch.manual_seed(0)``, FedAvg weighted by n_k, 20 rounds, central evaluation), with each
client's local epoch replaced by a DP-SGD plan (``producer/fl/dpsgd.py``): Poisson rate
``q = 32 / n_k`` (expected batch 32), ``ceil(n_k / 32)`` steps per round (one epoch in
expectation), clip norm 1, lr 0.5; sigma calibrated with dp-accounting so that every client's
``rounds * steps`` steps spend ε at δ = 1e-5 on its own rows. Plans run in process (called
locally, no transport). Also: the time of one plan call against the eager per-example loop
(``train_dpsgd_eager``) and the task's plain training step, same process, alternating.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fedavg_task import (  # noqa: E402
    central_eval,
    client_update,
    fedavg,
    initial_model,
    load_task,
)

from producer.fl.dpsgd import (  # noqa: E402
    DPSGDSpec,
    build_dpsgd_plan,
    dpsgd_epsilon,
    noise_multiplier_for,
    train_dpsgd_eager,
)
from producer.fl.training import flatten, get_weights, scratch_copy, unflatten  # noqa: E402

START, END = "<!-- bench_dpsgd:start -->", "<!-- bench_dpsgd:end -->"
DELTA, CLIP, LR, BATCH = 1e-5, 1.0, 0.5, 32


def run(epsilon: float | None, rounds: int) -> tuple[float, float, float, float]:
    """``(sigma, epsilon spent, final accuracy, final loss)``; ``epsilon=None``: sigma = 0."""
    x_tr, y_tr, x_te, y_te, parts = load_task()
    net = initial_model()
    sizes = [len(p) for p in parts]
    steps = math.ceil(max(sizes) / BATCH)
    q_max = BATCH / min(sizes)
    sigma = (
        0.0
        if epsilon is None
        else noise_multiplier_for(
            epsilon, delta=DELTA, sampling_rate=q_max, total_steps=rounds * steps
        )
    )
    plans = {}
    for n in set(sizes):
        spec = DPSGDSpec(
            clip_norm=CLIP, noise_multiplier=sigma, sampling_rate=BATCH / n, steps=steps, lr=LR
        )
        plans[n] = build_dpsgd_plan(net, spec, n)
    weights = get_weights(net)
    torch.manual_seed(1234)
    for _ in range(rounds):
        results = []
        for p in parts:
            idx = torch.from_numpy(p)
            out = plans[len(p)](x_tr[idx], y_tr[idx], flatten(weights))
            results.append((unflatten(out, weights), len(p)))
        weights = fedavg(results)
    acc, loss = central_eval(scratch_copy(net), weights, x_te, y_te)
    spent = dpsgd_epsilon(
        DPSGDSpec(clip_norm=CLIP, noise_multiplier=sigma, sampling_rate=q_max, steps=1),
        delta=DELTA,
        total_steps=rounds * steps,
    )
    return sigma, spent, acc, loss


def plain(rounds: int) -> tuple[float, float]:
    x_tr, y_tr, x_te, y_te, parts = load_task()
    net = initial_model()
    weights = get_weights(net)
    for r in range(1, rounds + 1):
        results = []
        for k, p in enumerate(parts):
            idx = torch.from_numpy(p)
            results.append((client_update(net, weights, x_tr[idx], y_tr[idx], r, k), len(p)))
        weights = fedavg(results)
    return central_eval(net, weights, x_te, y_te)


def timing(repeats: int = 15) -> dict[str, float]:
    """Median ms of one client call (n = 180, 6 steps) for the three implementations."""
    x_tr, y_tr, _, _, parts = load_task()
    net = initial_model()
    idx = torch.from_numpy(parts[0])
    x, y = x_tr[idx], y_tr[idx]
    spec = DPSGDSpec(
        clip_norm=CLIP, noise_multiplier=1.0, sampling_rate=BATCH / len(x), steps=6, lr=LR
    )
    plan = build_dpsgd_plan(net, spec, len(x))
    w = get_weights(net)
    flat = flatten(w)
    calls = {
        "dp-sgd plan": lambda: plan(x, y, flat),
        "dp-sgd eager per-example loop": lambda: train_dpsgd_eager(
            scratch_copy(net), spec, w, x, y
        ),
        "plain SGD epoch, eager (the task's client step)": lambda: client_update(
            scratch_copy(net), w, x, y, 1, 0
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for eps in (None, 8.0, 1.0):
        sigma, spent, acc, loss = run(eps, args.rounds)
        label = "no noise (clipping only)" if eps is None else f"ε = {eps:g}"
        rows.append(f"| DP-SGD, {label} | {sigma:.3f} | {spent:.2f} | {acc:.4f} / {loss:.4f} |")
        print(rows[-1], flush=True)
    acc, loss = plain(args.rounds)
    rows.append(f"| plain SGD (the task, non-private) | - | ∞ | {acc:.4f} / {loss:.4f} |")
    t = timing()
    base = t["plain SGD epoch, eager (the task's client step)"]
    lines = [
        START,
        "## Example-level DP-SGD plans on digits (issue 12, item 3)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_dpsgd.py --rounds {args.rounds}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.platform()}, "
        f"{os.cpu_count()} CPUs, one torch thread, load average {os.getloadavg()[0]:.1f}. "
        f"8 IID clients, {args.rounds} FedAvg rounds, each client one expected epoch of "
        f"DP-SGD per round (q = 32/n_k, C = {CLIP}, lr = {LR}); ε at δ = {DELTA:g} per "
        "client's rows (example-level, RDP, dp-accounting).",
        "",
        "| training | sigma | ε spent | final accuracy / loss |",
        "|---|---:|---:|---|",
        *rows,
        "",
        "One client call (n = 180, 6 steps), median of 15, same process, alternating:",
        "",
        "| implementation | ms | x plain epoch |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {v / base:.2f} |" for k, v in t.items()],
        END,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        text = args.out.read_text()
        if START in text:
            head, rest = text.split(START, 1)
            text = head + section.rstrip("\n") + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        args.out.write_text(text)


if __name__ == "__main__":
    main()
