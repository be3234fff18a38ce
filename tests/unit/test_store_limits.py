"""Tests of the device store's bounds: stored bytes, cached replies, memory, plan size."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

import consumer.store.memory as memory_module
import consumer.store.sqlite as sqlite_module
from broker_config.settings import Settings
from consumer.policy.tenancy import scoped
from consumer.runtime.device import DeviceRuntime
from consumer.store.base import StoredObject, StoredPlan
from consumer.store.limits import StoreLimits
from consumer.store.memory import MemoryStore
from consumer.store.sqlite import SqliteStore
from schemas import command_pb2 as cmd
from schemas.errors import StoreFullError
from schemas.ir import ObjectId, Op, PlanIR, Ref
from schemas.plan_codec import plan_to_proto
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_from_proto, tensor_to_proto
from schemas.value_codec import value_to_proto
from schemas.wire import decode_reply, encode_command, new_id

MIB = 1024 * 1024


def _stores(tmp_path: Path, **limits: Any) -> list[Any]:
    return [
        SqliteStore(tmp_path, limits=StoreLimits(**limits)),
        MemoryStore(limits=StoreLimits(**limits)),
    ]


# -- the stores --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 1], ids=["sqlite", "memory"])
def test_cached_replies_are_capped_by_bytes_oldest_first(tmp_path: Path, kind: int) -> None:
    store = _stores(tmp_path, max_reply_bytes=250_000)[kind]
    for i in range(3):
        store.put_reply(f"c{i}", [], bytes([i]) * 100_000)
    assert store.get_reply("c0") is None
    assert store.get_reply("c1") == b"\x01" * 100_000
    assert store.get_reply("c2") == b"\x02" * 100_000
    with pytest.raises(StoreFullError, match="FEDPLAN_STORE_MAX_REPLY_BYTES"):
        store.put_reply("huge", [], b"x" * 250_001)
    assert store.get_reply("huge") is None and store.get_reply("c2") is not None


def test_a_dropped_reply_frees_its_disk_space(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, limits=StoreLimits(max_reply_bytes=3 * MIB))
    for i in range(20):
        store.put_reply(f"c{i}", [], b"v" * MIB)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "blobs").iterdir())
    assert on_disk <= 3 * MIB
    assert (tmp_path / "index.sqlite3").stat().st_size < MIB  # big replies live in files


@pytest.mark.parametrize("kind", [0, 1], ids=["sqlite", "memory"])
def test_cached_replies_are_capped_by_count(tmp_path: Path, kind: int) -> None:
    store = _stores(tmp_path, max_replies=2)[kind]
    for i in range(3):
        store.put_reply(f"c{i}", [], b"r")
    assert [store.get_reply(f"c{i}") for i in range(3)] == [None, b"r", b"r"]


def test_a_cached_reply_expires_after_its_time_to_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(sqlite_module.time, "time", lambda: now[0])
    store = SqliteStore(tmp_path, limits=StoreLimits(reply_ttl=3600.0))
    store.put_reply("old", [], b"o" * 100_000)
    now[0] += 1800
    store.put_reply("new", [], b"n")
    now[0] += 1801  # "old" is 3601 s old, "new" 1801 s
    store.expire_replies()
    assert store.get_reply("old") is None and store.get_reply("new") == b"n"
    assert not [p for p in (tmp_path / "blobs").iterdir() if p.name.startswith("reply-")]
    now[0] += 3600
    SqliteStore(tmp_path, limits=StoreLimits(reply_ttl=3600.0))  # opening expires too
    assert store.get_reply("new") is None


def test_a_cached_reply_in_memory_expires_after_its_time_to_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [500.0]
    monkeypatch.setattr(memory_module.time, "monotonic", lambda: now[0])
    store = MemoryStore(limits=StoreLimits(reply_ttl=60.0))
    store.put_reply("old", [], b"o" * 1000)
    now[0] += 61
    assert store.get_reply("old") is None
    store.put_reply("new", [], b"n")  # storing drops the expired ones
    assert store.stored_bytes() == 1


@pytest.mark.parametrize("kind", [0, 1], ids=["sqlite", "memory"])
def test_a_write_over_the_stored_bytes_bound_is_refused_and_stores_nothing(
    tmp_path: Path, kind: int
) -> None:
    store = _stores(tmp_path, max_bytes=1000)[kind]
    store.put_object(StoredObject("a", torch.zeros(200)))  # 800 bytes
    with pytest.raises(StoreFullError, match="FEDPLAN_STORE_MAX_BYTES"):
        store.put_object(StoredObject("b", torch.zeros(100)))
    assert not store.has_object("b")
    store.put_object(StoredObject("a", torch.ones(250)))  # replacing frees the old bytes
    with pytest.raises(StoreFullError):
        store.put_plan(StoredPlan("p", _counter(torch.zeros(10))))
    store.delete_object("a")
    store.put_object(StoredObject("b", torch.zeros(100)))
    assert store.stored_bytes() == 400


def test_stored_tensors_held_in_memory_stay_under_the_cache_bound(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, limits=StoreLimits(cache_bytes=3 * MIB))
    values = {f"t{i}": torch.full((MIB // 4,), float(i)) for i in range(10)}  # 1 MiB each
    for object_id, t in values.items():
        store.put_object(StoredObject(object_id, t))
    assert store.cached_bytes() <= 3 * MIB
    for object_id, t in values.items():  # each read in a unit, as commands do
        store.begin()
        assert torch.equal(store.get_object(object_id).tensor, t)
        store.commit()
        assert store.cached_bytes() <= 3 * MIB


def test_tensors_that_require_grad_or_changed_in_place_are_never_dropped_from_memory(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path, limits=StoreLimits(cache_bytes=0))
    w = torch.ones(4, requires_grad=True)
    store.put_object(StoredObject("w", w))
    (w * 2).sum().backward()
    store.put_object(StoredObject("plain", torch.ones(4)))
    changed = store.get_object("plain").tensor
    changed.add_(1)
    store.put_object(StoredObject("other", torch.ones(4)))
    assert store.get_object("w").tensor is w and w.grad is not None
    assert store.get_object("plain").tensor is changed
    store.flush()
    store.put_object(StoredObject("more", torch.ones(4)))  # now "plain" may go...
    assert torch.equal(store.get_object("plain").tensor, torch.full((4,), 2.0))  # ...not lost


def test_a_store_written_before_sizes_were_kept_opens_with_its_sizes_filled_in(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.executescript(
        """
        CREATE TABLE objects (id TEXT PRIMARY KEY, dtype TEXT NOT NULL, shape TEXT NOT NULL,
            requires_grad INTEGER NOT NULL, description TEXT NOT NULL, blob TEXT NOT NULL,
            seq INTEGER NOT NULL);
        CREATE TABLE replies (command_id TEXT PRIMARY KEY, result_ids TEXT NOT NULL,
            reply BLOB NOT NULL, seq INTEGER NOT NULL);
        INSERT INTO objects VALUES ('x', 'float32', '[2, 3]', 0, '', 'x.bin', 1);
        INSERT INTO replies VALUES ('c1', '[]', x'0102', 2);
        """
    )
    db.close()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "x.bin").write_bytes(torch.zeros(6).numpy().tobytes())
    store = SqliteStore(tmp_path)
    assert store.stored_bytes() == 24 + 2
    assert store.get_reply("c1") == b"\x01\x02"
    assert torch.equal(store.get_object("x").tensor, torch.zeros(2, 3))


def test_store_limits_come_from_fedplan_settings() -> None:
    env = {"FEDPLAN_STORE_MAX_BYTES": "12345", "FEDPLAN_STORE_REPLY_TTL": "60"}
    limits = StoreLimits.from_settings(Settings.from_env(env))
    assert limits.max_bytes == 12345 and limits.reply_ttl == 60.0
    assert StoreLimits() == StoreLimits.from_settings(Settings())


# -- the runtime -------------------------------------------------------------------------


def _counter(w: torch.Tensor) -> PlanIR:
    """x -> w.add_(x): the plan's state grows by x at every run."""
    return PlanIR(
        name="counter",
        inputs=(Ref(0),),
        state={"w": 1},
        state_values={"w": w},
        ops=[
            Op("Tensor.add_", (Ref(1), Ref(0)), {}, Ref(2)),
            Op("torch.mul", (Ref(2), 1.0), {}, Ref(3)),
        ],
        outputs=Ref(3),
        num_slots=4,
    )


