"""Tests of the store's units (all of a command's writes or none) and its garbage collection."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from consumer.store.base import StoredObject, StoredPlan
from consumer.store.sqlite import SqliteStore
from consumer.store.tensor_files import write_bytes_file
from consumer.store.units import BlobUnits
from schemas.ir import Op, PlanIR, Ref


def _counter(w: torch.Tensor) -> PlanIR:
    return PlanIR(
        name="counter",
        inputs=(Ref(0),),
        state={"w": 1},
        state_values={"w": w},
        ops=[Op("Tensor.add_", (Ref(1), Ref(0)), {}, Ref(2))],
        outputs=Ref(2),
        num_slots=3,
    )


def _referenced(data_dir: Path) -> set[str]:
    db = sqlite3.connect(data_dir / "index.sqlite3")
    try:
        rows = db.execute(
            "SELECT blob FROM objects UNION ALL SELECT blob FROM plan_state "
            "UNION ALL SELECT file FROM replies WHERE file IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {r for (r,) in rows}


def _files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").iterdir()}


def _a_command(store: SqliteStore, command_id: str) -> None:
    """What a plan run writes: new state, a stored result, an in-place change, its reply."""
    plan = store.get_plan("p")
    plan.ir.state_values["w"].add_(1.0)
    store.save_plan_state(plan)
    store.put_object(StoredObject(f"result-{command_id}", torch.full((4,), 7.0)))
    store.get_object("x").tensor.mul_(2.0)
    store.put_reply(command_id, [f"result-{command_id}"], b"r" * 100_000)  # a file of its own


def _setup(data_dir: Path) -> SqliteStore:
    store = SqliteStore(data_dir)
    store.put_object(StoredObject("x", torch.ones(4)))
    store.put_plan(StoredPlan("p", _counter(torch.zeros(4))))
    return store


def _assert_untouched(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    assert torch.equal(store.get_plan("p").ir.state_values["w"], torch.zeros(4))
    assert torch.equal(store.get_object("x").tensor, torch.ones(4))
    assert not store.has_object("result-c1")
    assert store.get_reply("c1") is None
    assert _files(data_dir) == _referenced(data_dir)


def test_a_rolled_back_unit_leaves_no_rows_no_files_and_no_changes_in_memory(
    tmp_path: Path,
) -> None:
    store = _setup(tmp_path)
    store.begin()
    _a_command(store, "c1")
    store.rollback()
    assert torch.equal(store.get_plan("p").ir.state_values["w"], torch.zeros(4))
    assert torch.equal(store.get_object("x").tensor, torch.ones(4))
    assert not store.has_object("result-c1") and store.get_reply("c1") is None
    assert _files(tmp_path) == _referenced(tmp_path)
    _assert_untouched(tmp_path)


def test_a_committed_unit_keeps_every_write_and_deletes_the_files_it_replaced(
    tmp_path: Path,
) -> None:
    store = _setup(tmp_path)
    store.begin()
    _a_command(store, "c1")
    store.commit()
    again = SqliteStore(tmp_path)
    assert torch.equal(again.get_plan("p").ir.state_values["w"], torch.ones(4))
    assert torch.equal(again.get_object("x").tensor, torch.full((4,), 2.0))
    assert torch.equal(again.get_object("result-c1").tensor, torch.full((4,), 7.0))
    assert again.get_reply("c1") == b"r" * 100_000
    assert _files(tmp_path) == _referenced(tmp_path)


def _killed_in_unit(data_dir: str, where: str) -> None:
    store = SqliteStore(data_dir)
    store.begin()
    _a_command(store, "c1")
    if where == "before_commit":
        os._exit(9)
    store._unlink = lambda blobs: os._exit(9)  # type: ignore[method-assign]
    store.commit()  # committed; killed before the replaced files are deleted


def _kill_in_child(data_dir: Path, where: str) -> None:
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_killed_in_unit, args=(str(data_dir), where))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9


def test_a_process_killed_before_its_unit_commits_leaves_nothing_of_it(tmp_path: Path) -> None:
    _setup(tmp_path)
    _kill_in_child(tmp_path, "before_commit")
    assert _files(tmp_path) - _referenced(tmp_path)  # the dead unit's files are there...
    _assert_untouched(tmp_path)  # ...until the store opens again


def test_a_process_killed_after_commit_keeps_all_of_it_and_leaks_no_replaced_file(
    tmp_path: Path,
) -> None:
    _setup(tmp_path)
    _kill_in_child(tmp_path, "after_commit")
    assert _files(tmp_path) - _referenced(tmp_path)  # replaced files not deleted yet
    store = SqliteStore(tmp_path)
    assert torch.equal(store.get_plan("p").ir.state_values["w"], torch.ones(4))
    assert store.get_reply("c1") == b"r" * 100_000
    assert _files(tmp_path) == _referenced(tmp_path)


def test_a_failed_write_inside_a_unit_undoes_only_itself(tmp_path: Path) -> None:
    store = _setup(tmp_path)
    store.begin()
    store.put_object(StoredObject("kept", torch.ones(2)))
    with pytest.raises(RuntimeError), store._tx():
        store.put_object(StoredObject("dropped", torch.ones(2)))
        raise RuntimeError("boom")
    store.commit()
    assert store.has_object("kept") and not store.has_object("dropped")
    assert _files(tmp_path) == _referenced(tmp_path)


def test_temp_files_of_a_write_cut_short_are_collected_when_the_store_opens(
    tmp_path: Path,
) -> None:
    _setup(tmp_path)
    (tmp_path / "blobs" / ".tmp-abandoned").write_bytes(b"x" * 10)
    assert SqliteStore(tmp_path).collect_garbage() == 0  # the open collected it already
    assert _files(tmp_path) == _referenced(tmp_path)


def test_a_blob_file_cut_short_under_its_final_name_is_collected_and_never_read(
    tmp_path: Path,
) -> None:
    store = _setup(tmp_path)
    store.begin()
    with store._tx():  # a command killed half-way through writing its result's file
        name = store._new_file("y", "", torch.ones(4))
    (tmp_path / "blobs" / name).write_bytes(b"\x00\x00")  # cut short
    store._conn().close()  # the process dies before COMMIT: no row names the file
    reopened = SqliteStore(tmp_path)
    assert not reopened.has_object("y")
    assert name not in _files(tmp_path)
    assert torch.equal(reopened.get_object("x").tensor, torch.ones(4))


def test_a_blob_file_is_never_written_over(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    write_bytes_file(path, b"committed")
    with pytest.raises(FileExistsError):
        write_bytes_file(path, b"other")
    assert path.read_bytes() == b"committed"


def test_blob_units_refuse_a_second_unit_on_the_same_thread(tmp_path: Path) -> None:
    units = BlobUnits(tmp_path)
    units.begin()
    with pytest.raises(RuntimeError, match="already open"):
        units.begin()
    units.rollback()


def test_a_failed_store_call_outside_a_unit_keeps_earlier_in_place_changes(
    tmp_path: Path,
) -> None:
    store = _setup(tmp_path)
    store.get_object("x").tensor.add_(1.0)  # not flushed yet
    with pytest.raises(KeyError):
        store.delete_object("missing")  # its own unit, rolled back
    store.flush()
    assert torch.equal(SqliteStore(tmp_path).get_object("x").tensor, torch.full((4,), 2.0))


class _Alarm(BaseException):
    """Stands for the time-limit alarm, which may arrive between any two bytecodes."""


class _AlarmRightAfterBegin(BlobUnits):
    """Raises ``_Alarm`` once, just after ``BEGIN IMMEDIATE`` has taken effect."""

    armed = True

    def _conn(self) -> sqlite3.Connection:
        conn = super()._conn()
        units = self

        class _Proxy:
            @property
            def in_transaction(self) -> bool:
                return conn.in_transaction

            def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
                cursor = conn.execute(sql, *args)
                if sql == "BEGIN IMMEDIATE" and units.armed:
                    units.armed = False
                    raise _Alarm
                return cursor

        return _Proxy()  # type: ignore[return-value]


def test_an_alarm_just_after_begin_rolls_back_cleanly_and_frees_the_store_for_others(
    tmp_path: Path,
) -> None:
    units = _AlarmRightAfterBegin(tmp_path)
    units.begin()
    with pytest.raises(_Alarm), units._tx():
        pass
    units.rollback()  # the transaction was open: this ends it and releases the lock once
    done = threading.Event()

    def another_unit() -> None:
        units.begin()
        with units._tx():
            pass
        units.commit()
        done.set()

    worker = threading.Thread(target=another_unit, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "the store's unit lock was left held"

