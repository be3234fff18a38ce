"""Tests of ``fedplan data add`` and the worker command line (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from broker_config import names
from consumer.store.sqlite import SqliteStore
from consumer.worker.cli import add_data, load_tensors, worker_argv, worker_env
from producer.cli.main import main
from schemas.errors import FedplanError


def test_data_add_stores_safetensors_npy_and_pt_files_found_by_tag(tmp_path: Path) -> None:
    a, b, c = torch.randn(3, 2), np.arange(4, dtype=np.int64), torch.randn(5)
    save_file({"w": a}, str(tmp_path / "model.safetensors"))
    np.save(tmp_path / "labels.npy", b)
    torch.save(c, tmp_path / "bias.pt")
    store_dir = tmp_path / "store"
    files = ["model.safetensors", "labels.npy", "bias.pt"]
    argv = ["data", "add", "--data-dir", str(store_dir), "--tag", "#local"]
    assert main([*argv, *[str(tmp_path / f) for f in files]]) == 0
    found = {o.id: o.tensor for o in SqliteStore(store_dir).search(["#local"])}
    assert torch.equal(found["model.w"], a)
    assert torch.equal(found["labels"], torch.from_numpy(b))
    assert torch.equal(found["bias"], c)


def test_a_pt_file_holding_more_than_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(FedplanError, match="not a tensor or dict of tensors"):
        load_tensors(tmp_path / "ckpt.pt")


def test_an_unknown_file_type_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(FedplanError, match=r"\.safetensors, \.npy or \.pt"):
        add_data(tmp_path / "store", [tmp_path / "x.csv"], ["#t"])


def test_the_worker_command_is_a_stock_celery_worker_on_the_device_queue(tmp_path: Path) -> None:
    argv = worker_argv("alice")
    assert argv[:5] == ["-m", "celery", "-A", "consumer", "worker"]
    assert argv[argv.index("-Q") + 1] == names.device_queue("alice")
    assert argv[argv.index("-n") + 1] == "alice@%h"
    env = worker_env("alice", tmp_path, "amqp://u:p@127.0.0.1:5672/", base={})
    assert env["FEDPLAN_DEVICE_ID"] == "alice"
    assert env["FEDPLAN_DATA_DIR"] == str(tmp_path.resolve())
    assert env["FEDPLAN_BROKER_URL"] == "amqp://u:p@127.0.0.1:5672/"
