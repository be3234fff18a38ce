"""``fedplan worker`` (a Celery worker for one device) and ``fedplan data add``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from broker_config import names
from broker_config.settings import Settings
from consumer.store.base import StoredObject
from consumer.store.sqlite import SqliteStore
from consumer.worker.devices import devices_in, worker_queues
from schemas.errors import FedplanError


def worker_argv(
    device_id: str | Sequence[str],
    *,
    loglevel: str = "info",
    extra: Sequence[str] = (),
    concurrency: int = 1,
) -> list[str]:
    """The stock ``celery worker`` command line serving one device, or several.

    Several devices are served by one worker process on one broker connection, one queue
    each (``-Q a,b,...``); ``concurrency`` pool processes run their commands, so one
    device's slow plan leaves the others ``concurrency - 1`` processes.

    Examples
    --------
    >>> worker_argv("alice")[:6]
    ['-m', 'celery', '-A', 'consumer', 'worker', '-Q']
    >>> argv = worker_argv(["a", "b"], concurrency=2)
    >>> argv[argv.index("-Q") + 1], argv[argv.index("-c") + 1]
    ('fedplan.device.a,fedplan.device.b', '2')
    """
    devices = [device_id] if isinstance(device_id, str) else list(device_id)
    if not devices:
        raise FedplanError("a worker needs at least one device")
    if concurrency < 1:
        raise FedplanError(f"--concurrency {concurrency}: a worker needs 1 pool process or more")
    node = devices[0] if len(devices) == 1 else f"devices-{devices[0]}-{len(devices)}"
    return [
        "-m",
        "celery",
        "-A",
        "consumer",
        "worker",
        "-Q",
        worker_queues(devices),
        "-n",
        f"{node}@%h",
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "--without-mingle",
        "--without-gossip",
        "-l",
        loglevel,
        *extra,
    ]


def worker_env(
    device_id: str,
    data_dir: str | os.PathLike[str],
    broker_url: str | None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a device's worker process."""
    env = dict(os.environ if base is None else base)
    env.pop("FEDPLAN_DEVICES_DIR", None)
    env["FEDPLAN_DEVICE_ID"] = device_id
    env["FEDPLAN_DATA_DIR"] = str(Path(data_dir).resolve())
    if broker_url:
        env["FEDPLAN_BROKER_URL"] = broker_url
    return env


