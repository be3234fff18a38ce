"""``fedplan demo``: federated training of a real dataset across N devices, end to end."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from producer.fl import demo_privacy
from producer.fl.data import Dataset, dirichlet_partition, iid_partition, load_digits, load_mnist
from producer.fl.job import FederatedJob, JobResult
from producer.fl.models import MLP, MODELS, make_model
from producer.fl.pace import PaceSteering, probe_for
from producer.fl.participants import PlanParticipant
from producer.fl.progress import ProgressBar, plot_metrics, write_device_metrics, write_metrics
from producer.fl.rounds import RoundPolicy
from producer.fl.secure_training import build_update_plan
from producer.fl.strategy import STRATEGIES, Strategy, make_strategy
from producer.fl.tracking import MLflowTracker, TensorBoardTracker, Tracker
from producer.fl.training import (
    TrainingSpec,
    build_evaluation_plan,
    build_training_plan,
    evaluate,
    get_weights,
)
from producer.remote.fleet import connect
from schemas.errors import FedplanError


@dataclass(slots=True)
class DeviceData:
    """One device's share: training rows and labels, and its slice of the test set."""

    device_id: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def tagged(self) -> list[torch.Tensor]:
        """The four tensors with the tags devices are searched by."""
        from producer.remote.tagging import tag

        return [
            tag(self.x_train.clone(), "train", "x"),
            tag(self.y_train.clone(), "train", "y"),
            tag(self.x_test.clone(), "test", "x"),
            tag(self.y_test.clone(), "test", "y"),
        ]


def partition(
    ds: Dataset, devices: int, *, scheme: str, alpha: float, seed: int
) -> list[DeviceData]:
    """Split ``ds`` across ``devices``: training rows IID or Dirichlet(alpha), test rows IID."""
    if scheme == "iid":
        train_parts = iid_partition(len(ds.x_train), devices, seed=seed)
    else:
        train_parts = dirichlet_partition(ds.y_train, devices, alpha=alpha, seed=seed, min_size=2)
    test_parts = iid_partition(len(ds.x_test), devices, seed=seed)
    out = []
    for k, (tr, te) in enumerate(zip(train_parts, test_parts, strict=True)):
        tr_t, te_t = torch.from_numpy(np.asarray(tr)), torch.from_numpy(np.asarray(te))
        out.append(
            DeviceData(
                f"device-{k}",
                ds.x_train[tr_t],
                ds.y_train[tr_t],
                ds.x_test[te_t],
                ds.y_test[te_t],
            )
        )
    return out


def strategy_from_args(args: argparse.Namespace) -> Strategy:
    """The registered strategy named by ``--strategy``, with the demo's strategy flags."""
    options = {"proximal_mu": args.mu, "server_lr": args.server_lr}
    if args.strategy == "fedbuff":
        options.update({k: getattr(args, k) for k in _FEDBUFF if getattr(args, k) is not None})
    return make_strategy(args.strategy, **options)


