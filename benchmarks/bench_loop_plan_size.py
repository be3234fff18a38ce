"""Ops and encoded bytes of the FedAvg digits training plan per local example count.

The task's MLP 64-64-10, batch 32, one epoch (benchmarks/fedavg_digits_task.md). Run it on
this checkout, and on an older one for comparison (the unrolled plan, one per count)::

    .venv/bin/python benchmarks/bench_loop_plan_size.py
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/bench_loop_plan_size.py

Prints one markdown row per example count: ops (set-up + finish + loop body), encoded
bytes (with the model's state), build seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedavg_task import BATCH, LR, Net

from producer.fl.training import TrainingSpec, build_training_plan
from schemas.plan_codec import plan_to_proto


def main() -> None:
    torch.manual_seed(0)
    spec = TrainingSpec(lr=LR, batch_size=BATCH)
    print("| local examples | batches | plan ops | encoded bytes | build |")
    print("|---:|---:|---:|---:|---:|")
    for n in (180, 1000, 4000):
        start = time.perf_counter()
        plan = build_training_plan(Net(), spec, n)
        seconds = time.perf_counter() - start
        ir = plan.ir
        loop = getattr(ir, "loop", None)
        ops = len(ir.ops) + (len(loop.body.ops) if loop is not None else 0)
        size = plan_to_proto(ir, plan_id="p").ByteSize()
        batches = -(-n // BATCH)
        print(f"| {n} | {batches} | {ops} | {size} | {seconds:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
