"""Round checkpoints: safetensors weights plus JSON metadata, written atomically, for resume."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from producer.fl.aggregate import Weights

_LATEST = "latest.json"
_STRATEGY_PREFIX = "strategy/"


@dataclass(slots=True)
class Checkpoint:
    """The state after a committed round: global weights, strategy state and metadata.

    ``metadata`` holds at least ``round``; the round runner adds the metrics history, the
    seeds and the job settings so that a resumed run can check it is the same job.
    """

    round: int
    weights: Weights
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint, *, keep: int = 2) -> Path:
    """Write ``round-NNNN.safetensors`` + ``round-NNNN.json``, then point ``latest.json`` at them.

    ``latest.json`` is replaced last and atomically, so a crash at any moment leaves the
    previous committed round loadable. Keeps the ``keep`` newest rounds (0: keep all).

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = save_checkpoint(d, Checkpoint(3, {"w": torch.ones(2)}, metadata={"seed": 0}))
    >>> ck = load_latest(d)
    >>> ck.round, ck.weights["w"].tolist(), ck.metadata["seed"]
    (3, [1.0, 1.0], 0)
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"round-{checkpoint.round:04d}"
    tensors: dict[str, torch.Tensor] = {
        k: v.detach().contiguous() for k, v in checkpoint.weights.items()
    }
    for k, v in checkpoint.strategy_state.items():
        tensors[_STRATEGY_PREFIX + k] = v.detach().contiguous()
    tmp = d / f"{stem}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"round": str(checkpoint.round)})
    os.replace(tmp, d / f"{stem}.safetensors")
    meta = dict(
        checkpoint.metadata,
        round=checkpoint.round,
        weights=f"{stem}.safetensors",
        weight_names=list(checkpoint.weights),
    )
    _atomic_write_bytes(d / f"{stem}.json", json.dumps(meta, indent=2, sort_keys=True).encode())
    _atomic_write_bytes(d / _LATEST, json.dumps({"round": checkpoint.round, "stem": stem}).encode())
    if keep > 0:
        _prune(d, keep)
    return d / f"{stem}.json"


def _prune(d: Path, keep: int) -> None:
    stems = sorted({p.name.split(".")[0] for p in d.glob("round-*.json")})
    for stem in stems[:-keep]:
        for suffix in (".json", ".safetensors"):
            (d / f"{stem}{suffix}").unlink(missing_ok=True)


def load_latest(directory: str | Path) -> Checkpoint | None:
    """The last committed round in ``directory``, or ``None`` when there is none."""
    d = Path(directory)
    pointer = d / _LATEST
    if not pointer.is_file():
        return None
    stem = json.loads(pointer.read_text())["stem"]
    if not isinstance(stem, str) or not stem.startswith("round-") or "/" in stem:
        raise ValueError(f"{pointer} is damaged (stem {stem!r}); delete the checkpoint directory")
    meta = json.loads((d / f"{stem}.json").read_text())
    tensors = load_file(str(d / f"{stem}.safetensors"))
    names = meta.get("weight_names") or [k for k in tensors if not k.startswith(_STRATEGY_PREFIX)]
    weights = {k: tensors[k] for k in names}
    strategy_state = {
        k.removeprefix(_STRATEGY_PREFIX): v
        for k, v in tensors.items()
        if k.startswith(_STRATEGY_PREFIX)
    }
    return Checkpoint(int(meta["round"]), weights, strategy_state, meta)
