"""The FedAvg task on Flower (flwr): simulation engine, or deployment engine on loopback.

Run with a Python that has flwr installed (the optional ``bench`` extra; flwr pins
protobuf < 7, so the driver runs it from a separate venv that reuses this venv's torch).
The Flower app itself (ClientApp, ServerApp) is in ``flower_app.py``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

from fedavg_task import N_CLIENTS, Timeline, emit  # noqa: E402
from flower_app import _timeline, client_app, server_app  # noqa: E402


def run_simulation_engine() -> dict[str, object]:
    from flwr.simulation import run_simulation

    tl = Timeline("Flower simulation engine (Ray)")
    _timeline.append(tl)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=N_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    tl.notes = "run_simulation, Ray backend, client_resources num_cpus=1 (2 actors on 2 cores)"
    return tl.report()


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("simulation",), default="simulation")
    parser.parse_args()
    emit(run_simulation_engine())


if __name__ == "__main__":
    cli()
