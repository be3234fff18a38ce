"""Tests of the persistent SQLite device store."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from consumer.store.base import StoredObject, StoredPlan
from consumer.store.sqlite import SqliteStore
from schemas.errors import ObjectNotFound
from schemas.ir import Op, PlanIR, Ref


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.tensor(2.5),
        torch.empty(0, 3),
        torch.tensor([True, False]),
        torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # non-contiguous
        torch.randn(5).to(torch.bfloat16),
        torch.randn(2, dtype=torch.complex64),
        torch.randint(0, 255, (4,), dtype=torch.uint8),
    ],
)
def test_a_stored_tensor_comes_back_equal_after_reopening_the_store(
    tmp_path: Path, tensor: torch.Tensor
) -> None:
    SqliteStore(tmp_path).put_object(StoredObject("x", tensor, ("#a",), "desc"))
    got = SqliteStore(tmp_path).get_object("x")
    assert got.tensor.dtype == tensor.dtype
    assert got.tensor.shape == tensor.shape
    assert torch.equal(got.tensor, tensor)
    assert got.tags == ("#a",) and got.description == "desc"


def test_requires_grad_survives_a_restart(tmp_path: Path) -> None:
    SqliteStore(tmp_path).put_object(StoredObject("w", torch.ones(2, requires_grad=True)))
    got = SqliteStore(tmp_path).get_object("w").tensor
    assert got.requires_grad and got.is_leaf
    assert torch.equal(got.detach(), torch.ones(2))


def test_in_place_changes_act_on_the_stored_object_and_persist_after_flush(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path)
    store.put_object(StoredObject("w", torch.zeros(3)))
    store.get_object("w").tensor.add_(2)  # would fail on a read-only buffer
    assert torch.equal(store.get_object("w").tensor, torch.full((3,), 2.0))
    assert torch.equal(SqliteStore(tmp_path).get_object("w").tensor, torch.zeros(3))
    assert store.flush() == 1
    assert store.flush() == 0
    assert torch.equal(SqliteStore(tmp_path).get_object("w").tensor, torch.full((3,), 2.0))


def test_storing_a_reply_first_writes_back_what_the_command_changed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    store.put_object(StoredObject("w", torch.zeros(2)))
    store.get_object("w").tensor.sub_(1)
    store.put_reply("c1", ["w"], b"reply")
    reopened = SqliteStore(tmp_path)
    assert reopened.get_reply("c1") == b"reply"
    assert torch.equal(reopened.get_object("w").tensor, -torch.ones(2))


def test_an_object_replaced_by_another_process_is_reloaded(tmp_path: Path) -> None:
    first, second = SqliteStore(tmp_path), SqliteStore(tmp_path)
    first.put_object(StoredObject("x", torch.zeros(2)))
    assert torch.equal(second.get_object("x").tensor, torch.zeros(2))
    first.put_object(StoredObject("x", torch.ones(4)))
    assert torch.equal(second.get_object("x").tensor, torch.ones(4))
    second.get_object("x").tensor.mul_(5)
    first.put_object(StoredObject("x", torch.full((1,), 7.0)))
    assert second.flush() == 0  # a stale in-memory copy never overwrites a newer row
    assert torch.equal(first.get_object("x").tensor, torch.full((1,), 7.0))


def test_search_returns_objects_carrying_every_tag_in_insertion_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    store.put_object(StoredObject("a", torch.zeros(1), ("#x", "#y")))
    store.put_object(StoredObject("b", torch.zeros(1), ("#x",)))
    store.put_object(StoredObject("c", torch.zeros(1), ("#y", "#x")))
    assert [o.id for o in store.search(["#x", "#y"])] == ["a", "c"]
    assert [o.id for o in store.search(["#x"])] == ["a", "b", "c"]
    assert store.search(["#nothing"]) == []


def test_a_missing_or_deleted_object_raises_object_not_found(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    store.put_object(StoredObject("a", torch.zeros(1)))
    store.delete_object("a")
    assert not store.has_object("a")
    with pytest.raises(ObjectNotFound):
        store.get_object("a")
    with pytest.raises(ObjectNotFound):
        store.delete_object("a")
    assert [p for p in (tmp_path / "blobs").iterdir()] == []


def test_clear_objects_empties_the_store_and_its_files(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    for i in range(3):
        store.put_object(StoredObject(str(i), torch.full((2,), float(i)), ("#t",)))
    store.clear_objects()
    assert store.list_objects() == [] and store.search(["#t"]) == []
    assert list((tmp_path / "blobs").iterdir()) == []


def test_replies_are_kept_by_command_id_and_the_oldest_are_dropped(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, max_replies=2)
    for i in range(3):
        store.put_reply(f"c{i}", [f"r{i}"], bytes([i]))
    assert store.get_reply("c0") is None
    assert SqliteStore(tmp_path).get_reply("c2") == b"\x02"


def _writer(path: str, start: int) -> None:
    store = SqliteStore(path)
    for i in range(start, start + 20):
        store.put_object(StoredObject(f"o{i}", torch.full((3,), float(i)), ("#p",)))


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in (0, 100)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    objs = SqliteStore(tmp_path).search(["#p"])
    assert len(objs) == 40
    for o in objs:
        assert torch.equal(o.tensor, torch.full((3,), float(o.id[1:])))


def test_a_plan_and_its_updated_state_survive_a_restart(tmp_path: Path) -> None:
    w = torch.randn(2)
    ir = PlanIR(
        name="scale",
        inputs=(Ref(0),),
        ops=[Op("torch.mul", (Ref(0), Ref(1)), {}, Ref(2))],
        outputs=Ref(2),
        num_slots=3,
        state={"w": 1},
        state_values={"w": w},
    )
    store = SqliteStore(tmp_path)
    plan = StoredPlan("p1", ir, "hash", ("#plan",))
    store.put_plan(plan)
    plan.ir.state_values["w"] = w * 3
    store.save_plan_state(plan)
    got = SqliteStore(tmp_path).get_plan("p1")
    assert torch.equal(got.ir.state_values["w"], w * 3)
    assert got.ir.ops[0].target == "torch.mul"
    assert got.content_hash == "hash" and got.tags == ("#plan",)
    store.delete_plan("p1")
    assert not store.has_plan("p1")
    with pytest.raises(ObjectNotFound):
        store.get_plan("p1")


def _counter_plan(w: torch.Tensor) -> PlanIR:
    """``x -> w.add_(x)``: state ``w`` changed in place by every run."""
    return PlanIR(
        name="accumulate",
        inputs=(Ref(0),),
        ops=[Op("Tensor.add_", (Ref(1), Ref(0)), {}, Ref(2))],
        outputs=Ref(2),
        num_slots=3,
        state={"w": 1},
        state_values={"w": w},
    )


def _writes(store: SqliteStore) -> tuple[int, frozenset[str]]:
    """The store's write counter and its blob files: both move with every write."""
    n = store._conn().execute("SELECT n FROM counter").fetchone()[0]
    return int(n), frozenset(p.name for p in store.blob_dir.iterdir())


