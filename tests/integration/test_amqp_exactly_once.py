"""Real Celery workers killed at every step between "ran" and "reply stored": nothing runs twice.

The worker (tests/integration/crash_points_app.py) kills its pool process once at each listed
point; Celery requeues the command and the next pool process runs it again. Whatever the
point, the command's effects must be there exactly once, with one reply, and no blob file
of a dead transaction may be left behind.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from producer.transport.amqp import AmqpTransport
from schemas.command_pb2 import Command, DeleteObjects, GetObject, MoveObject, Reply, RunOp
from schemas.ir import SCHEMA_VERSION, ObjectId
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_from_proto
from schemas.value_codec import value_to_proto
from schemas.wire import encode_command, new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess
from tests.integration.test_amqp_durability import _accumulate

pytestmark = pytest.mark.rabbitmq

APP = "tests.integration.crash_points_app"
LIMIT = 20  # deliveries: one command is killed several times here, on purpose


@pytest.fixture
def limit_transport(vhost: RunVhost, replies: Replies) -> Iterator[AmqpTransport]:
    settings = vhost.settings.replace(producer_id=f"t{secrets.token_hex(4)}", delivery_limit=LIMIT)
    t = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    yield t
    t.close()


def _crashing(
    workers: Callable[..., WorkerProcess], tmp_path: Path, device: str, points: list[str]
) -> tuple[WorkerProcess, Path]:
    flags = tmp_path / f"flags-{device}"
    flags.mkdir()
    env = {
        "FEDPLAN_TEST_CRASH_AT": ",".join(points),
        "FEDPLAN_TEST_CRASH_FLAGS": str(flags),
        "FEDPLAN_DELIVERY_LIMIT": str(LIMIT),
    }
    return workers(device, env=env, app=APP), flags


def _send(t: AmqpTransport, replies: Replies, device: str, data: bytes, cid: str) -> Reply:
    t.publish(device, data, command_id=cid)
    return replies.wait(cid, 120.0)


def _ok(reply: Reply) -> Reply:
    assert reply.WhichOneof("outcome") == "ok", reply
    return reply


def _value(t: AmqpTransport, replies: Replies, device: str, object_id: str) -> torch.Tensor:
    cid = new_id()
    reply = _ok(_send(t, replies, device, cmd.get_object(cid, device, object_id), cid))
    return tensor_from_proto(reply.ok.objects[0].value)


def _no_orphan_files(data_dir: Path) -> None:
    db = sqlite3.connect(data_dir / "index.sqlite3")
    try:
        rows = db.execute(
            "SELECT blob FROM objects UNION ALL SELECT blob FROM plan_state "
            "UNION ALL SELECT file FROM replies WHERE file IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    assert {p.name for p in (data_dir / "blobs").iterdir()} == {r for (r,) in rows}


def _crashed_at_each(flags: Path, points: list[str], worker: WorkerProcess) -> None:
    assert sorted(p.name for p in flags.iterdir()) == sorted(points)
    assert worker.log_tail(2000).count("WorkerLostError") >= len(points)


def test_a_plan_run_killed_at_every_step_before_its_reply_is_stored_changes_state_once(
    workers: Callable[..., WorkerProcess],
    limit_transport: AmqpTransport,
    replies: Replies,
    tmp_path: Path,
) -> None:
    points = [
        f"run_plan:{p}"
        for p in ("ran", "state_saved", "results_stored", "reply_stored", "committed")
    ]
    ivan, flags = _crashing(workers, tmp_path, "ivan", points)
    t = limit_transport
    t.ensure_device("ivan")
    w, x = torch.randn(6), torch.randn(6)
    for data_of in (
        lambda c: cmd.store_object(c, "ivan", "x", x),
        lambda c: cmd.store_plan(c, "ivan", _accumulate(w.clone()), "acc"),
    ):
        cid = new_id()
        _ok(_send(t, replies, "ivan", data_of(cid), cid))
    cid = new_id()
    reply = _ok(_send(t, replies, "ivan", cmd.run_plan(cid, "ivan", "acc", ["x"], ["y"]), cid))
    eager = w.clone()
    assert torch.allclose(tensor_from_proto(reply.ok.objects[0].value), eager.add_(x) * 2)
    _crashed_at_each(flags, points, ivan)
    assert replies.count(cid) == 1
    cid = new_id()  # the state grew by x once: the next run sees w + x
    again = _ok(_send(t, replies, "ivan", cmd.run_plan(cid, "ivan", "acc", ["x"], ["z"]), cid))
    assert torch.allclose(tensor_from_proto(again.ok.objects[0].value), eager.add_(x) * 2)
    assert torch.allclose(_value(t, replies, "ivan", "y"), (w + x) * 2)
    _no_orphan_files(ivan.data_dir)


def test_an_in_place_op_killed_at_every_step_before_its_reply_is_stored_applies_once(
    workers: Callable[..., WorkerProcess],
    limit_transport: AmqpTransport,
    replies: Replies,
    tmp_path: Path,
) -> None:
    points = [f"run_op:{p}" for p in ("ran", "results_stored", "reply_stored", "committed")]
    jack, flags = _crashing(workers, tmp_path, "jack", points)
    t = limit_transport
    t.ensure_device("jack")
    x = torch.arange(5.0)
    cid = new_id()
    _ok(_send(t, replies, "jack", cmd.store_object(cid, "jack", "x", x), cid))
    cid = new_id()
    op = RunOp(
        target="Tensor.add_",
        args=ValueList(items=[value_to_proto(ObjectId("x")), value_to_proto(1.0)]),
        result_ids=["y"],
        return_values=True,
    )
    data = encode_command(
        Command(schema_version=SCHEMA_VERSION, command_id=cid, device_id="jack", run_op=op)
    )
    reply = _ok(_send(t, replies, "jack", data, cid))
    assert torch.equal(tensor_from_proto(reply.ok.objects[0].value), x + 1)
    _crashed_at_each(flags, points, jack)
    assert replies.count(cid) == 1
    assert torch.equal(_value(t, replies, "jack", "x"), x + 1)
    assert torch.equal(_value(t, replies, "jack", "y"), x + 1)
    _no_orphan_files(jack.data_dir)


def test_a_move_killed_at_every_step_before_its_reply_is_stored_moves_the_object_once(
    workers: Callable[..., WorkerProcess],
    limit_transport: AmqpTransport,
    replies: Replies,
    tmp_path: Path,
) -> None:
    points = [f"move_object:{p}" for p in ("forwarded", "reply_stored", "committed")]
    kim, flags = _crashing(workers, tmp_path, "kim", points)
    workers("lou")
    t = limit_transport
    t.ensure_device("kim")
    t.ensure_device("lou")
    x = torch.randn(3, 2)
    cid = new_id()
    _ok(_send(t, replies, "kim", cmd.store_object(cid, "kim", "x", x, ("#moved",)), cid))
    cid = new_id()
    move = MoveObject(id="x", destination_device="lou", new_id="x2")
    data = encode_command(
        Command(schema_version=SCHEMA_VERSION, command_id=cid, device_id="kim", move_object=move)
    )
    reply = _ok(_send(t, replies, "kim", data, cid))
    assert list(reply.ok.objects[0].shape) == [3, 2]
    _crashed_at_each(flags, points, kim)
    assert replies.count(cid) == 1
    forwarded = f"{cid}.moved"  # every repeat of the move forwarded the same command...
    replies.wait(forwarded, 60.0)
    assert torch.equal(_value(t, replies, "lou", "x2"), x)
    gone = new_id()
    missing = _send(t, replies, "kim", cmd.get_object(gone, "kim", "x"), gone)
    assert missing.error.code == "NOT_FOUND"
    _no_orphan_files(kim.data_dir)


def test_deletes_killed_at_every_step_and_during_collection_at_open_delete_once(
    workers: Callable[..., WorkerProcess],
    limit_transport: AmqpTransport,
    replies: Replies,
    tmp_path: Path,
) -> None:
    points = [
        *(f"get_object:{p}" for p in ("deleted", "reply_stored", "committed")),
        *(f"delete_objects:{p}" for p in ("deleted", "reply_stored", "committed")),
        "open:collecting",  # the next pool process dies half-way through collecting orphans
    ]
    mia, flags = _crashing(workers, tmp_path, "mia", points)
    t = limit_transport
    t.ensure_device("mia")
    x = torch.randn(20_000)  # its get() reply is a file of its own (over 64 KiB)
    for object_id, value in (("x", x), ("y", torch.ones(3)), ("z", torch.zeros(2))):
        cid = new_id()
        _ok(_send(t, replies, "mia", cmd.store_object(cid, "mia", object_id, value), cid))
    get_cid = new_id()
    get = Command(
        schema_version=SCHEMA_VERSION,
        command_id=get_cid,
        device_id="mia",
        get_object=GetObject(id="x", delete=True),
    )
    reply = _ok(_send(t, replies, "mia", encode_command(get), get_cid))
    assert torch.equal(tensor_from_proto(reply.ok.objects[0].value), x)
    del_cid = new_id()
    delete = Command(
        schema_version=SCHEMA_VERSION,
        command_id=del_cid,
        device_id="mia",
        delete_objects=DeleteObjects(ids=["y"]),
    )
    _ok(_send(t, replies, "mia", encode_command(delete), del_cid))
    _crashed_at_each(flags, points, mia)
    assert replies.count(get_cid) == 1 and replies.count(del_cid) == 1
    for gone in ("x", "y"):
        cid = new_id()
        assert _send(t, replies, "mia", cmd.get_object(cid, "mia", gone), cid).error.code == (
            "NOT_FOUND"
        )
    assert torch.equal(_value(t, replies, "mia", "z"), torch.zeros(2))
    _no_orphan_files(mia.data_dir)


def test_a_reply_the_broker_did_not_take_is_sent_again_from_the_cache_and_the_plan_runs_once(
    workers: Callable[..., WorkerProcess],
    limit_transport: AmqpTransport,
    replies: Replies,
    tmp_path: Path,
) -> None:
    """A node lost between commit and reply (chaos: node-loss) requeues the command."""
    kate, flags = _crashing(workers, tmp_path, "kate", ["reply:unpublished"])
    t = limit_transport
    t.ensure_device("kate")
    w, x = torch.randn(6), torch.randn(6)
    for data_of in (
        lambda c: cmd.store_object(c, "kate", "x", x),
        lambda c: cmd.store_plan(c, "kate", _accumulate(w.clone()), "acc"),
    ):
        cid = new_id()
        _send(t, replies, "kate", data_of(cid), cid)
    assert [p.name for p in flags.iterdir()] == ["reply:unpublished"]  # the first one failed
    cid = new_id()
    reply = _ok(_send(t, replies, "kate", cmd.run_plan(cid, "kate", "acc", ["x"], ["y"]), cid))
    eager = w.clone()
    assert torch.allclose(tensor_from_proto(reply.ok.objects[0].value), eager.add_(x) * 2)
    cid = new_id()
    again = _ok(_send(t, replies, "kate", cmd.run_plan(cid, "kate", "acc", ["x"], ["z"]), cid))
    assert torch.allclose(tensor_from_proto(again.ok.objects[0].value), eager.add_(x) * 2)
    assert "not published" in kate.log_tail(4000)
    assert torch.equal(_value(t, replies, "kate", "x"), x)
