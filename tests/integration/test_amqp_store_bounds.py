"""A real worker under the store's bounds: over one, a typed error reply, and it keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from producer.transport.amqp import AmqpTransport
from schemas.command_pb2 import Command, DeleteObjects, Reply, RunOp
from schemas.ir import SCHEMA_VERSION
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_from_proto
from schemas.value_codec import value_to_proto
from schemas.wire import encode_command, new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, WorkerProcess

pytestmark = pytest.mark.rabbitmq

MIB = 1024 * 1024


def _ones(cid: str, device: str, numel: int, result: str, *, return_values: bool) -> bytes:
    """A tiny command whose result is big: ``torch.ones(numel)``."""
    op = RunOp(
        target="torch.ones",
        args=ValueList(items=[value_to_proto(numel)]),
        result_ids=[result],
        return_values=return_values,
    )
    return encode_command(
        Command(schema_version=SCHEMA_VERSION, command_id=cid, device_id=device, run_op=op)
    )


def _send(t: AmqpTransport, replies: Replies, device: str, data: bytes, cid: str) -> Reply:
    t.publish(device, data, command_id=cid)
    return replies.wait(cid, 120.0)


def _disk(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())


def test_replies_over_the_reply_bytes_bound_get_store_full_and_the_device_keeps_serving(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    mia = workers(
        "mia",
        env={
            "FEDPLAN_STORE_MAX_REPLY_BYTES": str(2 * MIB),
            "FEDPLAN_STORE_MAX_BYTES": str(40 * MIB),
        },
    )
    transport.ensure_device("mia")
    for i in range(3):  # the three small commands returning big values
        cid = new_id()
        reply = _send(
            transport,
            replies,
            "mia",
            _ones(cid, "mia", 4 * MIB, f"big{i}", return_values=True),
            cid,
        )
        assert reply.error.code == "STORE_FULL", reply
        assert "FEDPLAN_STORE_MAX_REPLY_BYTES" in reply.error.message
    assert _disk(mia.data_dir) < 2 * MIB  # nothing of the refused commands stayed
    for i in range(2):  # stored, not returned: 16 MiB each, under the 40 MiB bound
        cid = new_id()
        reply = _send(
            transport,
            replies,
            "mia",
            _ones(cid, "mia", 4 * MIB, f"kept{i}", return_values=False),
            cid,
        )
        assert reply.WhichOneof("outcome") == "ok", reply
    cid = new_id()
    full = _send(
        transport, replies, "mia", _ones(cid, "mia", 4 * MIB, "third", return_values=False), cid
    )
    assert full.error.code == "STORE_FULL" and "FEDPLAN_STORE_MAX_BYTES" in full.error.message
    cid = new_id()
    delete = Command(
        schema_version=SCHEMA_VERSION,
        command_id=cid,
        device_id="mia",
        delete_objects=DeleteObjects(ids=["kept0", "kept1"]),
    )
    assert (
        _send(transport, replies, "mia", encode_command(delete), cid).WhichOneof("outcome") == "ok"
    )
    assert _disk(mia.data_dir) < 2 * MIB  # deleting freed the disk
    cid = new_id()
    small = _send(
        transport, replies, "mia", cmd.store_object(cid, "mia", "x", torch.arange(4.0)), cid
    )
    assert small.WhichOneof("outcome") == "ok"
    cid = new_id()
    got = _send(transport, replies, "mia", cmd.get_object(cid, "mia", "x"), cid)
    assert torch.equal(tensor_from_proto(got.ok.objects[0].value), torch.arange(4.0))
