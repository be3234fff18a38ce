"""FedAvg, FedProx and FedAdam on non-IID digits: Dirichlet(alpha) label skew, 8 devices.

An accuracy comparison, not a speed one: each (split, strategy) trains the task's MLP
(64-64-10, ``fedavg_task.initial_model``) for ``--rounds`` rounds on embedded devices, one
traced training plan per device, every device every round, and reports the server-side test
accuracy after the last round, the best one, and the first round that reached 90%.

Training rows are split by ``producer.fl.data.dirichlet_partition(y_train, 8, alpha,
seed=0, min_size=2)`` (``alpha=inf`` means the task's IID split); the test set (360 rows) is
evaluated on the server. Local training: SGD(lr) at batch 32 for ``--epochs`` epochs with
the per-round sample order ``randperm(n_k, Generator().manual_seed(1000 * r + k))``.

Run: ``.venv/bin/python benchmarks/bench_fedavg_noniid.py`` (prints a Markdown table and
one JSON line per run).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from fedavg_task import N_CLIENTS, Net, central_eval, initial_model, load_task


def split(y_train: torch.Tensor, alpha: float) -> list[np.ndarray]:
    """Row indices per device: Dirichlet(alpha), or the task's IID split for ``inf``."""
    from producer.fl.data import dirichlet_partition, iid_partition

    if math.isinf(alpha):
        return iid_partition(len(y_train), N_CLIENTS, seed=0)
    return dirichlet_partition(y_train, N_CLIENTS, alpha=alpha, seed=0, min_size=2)


def run(alpha: float, strategy: str, args: argparse.Namespace) -> dict[str, object]:
    """One federated run; returns its accuracy summary."""
    import producer as fp
    from producer.fl.job import FederatedJob
    from producer.fl.participants import PlanParticipant
    from producer.fl.rounds import RoundPolicy
    from producer.fl.strategy import make_strategy
    from producer.fl.training import TrainingSpec, build_training_plan, get_weights

    x_train, y_train, x_test, y_test, _ = load_task()
    parts = split(y_train, alpha)
    net = initial_model()
    chosen = make_strategy(strategy, proximal_mu=args.mu, server_lr=args.server_lr)
    spec = TrainingSpec(
        lr=args.lr, batch_size=32, epochs=args.epochs, proximal_mu=chosen.proximal_mu
    )
    plan = build_training_plan(net, spec)  # one loop plan serves every device

    def plan_for(n: int) -> object:
        return plan

    evaluator = Net()
    start = time.monotonic()
    executor = ThreadPoolExecutor(2 * N_CLIENTS)
    with fp.connect() as fleet:
        members = []
        for k, rows in enumerate(parts):
            idx = torch.from_numpy(np.asarray(rows))
            data = [fp.tag(x_train[idx], "train", "x"), fp.tag(y_train[idx], "train", "y")]
            device = fleet.device(f"client-{k}", data=data)
            members.append(
                PlanParticipant(device, plan_for, epochs=args.epochs, executor=executor)
            )
        job = FederatedJob(
            participants=members,
            strategy=chosen,
            evaluate=lambda w: central_eval(evaluator, w, x_test, y_test)[::-1],
            policy=RoundPolicy(deadline=300.0, quorum=1.0),
        )
        result = job.run(get_weights(net), args.rounds)
    executor.shutdown()
    accs = [m.test_accuracy for m in result.history]
    reached = next((m.round for m in result.history if m.test_accuracy >= 0.9), None)
    return {
        "alpha": alpha,
        "strategy": strategy,
        "sizes": [len(p) for p in parts],
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
        "rounds_to_90": reached,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, math.inf])
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedadam"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--mu", type=float, default=0.1, help="FedProx proximal strength")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam server step")
    args = p.parse_args()
    rows = []
    for alpha in args.alphas:
        for strategy in args.strategies:
            row = run(alpha, strategy, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{args.rounds} rounds, lr {args.lr}, {args.epochs} local epoch(s), batch 32, "
          f"FedProx mu {args.mu}, FedAdam server lr {args.server_lr}\n")  # fmt: skip
    print("| split | strategy | device sizes | accuracy after last round | best | rounds to 90% |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = "IID" if math.isinf(float(r["alpha"])) else f"Dirichlet alpha={r['alpha']}"  # type: ignore[arg-type]
        reached = r["rounds_to_90"] if r["rounds_to_90"] is not None else "not reached"
        print(
            f"| {name} | {r['strategy']} | {r['sizes']} | {100 * float(r['final_accuracy']):.2f}% "  # type: ignore[arg-type]
            f"| {100 * float(r['best_accuracy']):.2f}% | {reached} |"  # type: ignore[arg-type]
        )


if __name__ == "__main__":
    main()