def devices_env(
    devices_dir: str | os.PathLike[str],
    broker_url: str | None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a multi-device worker: device ``<id>`` lives in ``devices_dir/<id>``.

    Examples
    --------
    >>> env = devices_env("/srv/devices", None, base={"FEDPLAN_DEVICE_ID": "x"})
    >>> env["FEDPLAN_DEVICES_DIR"], "FEDPLAN_DEVICE_ID" in env
    ('/srv/devices', False)
    """
    env = dict(os.environ if base is None else base)
    env.pop("FEDPLAN_DEVICE_ID", None)  # the device of a command is its queue's
    env["FEDPLAN_DEVICES_DIR"] = str(Path(devices_dir).resolve())
    if broker_url:
        env["FEDPLAN_BROKER_URL"] = broker_url
    return env


def worker_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The argv and environment ``fedplan worker`` execs, after validating its options."""
    devices: list[str] = [names.check_id("device", d) for d in args.device or []]
    if len(set(devices)) != len(devices):
        raise FedplanError("a device is named twice; each --device once")
    if args.devices_dir is None:
        if len(devices) != 1 or args.data_dir is None:
            raise FedplanError(
                "give one --device with its --data-dir, or --devices-dir DIR (each "
                "subdirectory a device's data dir; --device picks some of them)"
            )
        Settings.from_env(broker_url=args.broker, data_dir=args.data_dir)  # validate settings
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        env = worker_env(devices[0], args.data_dir, args.broker)
        concurrency = args.concurrency or 1
    else:
        if args.data_dir is not None:
            raise FedplanError(
                "--data-dir is for one device; with --devices-dir each device "
                "keeps its data in DIR/<device>"
            )
        Settings.from_env(broker_url=args.broker, devices_dir=args.devices_dir)
        root = Path(args.devices_dir)
        for d in devices:
            (root / d).mkdir(parents=True, exist_ok=True)
        devices = devices or (devices_in(root) if root.is_dir() else [])
        if not devices:
            raise FedplanError(f"{root} holds no device data dirs; add --device ID")
        env = devices_env(root, args.broker)
        concurrency = args.concurrency or min(len(devices), MULTI_DEVICE_CONCURRENCY)
    argv = worker_argv(devices, loglevel=args.loglevel, concurrency=concurrency)
    return [sys.executable, *argv], env


MULTI_DEVICE_CONCURRENCY = 2
"""Default pool processes of a multi-device worker: a device's slow plan holds one, the other
devices' commands run on the other (raise it with ``--concurrency``)."""


def run_worker(args: argparse.Namespace) -> int:
    """``fedplan worker``: replace this process with ``celery -A consumer worker``."""
    try:
        argv, env = worker_command(args)
    except FedplanError as exc:
        print(f"fedplan worker: {exc.message}", file=sys.stderr)
        return 2
    os.execvpe(sys.executable, argv, env)  # noqa: S606 (fixed program, no shell)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors in a ``.safetensors``, ``.npy`` or ``.pt`` file (``weights_only``), by name.

    A file holding one tensor gives ``{file stem: tensor}``; a mapping of tensors gives
    ``{"stem.key": tensor}``. Nothing is unpickled beyond torch's weights-only loader.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        found: Any = load_file(str(path))
    elif suffix == ".npy":
        found = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix in (".pt", ".pth"):
        found = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FedplanError(f"{path}: unsupported file type; use .safetensors, .npy or .pt")
    if isinstance(found, torch.Tensor):
        return {path.stem: found}
    if isinstance(found, dict) and all(isinstance(v, torch.Tensor) for v in found.values()):
        return {f"{path.stem}.{k}": v for k, v in found.items()}
    raise FedplanError(f"{path}: holds {type(found).__name__}, not a tensor or dict of tensors")


def add_data(
    data_dir: str | os.PathLike[str], files: list[Path], tags: list[str], description: str = ""
) -> list[str]:
    """Store the tensors of ``files`` in the device store at ``data_dir`` with ``tags``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp(); f = Path(d) / "x.npy"; np.save(f, np.ones(2))
    >>> add_data(Path(d) / "store", [f], ["#x"])
    ['x']
    """
    store = SqliteStore(data_dir)
    added: list[str] = []
    for path in files:
        for object_id, tensor in load_tensors(path).items():
            store.put_object(StoredObject(object_id, tensor.contiguous(), tuple(tags), description))
            added.append(object_id)
    return added


def run_data_add(args: argparse.Namespace) -> int:
    """``fedplan data add``."""
    for object_id in add_data(
        args.data_dir, [Path(f) for f in args.files], args.tag or [], args.description
    ):
        print(f"added {object_id} with tags {' '.join(args.tag or []) or '(none)'}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedplan worker`` and ``fedplan data add`` to the console script."""
    w = subparsers.add_parser("worker", help="run the Celery worker of one device or several")
    w.add_argument(
        "--device",
        action="append",
        help="a device id (queue fedplan.device.<id>); repeat it with --devices-dir",
    )
    w.add_argument("--data-dir", default=None, help="the store directory of the one device")
    w.add_argument(
        "--devices-dir",
        default=None,
        help="serve many devices in one worker: each subdirectory <id> is device <id>'s data "
        "dir (all of them, or those named with --device)",
    )
    w.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"pool processes (default 1; {MULTI_DEVICE_CONCURRENCY} with several devices)",
    )
    w.add_argument(
        "--broker",
        default=None,
        help="broker URL, or a cluster's URLs separated by ';' (default FEDPLAN_BROKER_URL)",
    )
    w.add_argument("--loglevel", default="info")
    w.set_defaults(func=run_worker)
    data = subparsers.add_parser("data", help="tagged local data of a device")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    a = sub.add_parser("add", help="store tensors from files, found by device.search(tag)")
    a.add_argument("--data-dir", required=True, help="the device store directory")
    a.add_argument("--tag", action="append", help="a tag such as '#mnist' (repeatable)")
    a.add_argument("--description", default="")
    a.add_argument("files", nargs="+", help=".safetensors, .npy or .pt files")
    a.set_defaults(func=run_data_add)