@dataclass(slots=True)
class Workers:
    """Celery worker processes this demo started (one per device); stopped by their pids."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def training_plans(
    setup: DemoSetup, *, device_eval: bool = False
) -> dict[tuple[str, int], Any]:
    """The demo's plans: ``("fit", 0)``, the one training loop plan every device runs over
    its own rows (with secure aggregation ``("fit", n)``, an update plan per local dataset
    size n), and, when devices evaluate, ``("evaluate", n)`` per test set size n."""
    plans: dict[tuple[str, int], Any] = {}
    if setup.secure:
        for n in sorted({len(share.x_train) for share in setup.shares}):
            plans["fit", n] = build_update_plan(setup.model, setup.spec, n,
                                                adaptive_clip=setup.adaptive_clip)
    else:
        plans["fit", 0] = build_training_plan(setup.model, setup.spec)
    if device_eval:
        for n in sorted({len(share.x_test) for share in setup.shares} - {0}):
            plans["evaluate", n] = build_evaluation_plan(setup.model, n)
    return plans


def plan_hashes(plans: dict[tuple[str, int], Any], *, secure: bool = False) -> list[str]:
    """The content hashes the device operators approve: only these plans' outputs (the
    model updates) may leave the devices; the training data itself stays private. With
    secure aggregation the update plans are not approved: their outputs leave only
    masked, inside a secure sum."""
    from schemas.plan_codec import plan_content_hash

    return [plan_content_hash(p.ir) for (k, _), p in plans.items() if not (secure and k == "fit")]


def install_share(store: Any, share: DeviceData) -> None:
    """As the device's operator: store the share as the device's own (private) data."""
    from consumer.store.base import StoredObject
    from producer.remote.tagging import tags_of

    for i, t in enumerate(share.tagged()):
        store.put_object(StoredObject(f"{share.device_id}-{i}", t.contiguous(), tags_of(t)))


def spawn_workers(
    shares: list[DeviceData],
    root: Path,
    broker: str,
    approved: list[str] = (),  # type: ignore[assignment]
) -> Workers:
    """Store each share in its device's data dir as the device's private data, approve the
    training plans by hash in its policy, then start one Celery worker per device."""
    from consumer.policy.rules import PolicyFile
    from consumer.store.sqlite import SqliteStore
    from consumer.worker.cli import worker_argv, worker_env

    workers = Workers()
    for share in shares:
        data_dir = root / share.device_id
        store = SqliteStore(data_dir)
        store.clear_objects()
        install_share(store, share)
        PolicyFile(data_dir).update(approve=list(approved or []))
        log = open(root / f"{share.device_id}.log", "ab")  # noqa: SIM115 - lives with the worker
        argv = [sys.executable, *worker_argv(share.device_id, loglevel="warning")]
        workers.processes.append(
            subprocess.Popen(
                argv,
                env=worker_env(share.device_id, data_dir, broker),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return workers


_SETTINGS = (
    "mnist", "devices", "partition", "alpha", "hidden", "lr", "batch_size", "epochs",
    "strategy", "mu", "server_lr", "model", *demo_privacy.SETTINGS,
)  # fmt: skip
"""The arguments that define the job: kept in checkpoints, a resume must match them."""
_FEDBUFF = (
    "buffer_size", "concurrency", "staleness_exponent", "max_staleness", "buffer_server_lr",
)  # fmt: skip
"""FedBuff's arguments (part of the job's settings with ``--strategy fedbuff``)."""


@dataclass(slots=True)
class DemoSetup:
    """Everything ``run_demo`` prepares before any device is involved."""

    data: Dataset
    shares: list[DeviceData]
    model: nn.Module
    spec: TrainingSpec
    strategy: Strategy
    out: Path
    secure: bool = False
    adaptive_clip: bool = False
    """Secure DP with adaptive clipping: the update plans clip and append the indicator."""


def run_demo(args: argparse.Namespace) -> int:
    """``fedplan demo``: partition, start devices, train R rounds, write metrics and a plot."""
    launch = time.monotonic()
    setup = prepare(args)
    announce(args, setup)
    result = train(args, setup)
    report(result, setup.out, launch)
    return 0


def prepare(args: argparse.Namespace) -> DemoSetup:
    """Fill dataset-dependent defaults, load and partition the data, make model and strategy."""
    for name, digits, mnist in (("lr", 0.2, 0.1), ("batch_size", 32, 64), ("epochs", 5, 1)):
        if getattr(args, name) is None:  # the training loop unrolls in the plan: keep it short
            setattr(args, name, mnist if args.mnist else digits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_mnist(args.mnist) if args.mnist else load_digits(seed=args.seed)
    shares = partition(ds, args.devices, scheme=args.partition, alpha=args.alpha, seed=args.seed)
    torch.manual_seed(args.seed)
    model = make_model(args.model, ds.num_features, ds.num_classes, hidden=args.hidden)
    strategy = strategy_from_args(args)
    spec = TrainingSpec(
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        proximal_mu=strategy.proximal_mu,
    )
    return DemoSetup(ds, shares, model, spec, strategy, out, secure=bool(args.secagg),
                     adaptive_clip=demo_privacy.adaptive_secure(args))


def announce(args: argparse.Namespace, setup: DemoSetup) -> None:
    """One line saying what is about to run."""
    ds = setup.data
    where = "embedded devices" if not args.broker else f"Celery workers on {args.broker}"
    print(
        f"fedplan demo: {'MNIST' if args.mnist else 'digits'} ({len(ds.x_train)} train / "
        f"{len(ds.x_test)} test rows), {args.devices} devices ({args.partition}), "
        f"{args.rounds} rounds of {args.strategy} ({args.model}) on {where}",
        flush=True,
    )


def train(args: argparse.Namespace, setup: DemoSetup) -> JobResult:
    """Start the devices (Celery workers with ``--broker``), run the job, stop them."""
    spawned = bool(args.broker) and not args.no_spawn
    plans = training_plans(setup, device_eval=args.device_eval)
    workers = Workers()
    if spawned:
        workers = spawn_workers(
            setup.shares, setup.out / "devices", args.broker,
            plan_hashes(plans, secure=setup.secure),
        )
    fleet = connect(args.broker, timeout=args.timeout) if args.broker else connect()
    executor = ThreadPoolExecutor(max(4, 2 * args.devices), thread_name_prefix="fl-fit")
    try:
        members = participants(args, setup, fleet, executor, spawned=spawned, plans=plans)
        pace = PaceSteering(probe_for(fleet), max_backlog=args.max_backlog) if args.pace else None
        with ProgressBar(args.rounds) as bar:
            job = make_job(args, setup, members, bar)
            job.pace = pace
            return job.run(get_weights(setup.model), args.rounds, resume=args.resume)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        fleet.close()
        workers.stop()


def participants(
    args: argparse.Namespace,
    setup: DemoSetup,
    fleet: Any,
    executor: ThreadPoolExecutor,
    *,
    spawned: bool,
    plans: dict[tuple[str, int], Any] | None = None,
) -> list[PlanParticipant]:
    """One plan participant per share. Embedded devices get their share as their own
    private data and approve the training (and evaluation) plans by hash, as a device
    operator would; a
    Celery device not spawned here must hold its data and approve the plans already
    (``fedplan data add``, ``fedplan device approve``)."""
    from producer.transport.local import LocalTransport

    plans = {} if plans is None else plans

    def plan_for(n: int) -> Any:  # one loop plan; secure: one update plan per dataset size
        key = ("fit", n) if setup.secure else ("fit", 0)
        if key not in plans:
            plans[key] = (
                build_update_plan(setup.model, setup.spec, n, adaptive_clip=setup.adaptive_clip)
                if setup.secure
                else build_training_plan(setup.model, setup.spec)
            )
        return plans[key]

    def evaluation_plan_for(n: int) -> Any:  # devices evaluate on their own test rows
        if ("evaluate", n) not in plans:
            plans["evaluate", n] = build_evaluation_plan(setup.model, n)
        return plans["evaluate", n]

    out = []
    for share in setup.shares:
        device = fleet.device(share.device_id)
        if isinstance(fleet.transport, LocalTransport) and not device.search("train", "x"):
            runtime = fleet.transport.runtime(device.id)
            install_share(runtime.store, share)
            mine = {("fit", 0): plan_for(len(share.x_train))}
            if args.device_eval and len(share.x_test):
                mine["evaluate", 0] = evaluation_plan_for(len(share.x_test))
            for content_hash in plan_hashes(mine, secure=setup.secure):
                runtime.policy_source.approve(content_hash)
        out.append(
            PlanParticipant(
                device,
                plan_for,
                epochs=setup.spec.epochs,
                proximal_mu=setup.spec.proximal_mu,
                timeout=args.timeout,
                executor=executor,
                evaluation_plan_for=evaluation_plan_for if args.device_eval else None,
            )
        )
    return out


def make_job(
    args: argparse.Namespace, setup: DemoSetup, members: list[PlanParticipant], bar: ProgressBar
) -> FederatedJob:
    """The federated job: round policy, server evaluation, checkpoints and a progress bar."""
    ds = setup.data
    policy = RoundPolicy(
        fraction=args.fraction,
        over_selection=args.over_selection,
        deadline=args.deadline,
        quorum=args.quorum,
        min_available=1,
    )
    scratch = make_model(args.model, ds.num_features, ds.num_classes, hidden=args.hidden)
    secure, privacy = demo_privacy.from_args(args)
    return FederatedJob(
        secure_aggregation=secure,
        privacy=privacy,
        participants=members,
        strategy=setup.strategy,
        evaluate=lambda w: evaluate(scratch, w, ds.x_test, ds.y_test),
        evaluate_on_devices=args.device_eval,
        trackers=trackers(args, setup.out),
        policy=policy,
        seed=args.seed,
        checkpoint_dir=setup.out / "checkpoints",
        settings={k: getattr(args, k) for k in _job_settings(args)},
        arrival_log=_arrival_log(args),
        on_round=lambda m: bar.update(m) if m.round > 0 else None,
    )


def _job_settings(args: argparse.Namespace) -> tuple[str, ...]:
    return _SETTINGS + (_FEDBUFF if args.strategy == "fedbuff" else ())


def _arrival_log(args: argparse.Namespace) -> list[list[object]]:
    """``--replay-arrivals FILE``: another run's ``arrivals.json`` (a list of [task, kind])."""
    if not getattr(args, "replay_arrivals", None):
        return []
    try:
        log = json.loads(Path(args.replay_arrivals).read_text())
    except (OSError, ValueError) as exc:
        raise FedplanError(f"cannot read the arrival log {args.replay_arrivals}: {exc}") from exc
    if not isinstance(log, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and isinstance(e[1], str)
        for e in log
    ):
        raise FedplanError(f"{args.replay_arrivals} is not an arrival log ([[task, kind], ...])")
    return log


