"""The FedAvg task as a Flower app: ClientApp and ServerApp (importable by Ray workers)."""

from __future__ import annotations

import functools
import json
import os
import time

import torch
from fedavg_task import (
    N_CLIENTS,
    ROUNDS,
    Net,
    Timeline,
    central_eval,
    client_update,
    initial_model,
    load_task,
    warm_up_sgd,
)
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

MARKS_ENV = "FEDAVG_BENCH_MARKS"
"""File the ServerApp appends ``t_r`` marks to (deployment: it runs in another process)."""


@functools.cache
def _task() -> tuple:  # type: ignore[type-arg]
    warm_up_sgd()
    return load_task()


@functools.cache
def _scratch() -> Net:
    return Net()


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Client k, round r: load the global weights, one epoch of SGD, reply (weights, n_k)."""
    x_train, y_train, _, _, parts = _task()
    k = int(context.node_config["partition-id"])
    r = int(msg.content["config"]["server-round"])
    idx = torch.from_numpy(parts[k])
    weights = msg.content["arrays"].to_torch_state_dict()
    new = client_update(_scratch(), weights, x_train[idx], y_train[idx], r, k)
    content = RecordDict(
        {"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": len(idx)})}
    )
    return Message(content=content, reply_to=msg)


server_app = ServerApp()
_timeline: list[Timeline] = []


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over all 8 clients every round, central evaluation before and after each."""
    _, _, x_test, y_test, _ = _task()
    evaluator = Net()
    marks_path = os.environ.get(MARKS_ENV) or context.run_config.get("marks", "")

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc, loss = central_eval(evaluator, arrays.to_torch_state_dict(), x_test, y_test)
        if _timeline:
            _timeline[0].mark(acc, loss)
        if marks_path:
            with open(str(marks_path), "a") as f:
                f.write(json.dumps({"t": time.time(), "acc": acc, "loss": loss}) + "\n")
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=N_CLIENTS,
        min_available_nodes=N_CLIENTS,
    )
    initial = {k: v.detach().clone() for k, v in initial_model().state_dict().items()}
    strategy.start(
        grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=ROUNDS, evaluate_fn=evaluate
    )