def test_saving_the_state_of_a_plan_whose_state_did_not_change_writes_nothing(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path)
    plan = StoredPlan("p", _counter_plan(torch.zeros(3)))
    store.put_plan(plan)
    before = _writes(store)
    for _ in range(3):
        plan.ir.state_values["w"] + 1  # an out-of-place op reads the state, changes nothing
        store.save_plan_state(plan)
    assert _writes(store) == before
    restarted = SqliteStore(tmp_path)
    restarted.save_plan_state(restarted.get_plan("p"))  # a freshly loaded plan is unchanged
    assert _writes(store) == before


def test_only_the_state_changed_in_place_is_written_and_it_survives_a_restart(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path)
    w, b = torch.randn(4), torch.randn(2)
    ir = _counter_plan(w.clone())
    ir.state["b"] = 3
    ir.num_slots = 4
    ir.state_values["b"] = b.clone()
    plan = StoredPlan("p", ir)
    store.put_plan(plan)
    n0, files0 = _writes(store)
    x = torch.randn(4)
    for _ in range(2):
        plan.ir.state_values["w"].add_(x)
        store.save_plan_state(plan)
    n1, files1 = _writes(store)
    assert len(files1 - files0) == 1 and len(files0 - files1) == 0  # one state file, replaced
    got = SqliteStore(tmp_path).get_plan("p").ir.state_values
    assert torch.allclose(got["w"], w + x + x)
    assert torch.equal(got["b"], b)
    assert n1 > n0


def test_another_process_sees_the_state_a_run_changed(tmp_path: Path) -> None:
    w = torch.randn(3)
    first, second = SqliteStore(tmp_path), SqliteStore(tmp_path)
    first.put_plan(StoredPlan("p", _counter_plan(w.clone())))
    assert torch.equal(second.get_plan("p").ir.state_values["w"], w)  # cached in `second`
    mine = first.get_plan("p")
    mine.ir.state_values["w"].mul_(2)
    first.save_plan_state(mine)
    assert torch.equal(second.get_plan("p").ir.state_values["w"], w * 2)


def test_deleting_or_storing_a_plan_again_removes_its_saved_state_files(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    plan = StoredPlan("p", _counter_plan(torch.zeros(2)))
    store.put_plan(plan)
    plan.ir.state_values["w"].add_(1)
    store.save_plan_state(plan)
    assert any(store.blob_dir.iterdir())
    fresh = torch.full((2,), 5.0)
    store.put_plan(StoredPlan("p", _counter_plan(fresh.clone())))
    assert not any(store.blob_dir.iterdir())
    assert torch.equal(SqliteStore(tmp_path).get_plan("p").ir.state_values["w"], fresh)
    again = store.get_plan("p")
    again.ir.state_values["w"].add_(1)
    store.save_plan_state(again)
    store.delete_plan("p")
    assert not any(store.blob_dir.iterdir())
