"""A device whose disk fills up during a command: ``STORE_FULL``, nothing of it kept.

The store's byte bound (``FEDPLAN_STORE_MAX_BYTES``) is one way to be full; the disk is the
other. Running out of space while a blob file is written, or while SQLite grows its index,
must roll the command back like any bound: a typed ``STORE_FULL`` error reply (kept for a
redelivery, like a bound's, when there is room for it), no new state, no result, no stray
file; the device serves the next command as if the failed one never ran.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

import consumer.store.units as units
from consumer.policy.tenancy import scoped
from consumer.runtime.device import LOCAL_SENDER, DeviceRuntime
from consumer.store.sqlite import SqliteStore
from schemas.command_pb2 import Command, RunPlan, StoreObject
from schemas.ir import SCHEMA_VERSION, ObjectId, Op, PlanIR, Ref
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_from_proto, tensor_to_proto
from schemas.value_codec import value_to_proto
from schemas.wire import decode_reply, encode_command
from tests.integration import commands as cmd


def _counter() -> PlanIR:
    """``x -> w.add_(x) * 2`` with state ``w = 0``: the k-th run returns 2k."""
    return PlanIR(
        name="counter",
        inputs=(Ref(0),),
        ops=[
            Op("Tensor.add_", (Ref(1), Ref(0)), {}, Ref(2)),
            Op("torch.mul", (Ref(2), 2.0), {}, Ref(3)),
        ],
        outputs=Ref(3),
        num_slots=4,
        state={"w": 1},
        state_values={"w": torch.zeros(1)},
    )


def _run(cid: str) -> bytes:
    args = ValueList(items=[value_to_proto(ObjectId("x"))])
    return encode_command(
        Command(
            schema_version=SCHEMA_VERSION,
            command_id=cid,
            device_id="alice",
            run_plan=RunPlan(plan_id="p", args=args, result_ids=[f"r-{cid}"], return_values=True),
        )
    )


def _device(data_dir: Path) -> tuple[DeviceRuntime, SqliteStore]:
    store = SqliteStore(data_dir)
    runtime = DeviceRuntime(device_id="alice", store=store)
    for data in (
        cmd.store_object("c-x", "alice", "x", torch.ones(1)),
        cmd.store_plan("c-p", "alice", _counter(), "p"),
    ):
        assert decode_reply(runtime.handle(data)).WhichOneof("outcome") == "ok"
    return runtime, store


def _count(data: bytes) -> float:
    reply = decode_reply(data)
    assert reply.WhichOneof("outcome") == "ok", reply
    return float(tensor_from_proto(reply.ok.objects[0].value).item())


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


def test_a_disk_full_while_a_command_writes_its_result_gets_store_full_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, store = _device(tmp_path)
    assert _count(runtime.handle(_run("c1"))) == 2.0
    real = units.write_tensor_file
    writes: list[str] = []

    def full_at_the_result(path: Path, tensor: torch.Tensor) -> None:
        writes.append(path.name)
        if not path.name.startswith("state-"):  # the new state went in; the result does not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensor)

    monkeypatch.setattr(units, "write_tensor_file", full_at_the_result)
    reply = decode_reply(runtime.handle(_run("c2")))
    assert reply.WhichOneof("outcome") == "error"
    assert reply.error.code == "STORE_FULL"
    assert "No space left" in reply.error.message
    assert len(writes) == 2  # the state was written, then the result failed
    assert not store.has_object(scoped(LOCAL_SENDER, "r-c2"))
    monkeypatch.setattr(units, "write_tensor_file", real)
    again = decode_reply(runtime.handle(_run("c2")))  # a redelivery: the same answer
    assert again.WhichOneof("outcome") == "error" and again.error.code == "STORE_FULL"
    assert _count(runtime.handle(_run("c3"))) == 4.0  # state as after c1: the 2nd run
    assert _count(SqliteStore(tmp_path).get_reply(scoped(LOCAL_SENDER, "c3")) or b"") == 4.0
    assert {p.name for p in (tmp_path / "blobs").iterdir()} == _referenced(tmp_path)


def test_sqlite_out_of_pages_during_a_command_gets_store_full_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    runtime, store = _device(tmp_path)
    db: Any = store._conn()
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    db.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLITE_FULL past two more pages
    data = encode_command(
        Command(
            schema_version=SCHEMA_VERSION,
            command_id="c-big",
            device_id="alice",
            store_object=StoreObject(
                id="y", tensor=tensor_to_proto(torch.ones(4)), tags=[f"#t{i}" for i in range(900)]
            ),
        )
    )
    reply = decode_reply(runtime.handle(data))
    assert reply.WhichOneof("outcome") == "error"
    assert reply.error.code == "STORE_FULL"
    assert not store.has_object(scoped(LOCAL_SENDER, "y"))
    # no room may be left even for the error reply
    kept = store.get_reply(scoped(LOCAL_SENDER, "c-big"))
    assert kept is None or decode_reply(kept).error.code == "STORE_FULL"
    db.execute(f"PRAGMA max_page_count = {10**9}")
    retry = data.replace(b"c-big", b"c-bi2")  # the server retries with a new command id
    assert decode_reply(runtime.handle(retry)).WhichOneof("outcome") == "ok"
    assert store.has_object(scoped(LOCAL_SENDER, "y"))
    assert _count(runtime.handle(_run("c3"))) == 2.0
    assert {p.name for p in (tmp_path / "blobs").iterdir()} == _referenced(tmp_path)
