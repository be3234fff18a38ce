"""The FedAvg task on Flower (flwr): simulation engine, or deployment engine on loopback.

Run with a Python that has flwr installed (the optional ``bench`` extra; flwr pins
protobuf < 7, so the driver runs it from a separate venv that reuses this venv's torch).
The Flower app itself (ClientApp, ServerApp) is in ``flower_app.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

from fedavg_task import N_CLIENTS, ROUNDS, Timeline, emit  # noqa: E402
from flower_app import MARKS_ENV, _timeline, client_app, server_app  # noqa: E402

BIN = Path(sys.executable).parent
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedavgbench"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedplan"

[tool.flwr.app.components]
serverapp = "flower_app:server_app"
clientapp = "flower_app:client_app"

[tool.flwr.app.config]
marks = ""
"""


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(root: int) -> list[int]:
    """Pids of every process descending from ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _wait_port(port: int, timeout: float = 120.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"the SuperLink did not open port {port}")


def run_deployment_engine() -> dict[str, object]:
    """SuperLink + 8 SuperNodes on loopback (insecure), the app submitted with ``flwr run``."""
    tl = Timeline("Flower deployment engine (SuperLink + 8 SuperNodes)")
    work = Path(tempfile.mkdtemp(prefix="flwr-bench-"))
    app = work / "app"
    app.mkdir()
    for name in ("flower_app.py", "fedavg_task.py"):
        shutil.copy(HERE / name, app / name)
    (app / "pyproject.toml").write_text(PYPROJECT)
    marks = work / "marks.jsonl"
    control = _free_port()  # flwr 1.41: one HTTP port for the Control, Fleet and runtime APIs
    fleet = control
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{control}"\ninsecure = true\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home), **{MARKS_ENV: str(marks)})
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    procs: list[subprocess.Popen[bytes]] = []
    logs = work / "logs"
    logs.mkdir()

    def start(name: str, argv: list[str]) -> None:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        procs.append(
            subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(control),
                "--disable-runtime-dependency-installation",
            ],
        )
        for k in range(N_CLIENTS):
            start(
                f"supernode-{k}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{fleet}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={k} num-partitions={N_CLIENTS}",
                ],
            )
        _wait_port(control)
        time.sleep(2.0)  # let the SuperNodes register
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(app),
                "bench",
                "--stream",
                "--run-config",
                f'marks="{marks}"',
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        (logs / "flwr-run.log").write_text(run.stdout + run.stderr)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = marks.read_text().splitlines() if marks.exists() else []
            if len(rows) >= ROUNDS + 1:
                break
            time.sleep(0.5)
    finally:
        family = _descendants(os.getpid())
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for pid in family:  # ServerApp/ClientApp processes started in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    rows = [json.loads(line) for line in marks.read_text().splitlines()] if marks.exists() else []
    if len(rows) < ROUNDS + 1:
        raise SystemExit(f"the Flower run did not finish; logs in {logs}")
    for row in rows:
        tl.marks.append(row["t"])
        tl.accuracy.append(row["acc"])
        tl.loss.append(row["loss"])
    tl.notes = (
        "flower-superlink + 8 flower-supernode (insecure, loopback), app submitted with "
        f"`flwr run --stream`; logs in {logs}"
    )
    return tl.report()


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("simulation", "deployment"), default="simulation")
    engine = parser.parse_args().engine
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM
    emit(run_simulation_engine() if engine == "simulation" else run_deployment_engine())


if __name__ == "__main__":
    cli()