def trackers(args: argparse.Namespace, out: Path) -> list[Tracker]:
    """TensorBoard (``--tensorboard DIR``, default ``<out>/tensorboard``) and ``--mlflow URI``."""
    found: list[Tracker] = []
    if args.tensorboard != "off":
        found.append(TensorBoardTracker(args.tensorboard or out / "tensorboard"))
    if args.mlflow:
        params = {k: getattr(args, k) for k in _SETTINGS}
        found.append(MLflowTracker(tracking_uri=args.mlflow, run_name=out.name, params=params))
    return found


def report(result: JobResult, out: Path, launch: float) -> None:
    """Write metrics.csv/json, devices.csv/json and the plot; print the final accuracy."""
    csv_path, json_path = write_metrics(result.history, out)
    devices_csv, _ = write_device_metrics(result.devices, out)
    if result.arrivals:  # FedBuff: the arrival order, replayable with --replay-arrivals
        (out / "arrivals.json").write_text(json.dumps(result.arrivals))
    png = plot_metrics(result.history, out / "metrics.png", title="fedplan demo")
    final = result.history[-1]
    resumed = f" (resumed after round {result.resumed_from})" if result.resumed_from else ""
    federated = (
        f"; on the devices' own test rows {100 * final.device_accuracy:.2f}% "
        f"({final.device_examples} rows)"
        if final.device_examples
        else ""
    )
    if final.epsilon == final.epsilon:  # NaN: no differential privacy
        federated += f"; (ε = {final.epsilon:.3g}, δ = {result.delta:g})-DP"
    if result.stopped:
        federated += f"; stopped: {result.stopped}"
    print(
        f"final test accuracy {100 * final.test_accuracy:.2f}% (loss {final.test_loss:.4f})"
        f"{federated} after {final.round} rounds{resumed} in {time.monotonic() - launch:.1f}s\n"
        f"metrics: {csv_path}\n         {json_path}\ndevices: {devices_csv}\nplot:    {png}\n"
        f"checkpoints: {out / 'checkpoints'}",
        flush=True,
    )


