"""Issue 8 against a real worker: hostile messages get a typed answer or a dead letter, and
the device keeps serving; time limits end a command with a TIME_LIMIT reply."""

from __future__ import annotations

import bz2
import math
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import torch

from broker_config import names
from broker_config.envelope import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    chunk_headers,
    task_headers,
)
from consumer.worker.chunks import MAX_PENDING_TRANSFERS
from producer.transport.amqp import AmqpTransport
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq

DROP = object()


class RawSender:
    """Publishes hand-made messages to a device queue (an attacker with publish rights)."""

    def __init__(self, vhost: RunVhost, reply_to: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.reply_to = reply_to
        self.user = pika.URLParameters(vhost.url).credentials.username

    def send(
        self,
        device: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        cid: str | None = None,
        **props: Any,
    ) -> str:
        """Publish; ``headers`` change fedplan's own (``DROP`` removes one). Returns the cid."""
        cid = cid or new_id()
        h = task_headers(cid)
        for k, v in (headers or {}).items():
            if v is DROP:
                h.pop(k, None)
            else:
                h[k] = v
        base: dict[str, Any] = {
            "content_type": CONTENT_TYPE,
            "content_encoding": CONTENT_ENCODING,
            "correlation_id": cid,
            "reply_to": self.reply_to,
            "delivery_mode": 2,
            "headers": h,
            "user_id": self.user,
        }
        base.update(props)
        self.ch.basic_publish(
            names.commands_exchange(),
            names.device_routing_key(device),
            body,
            pika.BasicProperties(**base),
        )
        return cid

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def sender(vhost: RunVhost, transport: AmqpTransport) -> Iterator[RawSender]:
    s = RawSender(vhost, names.results_routing_key(transport.producer_id))
    yield s
    s.close()


def _ok(transport: AmqpTransport, replies: Replies, device: str, x: torch.Tensor) -> None:
    """The device still serves valid commands: store ``x`` and read it back equal."""
    cid = new_id()
    transport.publish(device, cmd.store_object(cid, device, "x", x), command_id=cid)
    assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"
    cid = new_id()
    transport.publish(device, cmd.get_object(cid, device, "x"), command_id=cid)
    got = replies.wait(cid, 60)
    assert got.WhichOneof("outcome") == "ok", got.error
    assert torch.equal(tensor_from_proto(got.ok.objects[0].value), x)


def _dead(vhost: RunVhost) -> int:
    return int(vhost.queue(names.dead_letter_queue()).get("messages", 0))  # type: ignore[call-overload]


def _hostile(valid: bytes) -> list[tuple[str, bytes, dict[str, Any], dict[str, Any]]]:
    """(what, body, header changes, property changes) of every shape issue 8 found."""
    bomb = bz2.compress(b"\0" * 50_000_000)  # a few dozen bytes expanding to 50 MB
    return [
        ("application/data", b"\x01\x02", {}, {"content_type": "application/data"}),
        ("application/text", b"hello", {}, {"content_type": "application/text"}),
        ("no content type, text", b"hello", {}, {"content_type": None}),
        ("no content type, binary", b"\xff\x00\xfe", {}, {"content_type": None}),
        ("json task", b'[["x"], {}, {}]', {}, {"content_type": "application/json"}),
        ("utf-8 encoding", valid, {}, {"content_encoding": "utf-8"}),
        ("id list", valid, {"id": ["a", "b"]}, {}),
        ("id table", valid, {"id": {"a": 1}}, {}),
        ("task list", valid, {"task": ["fedplan.handle"]}, {}),
        ("chord_unlock", valid, {"task": "celery.chord_unlock"}, {}),
        ("group", valid, {"task": "celery.group"}, {}),
        ("backend_cleanup", valid, {"task": "celery.backend_cleanup"}, {}),
        ("other task, no id", valid, {"task": "x.y", "id": DROP}, {}),
        ("timelimit text", valid, {"timelimit": "x"}, {}),
        ("timelimit -1", valid, {"timelimit": [-1, -1]}, {}),
        ("timelimit raised", valid, {"timelimit": [100, 200]}, {}),
        ("bz2 bomb", bomb, {"compression": "application/x-bz2"}, {}),
        ("eta in 2999", valid, {"eta": "2999-01-01T00:00:00+00:00"}, {}),
        ("countdown", valid, {"countdown": 1000}, {}),
        ("expires", valid, {"expires": "2000-01-01T00:00:00+00:00"}, {}),
        ("retries", valid, {"retries": 5}, {}),
        ("huge header", valid, {"big": "x" * 40_000}, {}),
        ("10^9 chunks", b"x" * 100, chunk_headers("t1", 0, 10**9), {}),
        ("text chunk", b"x" * 100, {**chunk_headers("t2", 0, 3), CHUNK_HEADER: "abc"}, {}),
        ("chunk past count", b"x" * 100, {**chunk_headers("t3", 0, 3), CHUNK_HEADER: 5}, {}),
        ("lone chunk header", b"x" * 100, {CHUNKS_HEADER: 3}, {}),
        ("empty body", b"", {}, {}),
    ]


def test_hostile_messages_get_a_typed_refusal_and_the_dlq_and_the_device_keeps_serving(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    sender: RawSender,
) -> None:
    gil = workers("gil")
    transport.ensure_device("gil")
    _ok(transport, replies, "gil", torch.arange(3.0))
    dead_before = _dead(vhost)
    cases = _hostile(cmd.get_object("ignored", "gil", "x"))
    sent = {sender.send("gil", body, headers=h, **p): what for what, body, h, p in cases}
    # a reply_to that is not a results routing key: refused with no reply at all
    sender.send("gil", cmd.get_object("c", "gil", "x"), reply_to="fedplan.elsewhere")
    for cid, what in sent.items():
        reply = replies.wait(cid, 60)
        assert reply.WhichOneof("outcome") == "error", what
        assert reply.error.code == "MESSAGE_REFUSED", (what, reply.error)
    vhost.wait_queue(names.dead_letter_queue(), messages=dead_before + len(cases) + 1)
    vhost.wait_queue(names.device_queue("gil"), messages=0, messages_unacknowledged=0)
    assert gil.proc is not None and gil.proc.poll() is None  # the worker never died
    _ok(transport, replies, "gil", torch.arange(5.0))
    assert all(replies.count(cid) == 1 for cid in sent)  # exactly one answer each
    assert not list((gil.data_dir / "chunks").glob("*"))  # no chunk was stored
    log = gil.log_tail(5000)
    assert "celery.chord_unlock[" not in log and "celery.group[" not in log  # never run
    args = vhost.queue(names.dead_letter_queue())["arguments"]
    assert args["x-max-length"] > 0 and args["x-message-ttl"] > 0  # type: ignore[index]


def test_a_plan_past_the_soft_time_limit_ends_with_a_time_limit_reply(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    workers("hal", env={"FEDPLAN_SOFT_TIME_LIMIT": "1", "FEDPLAN_TIME_LIMIT": "60"})
    transport.ensure_device("hal")
    n = 1200  # 1,500 steps of this: far past the 1 s limit on any machine
    w, x = torch.randn(n, n) / math.sqrt(n), torch.randn(n, n)
    for build in (
        lambda c: cmd.store_object(c, "hal", "big", x),
        lambda c: cmd.store_plan(c, "hal", cmd.slow_plan(1500, w), "slow"),
    ):
        cid = new_id()
        transport.publish("hal", build(cid), command_id=cid)
        assert replies.wait(cid, 120).WhichOneof("outcome") == "ok"
    cid = new_id()
    transport.publish("hal", cmd.run_plan(cid, "hal", "slow", ["big"], ["y"]), command_id=cid)
    reply = replies.wait(cid, 60)
    assert reply.error.code == "TIME_LIMIT", reply
    assert "time limit of 1 s" in reply.error.message
    _ok(transport, replies, "hal", torch.ones(2))


def test_a_command_stuck_past_the_hard_time_limit_gets_a_time_limit_reply_and_the_dlq(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    marker = f"stall-{secrets.token_hex(4)}"
    ivy = workers(
        "ivy",
        env={
            "FEDPLAN_TEST_STALL_MARKER": marker,
            "FEDPLAN_SOFT_TIME_LIMIT": "1",
            "FEDPLAN_TIME_LIMIT": "3",
        },
        app="tests.integration.stall_app",
    )
    transport.ensure_device("ivy")
    _ok(transport, replies, "ivy", torch.ones(3))
    dead_before = _dead(vhost)
    cid = new_id()
    transport.publish("ivy", cmd.get_object(cid, "ivy", marker), command_id=cid)
    reply = replies.wait(cid, 60)
    assert reply.error.code == "TIME_LIMIT", reply
    assert "hard time limit of 3 s" in reply.error.message
    vhost.wait_queue(names.dead_letter_queue(), messages=dead_before + 1)
    vhost.wait_queue(names.device_queue("ivy"), messages=0, messages_unacknowledged=0)
    _ok(transport, replies, "ivy", torch.zeros(4))
    assert replies.count(cid) == 1
    assert ivy.proc is not None and ivy.proc.poll() is None


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition never held")


def test_an_unfinished_chunked_transfer_expires_and_is_collected_at_worker_start(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    sender: RawSender,
) -> None:
    env = {"FEDPLAN_CHUNK_TTL": "1"}
    jo = workers("jo", env=env)
    transport.ensure_device("jo")
    chunks: Path = jo.data_dir / "chunks"
    for i in range(3):  # three transfers that never finish
        sender.send("jo", b"\x07" * 65536, headers=chunk_headers(f"flood{i}", 0, 4))
    _wait_for(lambda: len(list(chunks.glob("*"))) == 3)
    vhost.wait_queue(names.device_queue("jo"), messages=0, messages_unacknowledged=0)
    jo.stop()
    time.sleep(1.5)
    workers("jo", env=env)  # a new worker on the same directory collects them at start
    _wait_for(lambda: not list(chunks.glob("*")))
    _ok(transport, replies, "jo", torch.arange(4.0))


def test_a_flood_of_one_byte_chunks_each_opening_a_transfer_stops_at_the_transfer_bound(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    sender: RawSender,
) -> None:
    """Before the fix every one got a directory of its own (disk), and each chunk scanned all
    of them, so the device slowed down with every chunk (3 ms to 60 ms after 1,800)."""
    mo = workers("mo")
    transport.ensure_device("mo")
    n = MAX_PENDING_TRANSFERS + 40
    cids = [sender.send("mo", b"\x01", headers=chunk_headers(f"fl{i}", 1, 2)) for i in range(n)]
    for cid in cids[MAX_PENDING_TRANSFERS:]:
        reply = replies.wait(cid, 120)
        assert reply.error.code == "MESSAGE_REFUSED", reply.error
        assert "incomplete chunked transfers already" in reply.error.message
    vhost.wait_queue(names.device_queue("mo"), messages=0, messages_unacknowledged=0)
    assert all(replies.count(cid) == 0 for cid in cids[:MAX_PENDING_TRANSFERS])  # held
    assert len(list((mo.data_dir / "chunks").glob("*"))) == MAX_PENDING_TRANSFERS
    _ok(transport, replies, "mo", torch.arange(6.0))  # unchunked work is served


def test_the_worker_log_file_rotates_and_stays_bounded(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    sender: RawSender,
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "logs" / "kim.log"
    env = {
        "FEDPLAN_LOG_FILE": str(log_file),
        "FEDPLAN_LOG_MAX_BYTES": "20000",
        "FEDPLAN_LOG_BACKUPS": "2",
    }
    workers("kim", env=env)
    transport.ensure_device("kim")
    dead_before = _dead(vhost)
    cids = [sender.send("kim", b"x", headers={"retries": 9}) for _ in range(300)]
    for cid in cids:
        assert replies.wait(cid, 60).error.code == "MESSAGE_REFUSED"
    # the reply goes out before the reject: wait until all 300 are dead-lettered, so the
    # next test in this vhost counts only its own
    vhost.wait_queue(names.dead_letter_queue(), messages=dead_before + 300, timeout=60)
    files = sorted(log_file.parent.glob("kim.log*"))
    assert [f.name for f in files] == ["kim.log", "kim.log.1", "kim.log.2"]
    assert all(f.stat().st_size <= 20000 for f in files)
    assert "retries" in log_file.read_text() + files[1].read_text()


def test_a_chunked_command_that_kills_its_worker_is_counted_refused_and_its_chunks_deleted(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], replies: Replies
) -> None:
    marker = f"crash-{secrets.token_hex(4)}"
    size = 65536
    lee = workers(
        "lee",
        env={
            "FEDPLAN_TEST_CRASH_MARKER": marker,
            "FEDPLAN_DELIVERY_LIMIT": "2",
            "FEDPLAN_MAX_MESSAGE_SIZE": str(size),
        },
        app="tests.integration.crash_app",
    )
    settings = vhost.settings.replace(
        producer_id=f"t{secrets.token_hex(4)}", max_message_size=size, delivery_limit=2
    )
    transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    try:
        transport.ensure_device("lee")
        dead_before = _dead(vhost)
        cid = new_id()
        big = cmd.store_object(cid, "lee", marker, torch.randn(100_000))  # 7 chunks
        assert len(big) > 6 * size
        transport.publish("lee", big, command_id=cid)
        reply = replies.wait(cid, 120)
        assert reply.error.code == "EXECUTION_FAILED", reply
        assert "delivered 3 times" in reply.error.message
        vhost.wait_queue(names.dead_letter_queue(), messages=dead_before + 1)
        vhost.wait_queue(names.device_queue("lee"), messages=0, messages_unacknowledged=0)
        assert not list((lee.data_dir / "chunks").glob("*"))  # the transfer's chunks are gone
        assert lee.log_tail(400).count("WorkerLostError") >= 2
        _ok(transport, replies, "lee", torch.arange(7.0))
        assert replies.count(cid) == 1
    finally:
        transport.close()
