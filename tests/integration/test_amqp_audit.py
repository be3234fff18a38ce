"""The audit log on a real worker: nothing leaves the device without its audit row.

While the log cannot be written (here: another process holds it locked), a command's reply
is withheld with a typed ``AUDIT_UNAVAILABLE`` error instead of carrying its values; once
the log is writable the same work is answered and recorded with the bytes that left.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
import torch

from broker_config.envelope import task_headers
from consumer.policy.audit import AUDIT_FILE, AuditLog
from producer.transport.amqp import AmqpTransport
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def test_a_device_whose_audit_log_is_locked_withholds_values_until_it_can_record_them(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    worker = workers("audit")
    transport.ensure_device("audit")
    cid = new_id()
    transport.publish(
        "audit", cmd.store_object(cid, "audit", "x", torch.arange(4.0)), command_id=cid
    )
    assert replies.wait(cid, 120).WhichOneof("outcome") == "ok"
    lock = sqlite3.connect(worker.data_dir / AUDIT_FILE, timeout=60, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the audit log is locked (or its disk full)
        withheld = new_id()
        transport.publish("audit", cmd.get_object(withheld, "audit", "x"), command_id=withheld)
        reply = replies.wait(withheld, 120)
        assert reply.WhichOneof("outcome") == "error", reply
        assert reply.error.code == "AUDIT_UNAVAILABLE"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    cid = new_id()
    transport.publish("audit", cmd.get_object(cid, "audit", "x"), command_id=cid)
    reply = replies.wait(cid, 120)
    assert reply.WhichOneof("outcome") == "ok" and reply.ok.objects[0].has_value
    rows = {e.command_id: e for e in AuditLog(worker.data_dir).entries()}
    assert rows[cid].bytes_out == 16 and rows[cid].kind == "get_object"
    assert withheld not in rows  # its row could not be written: and nothing left with it


def test_a_message_the_gate_refuses_is_in_the_devices_audit_log(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    from tests.integration.test_amqp_identity import _publish

    worker = workers("gated")
    transport.ensure_device("gated")
    anonymous = new_id()  # no user_id: the gate refuses it before any fedplan code runs
    body = cmd.get_object(anonymous, "gated", "x")
    _publish(vhost, transport, "gated", body, anonymous, headers=task_headers(anonymous))
    assert replies.wait(anonymous, 120).error.code == "MESSAGE_REFUSED"
    [row] = [e for e in AuditLog(worker.data_dir).entries() if e.command_id == anonymous]
    assert (row.sender, row.kind, row.outcome) == ("-", "gate", "MESSAGE_REFUSED")