def _main(args: argparse.Namespace) -> int:
    try:
        return run_demo(args)
    except FedplanError as exc:
        print(f"fedplan demo: {exc}", file=sys.stderr)
        return 1


def register(subparsers: Any) -> None:
    """Add ``fedplan demo`` to the console script."""
    p = subparsers.add_parser(
        "demo",
        help="federated training of digits (or MNIST) across N devices",
        description="Partition a dataset across N devices, train with a federated strategy "
        f"({', '.join(sorted(STRATEGIES))}) as one traced plan per device, and write "
        "metrics.csv and a plot.",
    )
    p.add_argument(
        "--mnist",
        metavar="DIR",
        default=None,
        help="MNIST IDX files in DIR instead of scikit-learn's digits",
    )
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedavg")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal strength")
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam server learning rate")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="local SGD learning rate (default 0.2 on digits, 0.1 on MNIST)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (digits), 64 (MNIST)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="local epochs per round (default 5 on digits, 1 on MNIST)",
    )
    p.add_argument(
        "--buffer-size", type=int, default=8, help="fedbuff: updates folded per model version"
    )
    p.add_argument(
        "--concurrency", type=int, default=None, help="fedbuff: devices training at once (all)"
    )
    p.add_argument(
        "--staleness-exponent",
        type=float,
        default=0.5,
        help="fedbuff: an update s versions stale weighs (1+s)^-a (0.5: 1/sqrt(1+s))",
    )
    p.add_argument(
        "--max-staleness", type=int, default=None, help="fedbuff: drop updates staler than this"
    )
    p.add_argument("--buffer-server-lr", type=float, default=1.0, help="fedbuff: server rate")
    p.add_argument(
        "--replay-arrivals",
        metavar="FILE",
        default=None,
        help="fedbuff: process updates in the order of another run's arrivals.json",
    )
    p.add_argument("--hidden", type=int, default=64, help="width (CNN: channels, at most 16)")
    p.add_argument("--model", choices=sorted(MODELS), default="mlp", help="network to train")
    p.add_argument(
        "--no-device-eval",
        dest="device_eval",
        action="store_false",
        help="do not have devices evaluate each round's weights on their own test rows",
    )
    p.add_argument(
        "--pace",
        action="store_true",
        help="sample only devices that are online and not backlogged (queue depth and "
        "consumers from the management API with --broker)",
    )
    p.add_argument("--max-backlog", type=int, default=1, help="with --pace: commands waiting")
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="TensorBoard log dir (default OUT/tensorboard; 'off' to disable)",
    )
    p.add_argument("--mlflow", metavar="URI", default=None, help="also log to MLflow at URI")
    p.add_argument("--fraction", type=float, default=1.0, help="share of devices per round")
    p.add_argument("--over-selection", type=float, default=1.0)
    p.add_argument("--deadline", type=float, default=60.0, help="seconds per round attempt")
    p.add_argument("--quorum", type=float, default=0.75, help="share of wanted replies to commit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fedplan-demo", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--broker",
        metavar="URL",
        default=None,
        help="amqp:// URL: run devices as Celery workers (one process per device)",
    )
    p.add_argument(
        "--no-spawn",
        action="store_true",
        help="with --broker: use running workers instead of starting them",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a device")
    demo_privacy.add_arguments(p)
    p.set_defaults(func=_main)


__all__ = ["MLP", "register", "run_demo", "strategy_from_args"]  # MLP: producer.fl.models
