"""The no-overhead floor: the FedAvg task as a plain single-process PyTorch loop."""

from __future__ import annotations

import torch
from fedavg_task import (
    N_CLIENTS,
    ROUNDS,
    Net,
    Timeline,
    central_eval,
    client_update,
    emit,
    fedavg,
    initial_model,
    load_task,
    task_threads,
    warm_up_sgd,
)


def main() -> None:
    tl = Timeline("plain PyTorch loop (floor)")
    x_train, y_train, x_test, y_test, parts = load_task()
    net = initial_model()
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    scratch, evaluator = Net(), Net()
    threads = task_threads()
    warm_up_sgd()
    tl.mark(*central_eval(evaluator, weights, x_test, y_test))
    for r in range(1, ROUNDS + 1):
        results = []
        for k in range(N_CLIENTS):
            idx = torch.from_numpy(parts[k])
            w_k = client_update(scratch, weights, x_train[idx], y_train[idx], r, k)
            results.append((w_k, len(idx)))
        weights = fedavg(results)
        tl.mark(*central_eval(evaluator, weights, x_test, y_test))
    tl.notes = f"torch intra-op threads {threads}"
    emit(tl.report())


if __name__ == "__main__":
    main()
