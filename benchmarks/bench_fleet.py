"""1,000 devices through one RabbitMQ broker, served by a few multi-device Celery workers.

Per partition (IID and Dirichlet alpha=0.5 of scikit-learn's digits, split 1,000 ways) in a
vhost of its own (deleted at the end): 1,000 durable device queues, each device's share
stored in its data dir ``DIR/<id>`` as its private data with the training plans approved,
``--workers`` processes of ``fedplan worker --devices-dir DIR`` (``--concurrency`` pool
processes each) serving them. Then

- a warm-up round on every device (each gets its training plan once: a cold round),
- with ``--scaling``: ``--scale-rounds`` rounds at each of 10, 100 and 500 sampled devices,
- ``--rounds`` FedAvg rounds with ``--sampled`` devices sampled per round,

recording the broker's memory (management API: the queues' own ``memory`` and the node's
``mem_used`` before the vhost and with every queue and worker up), the test accuracy after
every round (printed as it comes, to stderr) and the machine's peak used memory (``free``'s
used: MemTotal - MemAvailable, sampled every second). ``--embedded`` also runs the same
rounds on 1,000 embedded devices in this process. Prints one JSON document.

Cleanup on any exit: SIGTERM/SIGINT/SIGHUP unwind through the ``finally`` blocks (workers
stopped, vhost deleted), and a reaper process started with the vhost does the same if this
process dies without unwinding (SIGKILL, the OOM killer).

Usage::

    .venv/bin/python benchmarks/bench_fleet.py --scaling --embedded > fleet.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_fedavg_fedplan import Vhost  # noqa: E402

from broker_config import names  # noqa: E402
from broker_config.management import ManagementClient  # noqa: E402
from producer.fl.demo import (  # noqa: E402  # noqa: E402
    DemoSetup,
    DeviceData,
    install_share,
    plan_hashes,
    prepare,
    training_plans,
)
from producer.fl.demo import participants as make_participants  # noqa: E402
from producer.fl.job import FederatedJob  # noqa: E402
from producer.fl.rounds import RoundPolicy  # noqa: E402
from producer.fl.training import evaluate, get_weights  # noqa: E402


def demo_args(devices: int, **over: Any) -> argparse.Namespace:
    """The ``fedplan demo`` arguments of this run (its parser, its defaults)."""
    from producer.fl.demo import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tempfile.mkdtemp(prefix="fedplan-fleet-out-")
    argv = ["demo", "--devices", str(devices), "--out", out, "--tensorboard", "off"]
    args = parser.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def label_skew(y: torch.Tensor, devices: int, *, alpha: float, seed: int) -> list[np.ndarray]:
    """Each device's labels drawn from its own Dir(alpha) class mix; sizes as an even split.

    ``dirichlet_partition`` (split each class across parts) cannot give 1,000 parts at least
    one row each from 1,437 rows; here each device draws its rows' classes from its own
    Dirichlet mix over the classes that still have rows (the per-client label distribution
    form of the same non-IID scheme).
    """
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    classes = np.unique(labels)
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = [len(p) for p in np.array_split(np.arange(len(labels)), devices)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.full(len(classes), alpha))
        rows = []
        for _ in range(size):
            left = np.array([len(pools[int(c)]) > 0 for c in classes], dtype=float)
            p = mix * left
            p = p / p.sum() if p.sum() > 0 else left / left.sum()
            c = int(classes[rng.choice(len(classes), p=p)])
            rows.append(pools[c].pop())
        parts.append(np.sort(np.array(rows, dtype=np.int64)))
    return parts


def fleet_setup(devices: int, scheme: str, alpha: float, seed: int, **over: Any) -> Any:
    """``(demo args, setup)`` with the training rows split ``devices`` ways: IID or
    :func:`label_skew` (no test rows on the devices: the server evaluates)."""
    from producer.fl.data import iid_partition

    dargs = demo_args(8, **over)
    setup = prepare(dargs)  # the demo's data, model and spec (its 8-way split is replaced)
    dargs.devices = devices
    ds = setup.data
    if scheme == "iid":
        parts = iid_partition(len(ds.x_train), devices, seed=seed)
    else:
        parts = label_skew(ds.y_train, devices, alpha=alpha, seed=seed)
    empty = torch.zeros(0)
    setup.shares = [
        DeviceData(f"client-{k}", ds.x_train[torch.from_numpy(p)], ds.y_train[torch.from_numpy(p)],
                   empty, empty)
        for k, p in enumerate(parts)
    ]  # fmt: skip
    return dargs, setup


def reap(parent: int, vhost: str, pids_file: str) -> None:
    """The reaper: once ``parent`` is gone, kill the worker process groups listed in
    ``pids_file``, delete ``vhost`` and the devices' directory (``pids_file``'s); the bench
    normally does all of it itself, then ends the reaper."""
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        time.sleep(2.0)
    path = Path(pids_file)
    for line in path.read_text().split() if path.exists() else []:
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.killpg(int(line), signal.SIGKILL)
    leftover = Vhost()
    leftover.name = vhost
    leftover.__exit__()
    shutil.rmtree(path.parent, ignore_errors=True)


def start_reaper(vhost: str, pids_file: Path) -> Any:
    """A process that cleans up after this one if it dies without running its ``finally``."""
    return subprocess.Popen(
        [sys.executable, __file__, "--reap", f"{os.getpid()},{vhost},{pids_file}"],
        start_new_session=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def unwind_on_signals() -> None:
    """SIGTERM/SIGHUP raise ``SystemExit`` (SIGINT already raises) so ``finally`` runs."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)


