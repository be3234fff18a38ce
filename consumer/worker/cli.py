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
from schemas.errors import FedplanError


def worker_argv(device_id: str, *, loglevel: str = "info", extra: Sequence[str] = ()) -> list[str]:
    """The stock ``celery worker`` command line serving one device.

    Examples
    --------
    >>> worker_argv("alice")[:6]
    ['-m', 'celery', '-A', 'consumer', 'worker', '-Q']
    """
    return [
        "-m",
        "celery",
        "-A",
        "consumer",
        "worker",
        "-Q",
        names.device_queue(device_id),
        "-n",
        f"{device_id}@%h",
        "-c",
        "1",
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
    env["FEDPLAN_DEVICE_ID"] = device_id
    env["FEDPLAN_DATA_DIR"] = str(Path(data_dir).resolve())
    if broker_url:
        env["FEDPLAN_BROKER_URL"] = broker_url
    return env


def run_worker(args: argparse.Namespace) -> int:
    """``fedplan worker``: replace this process with ``celery -A consumer worker``."""
    names.device_queue(args.device)  # validate before exec
    Settings.from_env(broker_url=args.broker, data_dir=args.data_dir)  # validate settings
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    env = worker_env(args.device, args.data_dir, args.broker)
    argv = [sys.executable, *worker_argv(args.device, loglevel=args.loglevel)]
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
    w = subparsers.add_parser("worker", help="run the Celery worker of one device")
    w.add_argument("--device", required=True, help="the device id (queue fedplan.device.<id>)")
    w.add_argument("--data-dir", required=True, help="the device store directory")
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
