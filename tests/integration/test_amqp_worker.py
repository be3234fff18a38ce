"""Real Celery worker processes on a real RabbitMQ: results, failures, redelivery, reconnect."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pika
import pytest
import torch

from broker_config import names
from broker_config.envelope import CONTENT_TYPE, task_headers
from producer.transport.amqp import AmqpTransport
from schemas.errors import DeviceNotFound
from schemas.ir import Op, PlanIR, Ref
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def _value(reply: object) -> torch.Tensor:
    obj = reply.ok.objects[0]  # type: ignore[attr-defined]
    return tensor_from_proto(obj.value)


def _run(
    transport: AmqpTransport,
    replies: Replies,
    device: str,
    data: bytes,
    cid: str,
    timeout: float = 60.0,
) -> object:
    transport.publish(device, data, command_id=cid)
    return replies.wait(cid, timeout)


def _call(
    transport: AmqpTransport,
    replies: Replies,
    device: str,
    build: Callable[..., bytes],
    *args: object,
) -> object:
    """Build a command with a fresh id for ``device``, publish it and wait for its reply."""
    cid = new_id()
    return _run(transport, replies, device, build(cid, device, *args), cid)


def test_a_tensor_sent_to_a_worker_comes_back_equal(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    workers("alice")
    transport.ensure_device("alice")
    x = torch.randn(4, 3)
    ok = _call(transport, replies, "alice", cmd.store_object, "x", x)
    assert ok.WhichOneof("outcome") == "ok"  # type: ignore[attr-defined]
    got = _call(transport, replies, "alice", cmd.get_object, "x")
    assert torch.equal(_value(got), x)


def test_a_plan_run_on_a_worker_equals_eager_torch(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    workers("bob")
    transport.ensure_device("bob")
    w = torch.randn(5, 5) / math.sqrt(5)
    x = torch.randn(3, 5)
    _call(transport, replies, "bob", cmd.store_object, "x", x)
    r = _call(transport, replies, "bob", cmd.store_plan, cmd.slow_plan(3, w), "p")
    assert r.WhichOneof("outcome") == "ok", r  # type: ignore[attr-defined]
    cid = new_id()
    out = _run(transport, replies, "bob", cmd.run_plan(cid, "bob", "p", ["x"], ["y"]), cid)
    assert torch.allclose(_value(out), cmd.slow_plan_eager(x, w, 3), atol=1e-6)


def test_a_command_to_a_device_without_a_queue_fails_fast(transport: AmqpTransport) -> None:
    with pytest.raises(DeviceNotFound) as err:
        transport.publish("nobody", b"x", command_id=new_id())
    assert err.value.device_id == "nobody"


def test_bad_messages_get_an_error_reply_are_dead_lettered_and_the_worker_keeps_serving(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    workers("carol")
    transport.ensure_device("carol")
    dead_before = int(vhost.queue(names.dead_letter_queue())["messages"])  # type: ignore[arg-type]
    garbage = new_id()
    r = _run(transport, replies, "carol", b"\xff\x00garbage", garbage)
    assert r.error.code == "DECODE_FAILED"  # type: ignore[attr-defined]
    future = new_id()
    data = bytearray(cmd.get_object(future, "carol", "x"))
    from schemas.command_pb2 import Command

    c = Command.FromString(bytes(data))
    c.schema_version = 999
    r = _run(transport, replies, "carol", c.SerializeToString(), future)
    assert r.error.code == "UNSUPPORTED_SCHEMA"  # type: ignore[attr-defined]
    bad_plan = PlanIR(
        name="evil",
        inputs=(Ref(0),),
        outputs=Ref(1),
        num_slots=2,
        ops=[Op("os.system", (Ref(0),), {}, Ref(1))],
    )
    evil = new_id()
    r = _run(transport, replies, "carol", cmd.store_plan(evil, "carol", bad_plan, "evil"), evil)
    assert r.error.code == "OP_NOT_ALLOWED"  # type: ignore[attr-defined]
    _publish_json_task(vhost, "carol")
    transport.publish("carol", b"", command_id=new_id())  # no decoder ever sees it
    _publish_json_task(vhost, "carol", content_type=CONTENT_TYPE, without_id=True)
    vhost.wait_queue(names.dead_letter_queue(), messages=dead_before + 6)
    x = torch.arange(3.0)
    _call(transport, replies, "carol", cmd.store_object, "x", x)
    got = _call(transport, replies, "carol", cmd.get_object, "x")
    assert torch.equal(_value(got), x)


def _publish_json_task(
    vhost: RunVhost,
    device: str,
    *,
    content_type: str = "application/json",
    without_id: bool = False,
) -> None:
    """A JSON Celery task message (what a stock client would send): must be refused."""
    headers = task_headers(new_id())
    if without_id:
        del headers["id"]
    conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        ch = conn.channel()
        ch.basic_publish(
            names.commands_exchange(),
            names.device_routing_key(device),
            b'[["x"], {}, {}]',
            pika.BasicProperties(
                content_type=content_type,
                content_encoding="utf-8",
                headers=headers,
                delivery_mode=2,
            ),
        )
    finally:
        conn.close()


def test_a_worker_killed_mid_plan_is_redelivered_and_the_result_arrives_exactly_once(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    dave = workers("dave")
    transport.ensure_device("dave")
    n = 1000
    w = torch.randn(n, n) / math.sqrt(n)
    x = torch.randn(n, n)
    steps = 100
    _call(transport, replies, "dave", cmd.store_object, "x", x)
    _call(transport, replies, "dave", cmd.store_plan, cmd.slow_plan(steps, w), "slow")
    cid = new_id()
    transport.publish("dave", cmd.run_plan(cid, "dave", "slow", ["x"], ["y"]), command_id=cid)
    dave.wait_log(f"fedplan.handle[{cid}] received")
    time.sleep(0.5)
    dave.kill()
    assert replies.count(cid) == 0  # the plan had not finished when the worker died
    workers("dave")  # a new worker process on the same store
    out = replies.wait(cid, timeout=120)
    assert torch.allclose(_value(out), cmd.slow_plan_eager(x, w, steps), atol=1e-5)
    vhost.wait_queue(names.device_queue("dave"), messages=0)
    time.sleep(1.0)  # a duplicate reply would arrive right behind the first
    assert replies.count(cid) == 1


def test_the_producer_reconnects_after_the_broker_closes_its_connection(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    workers("erin")
    transport.ensure_device("erin")
    n = 400
    w = torch.randn(n, n) / math.sqrt(n)
    x = torch.randn(n, n)
    _call(transport, replies, "erin", cmd.store_object, "x", x)
    _call(transport, replies, "erin", cmd.store_plan, cmd.slow_plan(20, w), "p")
    cid = new_id()
    transport.publish("erin", cmd.run_plan(cid, "erin", "p", ["x"], ["y"]), command_id=cid)
    assert vhost.close_connections(f"fedplan producer {transport.producer_id}") == 1
    out = replies.wait(cid, timeout=60)  # the pending get completes after the reconnect
    assert torch.allclose(_value(out), cmd.slow_plan_eager(x, w, 20), atol=1e-5)
    assert transport.reconnects >= 1
    got = _call(transport, replies, "erin", cmd.get_object, "x")
    assert torch.equal(_value(got), x)


def test_a_restarted_producer_finds_replies_that_arrived_while_it_was_down(
    vhost: RunVhost, workers: Callable[..., WorkerProcess]
) -> None:
    settings = vhost.settings.replace(producer_id=f"r{new_id()}")
    first = AmqpTransport(on_reply=lambda _: None, settings=settings)
    first.ensure_device("fay")
    cid = new_id()
    first.publish("fay", cmd.store_object(cid, "fay", "x", torch.ones(2)), command_id=cid)
    first.close()  # the producer is down before the device even starts
    workers("fay")
    vhost.wait_queue(names.results_queue(settings.producer_id or ""), messages=1)
    replies = Replies()
    second = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    try:
        assert replies.wait(cid, 30).WhichOneof("outcome") == "ok"
    finally:
        second.close()
