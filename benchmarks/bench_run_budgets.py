"""What the run budgets cost a plan: the per-op watch and the allocation pre-check.

Usage: ``python benchmarks/bench_run_budgets.py [--repeat N]``. For a plan of 400 ops
(``relu(x @ w)`` repeated) on a small and a larger input, prints the median seconds per call
of a plain run, a run under the per-op watch (``max_alloc_bytes`` and ``max_wall_seconds``
set: :class:`consumer.runtime.budgets.RunBudget`), and the pre-check on meta tensors
(:func:`consumer.runtime.budgets.measure_plan`, paid once per plan and argument shapes; the
device remembers the result), each as a ratio to the plain run, sampled alternately.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumer.runtime.budgets import RunBudget, measure_plan
from consumer.runtime.interpreter import LoadedPlan
from schemas.ir import Op, PlanIR, Ref

STEPS = 200


def _plan() -> PlanIR:
    ops, cur, slot = [], 0, 2
    for _ in range(STEPS):
        ops.append(Op("torch.matmul", (Ref(cur), Ref(1)), {}, Ref(slot)))
        ops.append(Op("torch.relu", (Ref(slot),), {}, Ref(slot + 1)))
        cur, slot = slot + 1, slot + 2
    return PlanIR(
        name="deep", inputs=(Ref(0),), ops=ops, outputs=Ref(cur), num_slots=slot, state={"w": 1}
    )


def _time(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = LoadedPlan(_plan())
    print(f"plan: {2 * STEPS} ops; torch {torch.__version__}; 1 thread; median of {args.repeat}")
    print("| input | plain run | watched run | ratio | pre-check | ratio |")
    print("|---|---|---|---|---|---|")
    for rows, width, number in ((8, 64, 20), (512, 256, 3)):
        x = torch.randn(rows, width)
        state = {"w": torch.randn(width, width) / width**0.5}

        def plain(x: torch.Tensor = x, state: dict[str, torch.Tensor] = state) -> Any:
            return loaded.run((x,), {}, state)

        def watched(x: torch.Tensor = x, state: dict[str, torch.Tensor] = state) -> Any:
            budget = RunBudget(
                limit=1 << 40, deadline=time.monotonic() + 3600, known=[x, state["w"]]
            )
            return loaded.run((x,), {}, state, watch=budget.watch)

        def precheck(x: torch.Tensor = x, state: dict[str, torch.Tensor] = state) -> Any:
            return measure_plan(loaded, (x,), {}, state, ValueError)

        assert torch.equal(plain(), watched())
        assert precheck() == rows * width * 4 * 2  # a matmul result and its relu at once
        samples = [
            (_time(plain, number), _time(watched, number), _time(precheck, number))
            for _ in range(args.repeat)
        ]
        base = statistics.median(p for p, _, _ in samples)
        watch = statistics.median(w for _, w, _ in samples)
        pre = statistics.median(c for _, _, c in samples)
        watch_ratio = statistics.median(w / p for p, w, _ in samples)
        pre_ratio = statistics.median(c / p for p, _, c in samples)
        print(
            f"| {rows}x{width} | {base * 1e3:.2f} ms | {watch * 1e3:.2f} ms | "
            f"{watch_ratio:.2f} | {pre * 1e3:.2f} ms | {pre_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
