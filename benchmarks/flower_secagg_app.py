"""The digits FedAvg task as a Flower app with or without SecAgg+ (importable by Ray workers).

Flower's secure aggregation runs on its legacy API: a ``NumPyClient`` behind a ``ClientApp``
with ``secaggplus_mod``, and a ``ServerApp`` running ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))`` over the legacy ``FedAvg`` strategy. Plain FedAvg runs the same
app and workflow without the mod and the SecAgg+ fit workflow, so the two differ only by
secure aggregation. A counting mod, outermost, adds up the protobuf size of every message
a client receives and sends (``message_to_proto(...).ByteSize()``: payload, no gRPC/HTTP
framing) into a JSONL file named by ``FLOWER_SECAGG_BYTES``.

Run configuration comes from environment variables set by ``bench_flower_secagg.py``
(Ray workers inherit them): ``FLOWER_SECAGG_CLIENTS``, ``FLOWER_SECAGG_ROUNDS``,
``FLOWER_SECAGG_MODE`` (``plain`` or ``secagg``), ``FLOWER_SECAGG_SHARES``,
``FLOWER_SECAGG_THRESHOLD``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch
from fedavg_task import Net, Timeline, central_eval, client_update, initial_model, warm_up_sgd
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, Message, ndarrays_to_parameters
from flwr.common.serde import message_to_proto
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

BYTES_ENV = "FLOWER_SECAGG_BYTES"
KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def setting(name: str, default: str) -> str:
    return os.environ.get(f"FLOWER_SECAGG_{name}", default)


N_CLIENTS = int(setting("CLIENTS", "8"))
ROUNDS = int(setting("ROUNDS", "20"))
MODE = setting("MODE", "plain")


@functools.cache
def task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """The task's data and split; the IID partition cut into ``N_CLIENTS`` parts the same way
    (``np.array_split`` of ``default_rng(0).permutation``), identical to the task for 8."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    warm_up_sgd()
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    parts = np.array_split(np.random.default_rng(0).permutation(len(x_tr)), N_CLIENTS)
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        parts,
    )


def max_part() -> int:
    return max(len(p) for p in task()[4])


def to_state(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    pairs = zip(KEYS, arrays, strict=True)
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in pairs}


@functools.cache
def scratch() -> Net:
    return Net()


class DigitsClient(NumPyClient):
    """Client k: one epoch of SGD from the global weights, as the task fixes it."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        x_tr, y_tr, _, _, parts = task()
        idx = torch.from_numpy(parts[self.k])
        r = int(config["server-round"])
        new = client_update(scratch(), to_state(parameters), x_tr[idx], y_tr[idx], r, self.k)
        return [new[k].numpy() for k in KEYS], len(idx), {}


def client_fn(context: Context) -> Any:
    return DigitsClient(int(context.node_config["partition-id"])).to_client()


def count_bytes(msg: Message, context: Context, call_next: Any) -> Message:
    """Outermost mod: protobuf bytes received and sent by this client, per message."""
    reply = call_next(msg, context)
    path = os.environ.get(BYTES_ENV)
    if path:
        row = {
            "node": int(context.node_config["partition-id"]),
            "type": msg.metadata.message_type,
            "received": message_to_proto(msg).ByteSize(),
            "sent": message_to_proto(reply).ByteSize(),
        }
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return reply


client_app = ClientApp(
    client_fn=client_fn,
    mods=[count_bytes, secaggplus_mod] if MODE == "secagg" else [count_bytes],
)

server_app = ServerApp()
timeline: list[Timeline] = []


@server_app.main()
def main(grid: Any, context: Context) -> None:
    """FedAvg over all clients every round; central evaluation before and after each."""
    _, _, x_te, y_te, _ = task()
    evaluator = Net()

    def evaluate(server_round: int, arrays: list[np.ndarray], config: dict[str, Any]) -> Any:
        acc, loss = central_eval(evaluator, to_state(arrays), x_te, y_te)
        if timeline:
            timeline[0].mark(acc, loss)
        return loss, {"accuracy": acc}

    initial = [v.detach().numpy().copy() for v in initial_model().state_dict().values()]
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=N_CLIENTS,
        min_available_clients=N_CLIENTS,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda r: {"server-round": r},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=ROUNDS), strategy=strategy
    )
    if MODE == "secagg":
        fit = SecAggPlusWorkflow(
            num_shares=int(setting("SHARES", str(N_CLIENTS))),
            reconstruction_threshold=int(setting("THRESHOLD", str(N_CLIENTS // 2 + 1))),
            max_weight=max_part(),
        )
        workflow = DefaultWorkflow(fit_workflow=fit)
    else:
        workflow = DefaultWorkflow()
    workflow(grid, legacy)