def _send(runtime: DeviceRuntime, body: str, msg: Any) -> cmd.Reply:
    command = cmd.Command(command_id=new_id(), device_id="d1")
    getattr(command, body).CopyFrom(msg)
    return decode_reply(runtime.handle(encode_command(command)))


def _ok(reply: cmd.Reply) -> cmd.Ok:
    assert reply.WhichOneof("outcome") == "ok", reply.error
    return reply.ok


def _device(tmp_path: Path, **limits: Any) -> DeviceRuntime:
    store = SqliteStore(tmp_path, limits=StoreLimits(**limits))
    runtime = DeviceRuntime(device_id="d1", store=store, limits=StoreLimits(**limits))
    _ok(
        _send(
            runtime,
            "store_object",
            cmd.StoreObject(id="x", tensor=tensor_to_proto(torch.ones(1000))),
        )
    )
    plan = plan_to_proto(_counter(torch.zeros(1000)), plan_id="p")
    _ok(_send(runtime, "store_plan", cmd.StorePlan(plan=plan)))
    return runtime


def _run(runtime: DeviceRuntime, *, return_values: bool = True) -> cmd.Reply:
    msg = cmd.RunPlan(
        plan_id="p",
        args=ValueList(items=[value_to_proto(ObjectId("x"))]),
        result_ids=[new_id()],
        return_values=return_values,
    )
    return _send(runtime, "run_plan", msg)


def _state(runtime: DeviceRuntime) -> torch.Tensor:
    return runtime.store.get_plan(scoped("local", "p")).ir.state_values["w"]