class PeakMemory:
    """The machine's peak used memory (``free``: MemTotal - MemAvailable) while it runs."""

    def __init__(self, period: float = 1.0) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)
        self._thread.start()

    @staticmethod
    def used_mib() -> int:
        info = dict(
            (line.split(":")[0], int(line.split()[1]))
            for line in Path("/proc/meminfo").read_text().splitlines()
        )
        return (info["MemTotal"] - info["MemAvailable"]) // 1024

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            self.peak_mib = max(self.peak_mib, self.used_mib())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def node_memory(admin: ManagementClient) -> int:
    nodes = admin.request("GET", "nodes") or []
    return int(sum(int(n.get("mem_used", 0) or 0) for n in nodes))


def queue_memory(client: ManagementClient) -> tuple[int, int]:
    """``(device queues, bytes of their memory)`` as the broker reports them."""
    queues = client.request("GET", f"queues/{client.vq()}?columns=name,memory") or []
    mine = [q for q in queues if names.device_from_queue(str(q.get("name", "")))]
    return len(mine), int(sum(int(q.get("memory", 0) or 0) for q in mine))


def spawn(
    root: Path, devices: list[str], url: str, workers: int, concurrency: int, pids_file: Path
) -> list[Any]:
    """``workers`` multi-device workers, each in a session of its own (its pid, the process
    group the reaper kills, appended to ``pids_file`` as it starts)."""
    from consumer.worker.cli import devices_env, worker_argv

    procs = []
    for i, chunk in enumerate(np.array_split(np.array(devices), workers)):
        argv = worker_argv(list(chunk), loglevel="warning", concurrency=concurrency)
        env = devices_env(root, url)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        log = open(root.parent / f"worker-{i}.log", "ab")  # noqa: SIM115 - lives with it
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
        with pids_file.open("a") as f:
            f.write(f"{procs[-1].pid}\n")
    return procs


