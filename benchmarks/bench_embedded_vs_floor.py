"""Embedded fedplan round vs the plain PyTorch loop, interleaved round by round in one process.

On a shared machine two benchmark processes run minutes apart see different loads; here
every embedded FedAvg round (8 embedded devices, the task's training plan, FedAvg, server
evaluation) is followed by the same round as the plain loop (``bench_fedavg_floor.py``'s
code), both from the same global weights, both with ``FEDAVG_TORCH_THREADS`` intra-op
threads (default 1), so both see the same load. Reports the median of the per-pair ratios,
wall time and this process's CPU time (all threads), after ``--warm`` pairs.

The embedded round is ``FederatedJob.run(weights, 1)``: it evaluates the weights it starts
from as well (round 0), one evaluation of the 360 test rows more than the loop's round.

Usage::

    .venv/bin/python benchmarks/bench_embedded_vs_floor.py --pairs 200
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fedavg_task import (
    BATCH,
    LR,
    N_CLIENTS,
    Net,
    central_eval,
    client_update,
    fedavg,
    initial_model,
    load_task,
    task_threads,
    warm_up_sgd,
)

Weights = dict[str, torch.Tensor]


def timed(fn: Callable[[], Weights]) -> tuple[Weights, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--warm", type=int, default=5, help="pairs left out at the start")
    args = p.parse_args()
    threads = task_threads()
    warm_up_sgd()

    import producer as fp
    from producer.fl.job import FederatedJob
    from producer.fl.participants import PlanParticipant
    from producer.fl.rounds import RoundPolicy
    from producer.fl.strategy import FedAvg
    from producer.fl.training import TrainingSpec, build_training_plan

    x_train, y_train, x_test, y_test, parts = load_task()
    net = initial_model()
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    plan = build_training_plan(net, TrainingSpec(lr=LR, batch_size=BATCH, epochs=1))
    scratch, evaluator = Net(), Net()
    shards = [(x_train[torch.from_numpy(q)], y_train[torch.from_numpy(q)]) for q in parts]
    fleet = fp.connect()
    executor = ThreadPoolExecutor(2 * N_CLIENTS)
    try:
        members = []
        for k, (x, y) in enumerate(shards):
            data = [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")]
            device = fleet.device(f"client-{k}", data=data)
            members.append(PlanParticipant(device, lambda n: plan, executor=executor))

        def evaluate(w: Weights) -> tuple[float, float]:
            acc, loss = central_eval(evaluator, w, x_test, y_test)
            return loss, acc

        def embedded_round(w: Weights, r: int) -> Weights:
            job = FederatedJob(
                participants=members,
                strategy=FedAvg(),
                evaluate=evaluate,
                policy=RoundPolicy(deadline=120.0, quorum=1.0),
                seed=r,
            )
            return job.run(w, 1).weights

        def floor_round(w: Weights, r: int) -> Weights:
            results = [
                (client_update(scratch, w, x, y, r, k), len(x)) for k, (x, y) in enumerate(shards)
            ]
            new = fedavg(results)
            central_eval(evaluator, new, x_test, y_test)
            return new

        rows: list[tuple[float, float, float, float]] = []
        w_e, w_f = start, start
        for r in range(1, args.pairs + 1):
            w_e, e_wall, e_cpu = timed(functools.partial(embedded_round, w_e, r))
            w_f, f_wall, f_cpu = timed(functools.partial(floor_round, w_f, r))
            if r > args.warm:
                rows.append((e_wall, f_wall, e_cpu, f_cpu))
    finally:
        executor.shutdown(wait=False)
        fleet.close()

    def med(i: int) -> float:
        return statistics.median(row[i] for row in rows)

    report: dict[str, Any] = {
        "pairs": len(rows),
        "torch_threads": threads,
        "embedded_wall_ms": round(1000 * med(0), 2),
        "floor_wall_ms": round(1000 * med(1), 2),
        "embedded_cpu_ms": round(1000 * med(2), 2),
        "floor_cpu_ms": round(1000 * med(3), 2),
        "ratio_wall_median_of_pairs": round(statistics.median(e / f for e, f, _, _ in rows), 3),
        "ratio_cpu_median_of_pairs": round(statistics.median(e / f for _, _, e, f in rows), 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