def test_a_run_whose_results_do_not_fit_gets_store_full_and_changes_no_state(
    tmp_path: Path,
) -> None:
    runtime = _device(tmp_path, max_bytes=20_000)  # x, the plan and its state: ~12 KB
    _ok(_run(runtime, return_values=False))  # one 4 KB result fits
    assert torch.equal(_state(runtime), torch.ones(1000))
    reply = _run(runtime, return_values=False)  # the next one does not
    assert reply.error.code == "STORE_FULL", reply
    assert torch.equal(_state(runtime), torch.ones(1000))  # the refused run left no trace
    assert torch.equal(
        SqliteStore(tmp_path).get_plan(scoped("local", "p")).ir.state_values["w"], torch.ones(1000)
    )
    _ok(_send(runtime, "delete_objects", cmd.DeleteObjects(ids=[reply.result_ids[0]])))
    found = _ok(_send(runtime, "list_objects", cmd.ListObjects()))
    _ok(
        _send(
            runtime,
            "delete_objects",
            cmd.DeleteObjects(ids=[o.id for o in found.objects if o.id != "x"]),
        )
    )
    _ok(_run(runtime, return_values=False))  # the device keeps serving
    assert torch.equal(_state(runtime), torch.full((1000,), 2.0))


def test_a_reply_too_big_to_cache_is_refused_and_the_command_changed_nothing(
    tmp_path: Path,
) -> None:
    runtime = _device(tmp_path, max_reply_bytes=3000)
    reply = _run(runtime)  # a 4000-byte value in the reply
    assert reply.error.code == "STORE_FULL"
    assert "FEDPLAN_STORE_MAX_REPLY_BYTES" in reply.error.message
    assert torch.equal(_state(runtime), torch.zeros(1000))
    assert not runtime.store.has_object(scoped("local", reply.result_ids[0]))
    ok = _ok(_run(runtime, return_values=False))
    assert torch.equal(_state(runtime), torch.ones(1000))
    value = _ok(_send(runtime, "get_object", cmd.GetObject(id=ok.objects[0].id)))
    assert torch.equal(tensor_from_proto(value.objects[0].value), torch.ones(1000))


@pytest.mark.parametrize("limit", [{"max_plan_ops": 1}, {"max_plan_bytes": 1000}])
def test_a_plan_over_the_size_limits_is_refused_on_receipt(
    tmp_path: Path, limit: dict[str, int]
) -> None:
    runtime = DeviceRuntime(device_id="d1", store=MemoryStore(), limits=StoreLimits(**limit))
    plan = plan_to_proto(_counter(torch.zeros(1000)), plan_id="p")
    reply = _send(runtime, "store_plan", cmd.StorePlan(plan=plan))
    assert reply.error.code == "PLAN_TOO_LARGE"
    assert reply.error.plan_name == "counter"
    assert not runtime.store.has_plan(scoped("local", "p"))
    one_op = PlanIR(
        name="abs",
        inputs=(Ref(0),),
        ops=[Op("torch.abs", (Ref(0),), {}, Ref(1))],
        outputs=Ref(1),
        num_slots=2,
    )
    _ok(_send(runtime, "store_plan", cmd.StorePlan(plan=plan_to_proto(one_op, plan_id="q"))))


def test_the_running_byte_totals_match_a_recount_after_replaces_and_deletes(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path)
    store.put_object(StoredObject("a", torch.zeros(4)))
    store.put_object(StoredObject("a", torch.zeros(8)))  # replaced: 32 bytes, not 48
    store.put_object(StoredObject("b", torch.zeros(2)))
    store.delete_object("b")
    store.put_plan(StoredPlan("p", _counter(torch.zeros(10))))
    plan = store.get_plan("p")
    plan.ir.state_values["w"].add_(1)
    store.save_plan_state(plan)  # the state row is replaced
    store.put_reply("c1", [], b"r" * 100_000)
    store.put_reply("c1", [], b"r" * 10)  # replaced
    total = store.stored_bytes()
    assert total == SqliteStore(tmp_path).stored_bytes()  # opening recounts from the rows
    assert total - 32 - 40 - 10 > 0  # the plan's encoded size is the rest


class _CommitFailsOnce(SqliteStore):
    failed = True  # armed once opened

    def commit(self) -> None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        super().commit()


def test_a_command_whose_commit_fails_gets_an_error_reply_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    store = _CommitFailsOnce(tmp_path)
    store.failed = False
    runtime = DeviceRuntime(device_id="d1", store=store)
    msg = cmd.StoreObject(id="y", tensor=tensor_to_proto(torch.ones(3)))
    reply = _send(runtime, "store_object", msg)
    assert reply.error.code == "DEVICE_ERROR" and "disk I/O error" in reply.error.message
    assert not runtime.store.has_object(scoped("local", "y"))
    assert not list((tmp_path / "blobs").iterdir())
    _ok(_send(runtime, "store_object", msg))  # the device keeps serving
    assert torch.equal(SqliteStore(tmp_path).get_object(scoped("local", "y")).tensor, torch.ones(3))