def wait_consumed(client: ManagementClient, n: int, procs: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker exited; see its log")
        queues = client.request("GET", f"queues/{client.vq()}?columns=name,consumers") or []
        served = sum(
            1 for q in queues
            if names.device_from_queue(str(q.get("name", ""))) and int(q.get("consumers") or 0)
        )  # fmt: skip
        if served >= n:
            return
        time.sleep(1.0)
    raise RuntimeError(f"workers did not consume {n} queues within {timeout} s")


def stop(procs: list[Any]) -> None:
    """Stop the workers (warm shutdown), then kill whatever is left of their process groups."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # pool processes a killed main left behind


def rounds(
    setup: DemoSetup,
    members: list[Any],
    weights: dict[str, torch.Tensor],
    sampled: int,
    n: int,
    seed: int,
    label: str = "",
) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """``n`` FedAvg rounds with ``sampled`` devices each: round seconds, weights, and the
    server's test accuracy after each round (each round printed to stderr as it ends)."""
    ds = setup.data
    scratch = copy.deepcopy(setup.model)

    def report(m: Any) -> None:
        print(
            f"[{label}] round {m.round}: {m.round_seconds:.2f} s, {m.participants} devices, "
            f"{m.failures} failed, test accuracy {100 * m.test_accuracy:.2f}%",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    job = FederatedJob(
        participants=members,
        strategy="fedavg",
        evaluate=lambda w: evaluate(scratch, w, ds.x_test, ds.y_test),
        policy=RoundPolicy(fraction=sampled / len(members), quorum=1.0, deadline=900.0),
        seed=seed,
        on_round=report if label else None,
    )
    result = job.run(weights, n)
    rows = result.history[1:]
    return [m.round_seconds for m in rows], result.weights, [m.test_accuracy for m in rows]


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "rounds": len(seconds),
        "median_s": round(statistics.median(seconds), 3),
        "mean_s": round(statistics.fmean(seconds), 3),
        "max_s": round(max(seconds), 3),
    }


def run_broker(args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    dargs, setup = fleet_setup(
        args.devices, scheme, args.alpha, args.seed, broker="amqp://", timeout=900.0
    )
    plans = training_plans(setup)
    hashes = plan_hashes(plans)
    root = Path(tempfile.mkdtemp(prefix="fedplan-fleet-")) / "devices"
    out: dict[str, Any] = {"partition": scheme, "devices": args.devices}
    sizes = [len(s.x_train) for s in setup.shares]
    out["rows_per_device"] = {"min": min(sizes), "max": max(sizes)}
    from consumer.policy.rules import PolicyFile
    from consumer.store.sqlite import SqliteStore

    t = time.monotonic()
    for share in setup.shares:
        store = SqliteStore(root / share.device_id)
        install_share(store, share)
        PolicyFile(root / share.device_id).update(approve=hashes)
    out["install_s"] = round(time.monotonic() - t, 1)
    vhost = Vhost()
    admin = vhost.admin
    before = node_memory(admin)
    pids_file = root.parent / "worker-pids"
    procs: list[Any] = []
    memory = PeakMemory()
    vhost.__enter__()
    reaper = start_reaper(vhost.name, pids_file)
    import producer as fp

    try:
        client = ManagementClient(api_url=admin.api_url, user=admin.user,
                                  password=admin.password, vhost=vhost.name)  # fmt: skip
        t = time.monotonic()
        devices = [s.device_id for s in setup.shares]
        procs = spawn(root, devices, vhost.url, args.workers, args.concurrency, pids_file)
        wait_consumed(client, len(devices), procs, timeout=900)
        out["workers_ready_s"] = round(time.monotonic() - t, 1)
        time.sleep(5)  # let the management stats catch up
        n, qmem = queue_memory(client)
        after = node_memory(admin)
        out["broker"] = {
            "device_queues": n,
            "queue_memory_bytes_per_queue": qmem // max(n, 1),
            "node_mem_used_delta_bytes_per_queue": (after - before) // max(n, 1),
            "node_mem_used_before_mib": before // 2**20,
            "node_mem_used_after_mib": after // 2**20,
            "workers": args.workers,
            "concurrency": args.concurrency,
        }
        fleet = fp.connect(vhost.url, timeout=900.0)
        executor = ThreadPoolExecutor(args.devices, thread_name_prefix="fl-fit")
        try:
            members = make_participants(dargs, setup, fleet, executor, spawned=True, plans=plans)
            weights = get_weights(setup.model)
            secs, weights, _ = rounds(setup, members, weights, args.devices, 1, args.seed,
                                      f"{scheme} warm-up")  # fmt: skip
            out["warm_up_round_all_devices_s"] = round(secs[0], 2)
            if args.scaling:
                out["scaling"] = {}
                for k in [k for k in (10, 100, 500) if k <= args.devices]:
                    secs, weights, _ = rounds(setup, members, weights, k, args.scale_rounds,
                                              args.seed + k, f"{scheme} {k} sampled")  # fmt: skip
                    out["scaling"][str(k)] = summary(secs)
                    print(f"[{scheme}] {k} sampled: {summary(secs)}", file=sys.stderr, flush=True)
            start = get_weights(setup.model)
            secs, _, acc = rounds(setup, members, start, args.sampled, args.rounds, args.seed,
                                  f"{scheme} main")  # fmt: skip
            out["main"] = {
                "sampled": args.sampled,
                **summary(secs),
                "final_accuracy": acc[-1],
                "accuracy_per_round": [round(a, 4) for a in acc],
                "seconds_per_round": [round(x, 2) for x in secs],
            }
            print(f"[{scheme}] main: {out['main']}", file=sys.stderr, flush=True)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            fleet.close()
    finally:
        stop(procs)
        vhost.__exit__()
        reaper.kill()
        reaper.wait()
        out["machine_peak_used_mib"] = memory.stop()
        shutil.rmtree(root.parent, ignore_errors=True)
        shutil.rmtree(dargs.out, ignore_errors=True)
    return out


def run_queues_only(args: argparse.Namespace) -> dict[str, Any]:
    """Broker memory of ``--devices`` durable device queues alone (no workers, no rounds)."""
    from producer.transport.amqp import AmqpTransport

    vhost = Vhost()
    admin = vhost.admin
    before = node_memory(admin)
    vhost.__enter__()
    client = ManagementClient(api_url=admin.api_url, user=admin.user, password=admin.password,
                              vhost=vhost.name)  # fmt: skip
    try:
        t = time.monotonic()
        transport = AmqpTransport(on_reply=lambda *a, **k: None, url=vhost.url)
        try:
            for k in range(args.devices):
                transport.ensure_device(f"client-{k}")
        finally:
            transport.close()
        declared = time.monotonic() - t
        time.sleep(10)  # let the management stats catch up
        n, qmem = queue_memory(client)
        after = node_memory(admin)
    finally:
        vhost.__exit__()
    return {
        "device_queues": n,
        "declare_s": round(declared, 1),
        "queue_memory_bytes_per_queue": qmem // max(n, 1),
        "node_mem_used_delta_bytes_per_queue": (after - before) // max(n, 1),
    }


def run_embedded(args: argparse.Namespace) -> dict[str, Any]:
    import producer as fp

    dargs, setup = fleet_setup(
        args.devices, "iid", args.alpha, args.seed, broker=None, timeout=900.0
    )
    plans = training_plans(setup)
    t = time.monotonic()
    fleet = fp.connect()
    executor = ThreadPoolExecutor(args.devices, thread_name_prefix="fl-fit")
    try:
        members = make_participants(dargs, setup, fleet, executor, spawned=False, plans=plans)
        out: dict[str, Any] = {"devices": args.devices, "setup_s": round(time.monotonic() - t, 1)}
        weights = get_weights(setup.model)
        secs, weights, _ = rounds(setup, members, weights, args.devices, 1, args.seed)
        out["warm_up_round_all_devices_s"] = round(secs[0], 2)
        device_threads = [t for t in threading.enumerate() if t.name.startswith("fedplan-devices")]
        out["device_executor_threads"] = len(device_threads)
        secs, _, acc = rounds(setup, members, get_weights(setup.model), args.sampled,
                              args.rounds, args.seed, "embedded main")  # fmt: skip
        out["main"] = {"sampled": args.sampled, **summary(secs), "final_accuracy": acc[-1],
                       "accuracy_per_round": [round(a, 4) for a in acc]}  # fmt: skip
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        fleet.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--sampled", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--workers", type=int, default=2, help="multi-device worker processes")
    p.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    p.add_argument("--partitions", default="iid,dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scaling", action="store_true", help="rounds at 10, 100, 500 sampled")
    p.add_argument("--scale-rounds", type=int, default=3)
    p.add_argument("--embedded", action="store_true", help="also 1,000 embedded devices")
    p.add_argument("--queues-only", action="store_true", help="only the queues' broker memory")
    p.add_argument("--reap", help=argparse.SUPPRESS)  # internal: PARENT_PID,VHOST,PIDS_FILE
    args = p.parse_args()
    if args.reap:
        parent, vhost, pids_file = args.reap.split(",", 2)
        reap(int(parent), vhost, pids_file)
        return
    unwind_on_signals()
    torch.set_num_threads(1)
    if args.queues_only:
        print(json.dumps({"command": " ".join(sys.argv), "queues": run_queues_only(args)}))
        return
    report: dict[str, Any] = {"command": " ".join(sys.argv), "broker": []}
    if args.embedded:
        report["embedded"] = run_embedded(args)
        print(json.dumps(report["embedded"]), file=sys.stderr, flush=True)
    for i, scheme in enumerate(args.partitions.split(",")):
        scaling = args.scaling
        args.scaling = scaling and i == 0  # the scaling rounds once, on the first partition
        report["broker"].append(run_broker(args, scheme))
        print(json.dumps(report["broker"][-1]), file=sys.stderr, flush=True)
        args.scaling = scaling
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
