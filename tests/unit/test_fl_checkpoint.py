"""Tests of producer.fl.checkpoint: safetensors + JSON round checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from producer.fl.checkpoint import Checkpoint, load_latest, save_checkpoint


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_a_saved_round_loads_back_bit_for_bit_in_state_dict_order(tmp_path: Path) -> None:
    w = _weights()
    state = {"step": torch.tensor(3), "m.0.weight": torch.ones(4, 3)}
    save_checkpoint(tmp_path, Checkpoint(5, w, state, {"seed": 7, "history": [{"round": 5}]}))
    ck = load_latest(tmp_path)
    assert ck is not None and ck.round == 5
    assert list(ck.weights) == list(w)
    assert all(torch.equal(ck.weights[k], w[k]) for k in w)
    assert torch.equal(ck.strategy_state["m.0.weight"], state["m.0.weight"])
    assert ck.metadata["seed"] == 7 and ck.metadata["history"] == [{"round": 5}]


def test_an_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None


def test_the_latest_round_wins_and_old_rounds_are_pruned(tmp_path: Path) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, Checkpoint(r, {"w": torch.full((2,), float(r))}), keep=2)
    ck = load_latest(tmp_path)
    assert ck is not None and ck.round == 4 and ck.weights["w"].tolist() == [4.0, 4.0]
    assert sorted(p.name for p in tmp_path.glob("round-*.json")) == [
        "round-0003.json",
        "round-0004.json",
    ]


def test_a_crash_before_the_pointer_moves_leaves_the_previous_round_loadable(
    tmp_path: Path,
) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.zeros(2)}))
    # a crash while writing round 2: its files are there, latest.json still names round 1
    (tmp_path / "round-0002.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "round-0002.json").write_text("{")
    ck = load_latest(tmp_path)
    assert ck is not None and ck.round == 1
    assert json.loads((tmp_path / "latest.json").read_text())["round"] == 1
