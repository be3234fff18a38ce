"""Synchronous FedAvg vs FedBuff on digits with 32 heavy-tailed devices: time to 95% accuracy.

The task's data and model (``fedavg_task``: 1437 training / 360 test rows, MLP 64-64-10,
seed 0), split IID over 32 embedded devices (about 45 rows each). Every device runs the
traced training plan; before it runs each ``RunPlan`` it sleeps a delay drawn from a
lognormal distribution (``--median`` seconds, shape ``--sigma``) by its own RNG seeded
with ``(--delay-seed, device index)``: the benchmark-only device wrapper
:class:`SlowInbox`, on the device side (the device thread sleeps; the server does not
know). FedAvg waits for all 32 devices every round; FedBuff keeps ``--concurrency``
training and folds every ``--buffer-size`` updates. Both stop when the server-side test
accuracy reaches ``--target``; the figure is the wall time from the job's start to that
evaluation. The two run alternately, ``--repeats`` times each, with the same delay seeds.

    cd benchmarks && ../.venv/bin/python bench_fedbuff.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fedavg_task import initial_model, load_task, warm_up_sgd

N_DEVICES = 32


class Reached(BaseException):
    """Raised from the evaluation callback once the target accuracy is reached."""


class SlowInbox:
    """An embedded device's inbox whose ``get`` sleeps a lognormal delay before a RunPlan.

    The sleep happens in the device's own thread, before it takes the run lock: the device
    is slow, the others are not held up.
    """

    def __init__(self, inner: Any, rng: random.Random, median: float, sigma: float) -> None:
        self.inner, self.rng, self.mu, self.sigma = inner, rng, float(np.log(median)), sigma
        self.delays: list[float] = []

    def put(self, item: Any) -> None:
        self.inner.put(item)

    def qsize(self) -> int:
        return int(self.inner.qsize())

    def get(self, *args: Any, **kwargs: Any) -> Any:
        item = self.inner.get(*args, **kwargs)
        if isinstance(item, tuple) and _is_run_plan(item[0]):
            delay = self.rng.lognormvariate(self.mu, self.sigma)
            self.delays.append(delay)
            time.sleep(delay)
        return item


def _is_run_plan(data: bytes) -> bool:
    from schemas.wire import decode_command_framed

    return decode_command_framed(data)[0].WhichOneof("body") == "run_plan"


@dataclass
class Trace:
    name: str
    start: float = field(default_factory=time.monotonic)
    points: list[tuple[float, float, int]] = field(default_factory=list)
    updates: int = 0

    def reached(self, target: float) -> float | None:
        return next((t for t, acc, _ in self.points if acc >= target), None)


def run(mode: str, args: argparse.Namespace, delay_seed: int) -> Trace:
    import producer as fp
    from producer.fl.buffered import FedBuff, StalenessPolicy
    from producer.fl.job import FederatedJob
    from producer.fl.participants import PlanParticipant
    from producer.fl.rounds import RoundPolicy
    from producer.fl.strategy import FedAvg
    from producer.fl.training import TrainingSpec, build_training_plan, evaluate

    x_train, y_train, x_test, y_test, _ = load_task()
    parts = np.array_split(np.random.default_rng(0).permutation(len(x_train)), N_DEVICES)
    net = initial_model()
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    warm_up_sgd()
    spec = TrainingSpec(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs)
    plans: dict[int, Any] = {}

    def plan_for(n: int) -> Any:
        if n not in plans:
            plans[n] = build_training_plan(net, spec, n)
        return plans[n]

    fleet = fp.connect(timeout=600)
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(2 * N_DEVICES)
    inboxes = []
    members = []
    try:
        for k, idx in enumerate(parts):
            t = torch.from_numpy(idx)
            dev = fleet.device(
                f"slow-{k}",
                data=[fp.tag(x_train[t], "train", "x"), fp.tag(y_train[t], "train", "y")],
            )
            members.append(PlanParticipant(dev, plan_for, executor=executor, timeout=600))
            embedded = fleet.transport._devices[dev.id]  # the benchmark's device-side wrapper
            inbox = SlowInbox(
                embedded.inbox, random.Random(f"{delay_seed}/{k}"), args.median, args.sigma
            )
            embedded.inbox = inbox
            inboxes.append(inbox)
        scratch = initial_model()
        trace = Trace(mode)

        def evaluate_and_stop(w: dict[str, torch.Tensor]) -> tuple[float, float]:
            loss, acc = evaluate(scratch, w, x_test, y_test)
            trace.points.append((time.monotonic() - trace.start, acc, len(trace.points)))
            if args.verbose:
                print(f"  {mode} {trace.points[-1][0]:7.1f}s acc {acc:.4f}", flush=True)
            if acc >= args.target:
                raise Reached
            return loss, acc

        if mode == "fedavg":
            job = FederatedJob(
                participants=members,
                strategy=FedAvg(),
                evaluate=evaluate_and_stop,
                policy=RoundPolicy(deadline=600.0, quorum=1.0),
            )
        else:
            job = FederatedJob(
                participants=members,
                strategy=FedBuff(
                    buffer_size=args.buffer_size,
                    concurrency=args.concurrency,
                    staleness=StalenessPolicy(exponent=0.5),
                    server_lr=args.server_lr,
                ),
                evaluate=evaluate_and_stop,
                policy=RoundPolicy(deadline=600.0),
            )
        for p in members:  # store the plan before the clock starts, as a warm fleet would
            p.device.send_plan(p.plan, wait=True)
        trace.start = time.monotonic()
        with contextlib.suppress(Reached):
            job.run(weights, args.max_versions if mode == "fedbuff" else args.max_rounds)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        fleet.close()
    trace.updates = sum(len(i.delays) for i in inboxes)
    return trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--median", type=float, default=1.0, help="median device delay (s)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal shape")
    p.add_argument("--buffer-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-rounds", type=int, default=40)
    p.add_argument("--max-versions", type=int, default=400)
    p.add_argument("--verbose", action="store_true", help="print every evaluation")
    p.add_argument("--json", default=None, help="also write the raw traces here")
    args = p.parse_args()
    rows: dict[str, list[float]] = {"fedavg": [], "fedbuff": []}
    raw = []
    for r in range(args.repeats):
        for mode in ("fedavg", "fedbuff"):
            trace = run(mode, args, delay_seed=r)
            t = trace.reached(args.target)
            evals = len(trace.points) - 1
            unit = "rounds" if mode == "fedavg" else "versions"
            print(
                f"repeat {r} {mode}: {'not reached' if t is None else f'{t:.1f}s'} to "
                f"{100 * args.target:.0f}% after {evals} {unit}"
                f", {trace.updates} device updates started",
                flush=True,
            )
            rows[mode].append(float("inf") if t is None else t)
            for level in (0.90, 0.93):
                lt = trace.reached(level)
                print(
                    f"  {mode}: {'not reached' if lt is None else f'{lt:.1f}s'} to "
                    f"{100 * level:.0f}%",
                    flush=True,
                )
            raw.append(
                {"mode": mode, "repeat": r, "points": trace.points, "updates": trace.updates}
            )
    med = {m: statistics.median(v) for m, v in rows.items()}
    print(
        f"median time to {100 * args.target:.0f}%: FedAvg {med['fedavg']:.1f}s, FedBuff "
        f"{med['fedbuff']:.1f}s, speed-up {med['fedavg'] / med['fedbuff']:.2f}x",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": raw}, f)


if __name__ == "__main__":
    main()
