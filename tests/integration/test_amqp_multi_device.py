"""One Celery worker process serving several devices (``fedplan worker --devices-dir``).

Each device keeps its own queue, store, policy, audit and delivery counts (``DIR/<id>``);
the device of a command is the device of the queue it was delivered from. A slow plan on
one device leaves the others served, a poison command on one device is dead-lettered
without touching the others, and a SIGKILL of the whole worker runs no command twice.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from broker_config import names
from consumer.policy.audit import AuditLog
from consumer.policy.rules import PolicyFile
from producer.transport.amqp import AmqpTransport
from schemas.command_pb2 import Reply
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, producer_transport
from tests.integration.multi_worker import MultiWorkerProcess
from tests.integration.test_amqp_durability import _accumulate

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def multi(vhost: RunVhost, tmp_path: Path) -> Iterator[Callable[..., MultiWorkerProcess]]:
    """Start a multi-device worker: ``multi(["a", "b"], env={...})``; all stop afterwards."""
    started: list[MultiWorkerProcess] = []

    def start(
        devices: list[str], env: dict[str, str] | None = None, app: str = "consumer"
    ) -> MultiWorkerProcess:
        w = MultiWorkerProcess(devices, tmp_path / "devices", vhost, env, app=app).start()
        started.append(w)
        return w.wait_ready()

    yield start
    for w in started:
        w.stop()


def _ids(prefix: str) -> list[str]:
    tag = secrets.token_hex(3)
    return [f"{prefix}{i}-{tag}" for i in range(3)]


def _send(t: AmqpTransport, replies: Replies, device: str, data: bytes, cid: str) -> Reply:
    t.publish(device, data, command_id=cid)
    return replies.wait(cid, 120.0)


def _ok(reply: Reply) -> Reply:
    assert reply.WhichOneof("outcome") == "ok", reply
    return reply


def _value(reply: Reply) -> torch.Tensor:
    return tensor_from_proto(_ok(reply).ok.objects[0].value)


def _store(t: AmqpTransport, replies: Replies, device: str, oid: str, x: torch.Tensor) -> Reply:
    cid = new_id()
    return _send(t, replies, device, cmd.store_object(cid, device, oid, x), cid)


def _get(t: AmqpTransport, replies: Replies, device: str, oid: str) -> Reply:
    cid = new_id()
    return _send(t, replies, device, cmd.get_object(cid, device, oid), cid)


def test_one_worker_serves_each_device_from_its_own_store_policy_and_audit(
    multi: Callable[..., MultiWorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    devices = _ids("m")
    worker = multi(devices)
    for d in devices:
        transport.ensure_device(d)
    values = {d: torch.randn(4) for d in devices}
    for d in devices:  # the same object id on every device, a different tensor each
        _ok(_store(transport, replies, d, "x", values[d]))
    for d in devices:
        assert torch.equal(_value(_get(transport, replies, d, "x")), values[d])
        assert list(worker.data_dir_of(d).glob("*.sqlite3")), "no store in the device's dir"
    closed = devices[1]
    PolicyFile(worker.data_dir_of(closed)).update(allow=["somebody-else"])
    refused = _get(transport, replies, closed, "x")
    assert refused.WhichOneof("outcome") == "error", refused
    assert refused.error.code == "POLICY_REFUSED", refused
    for d in (devices[0], devices[2]):  # the other devices' policies still admit us
        assert torch.equal(_value(_get(transport, replies, d, "x")), values[d])
    assert AuditLog(worker.data_dir_of(closed)).refusals() == 1
    assert AuditLog(worker.data_dir_of(devices[0])).refusals() == 0


def test_a_slow_plan_on_one_device_does_not_hold_up_the_others(
    multi: Callable[..., MultiWorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    slow, quick, _ = _ids("s")
    worker = multi(
        [slow, quick], env={"FEDPLAN_SOFT_TIME_LIMIT": "300", "FEDPLAN_TIME_LIMIT": "400"}
    )
    transport.ensure_device(slow)
    transport.ensure_device(quick)
    n = 1200  # 6,000 steps of this take minutes on any machine: the budget ends it
    w, x = torch.randn(n, n) / math.sqrt(n), torch.randn(n, n)
    _ok(_store(transport, replies, slow, "big", x))
    cid = new_id()
    _ok(
        _send(transport, replies, slow, cmd.store_plan(cid, slow, cmd.slow_plan(6000, w), "p"), cid)
    )
    budget = 60
    PolicyFile(worker.data_dir_of(slow)).update(budgets={"max_wall_seconds": budget})
    slow_cid = new_id()
    started = time.monotonic()
    transport.publish(slow, cmd.run_plan(slow_cid, slow, "p", ["big"], ["y"]), command_id=slow_cid)
    worker.wait_log(slow_cid, timeout=60)  # the slow plan holds one pool process now
    for i in range(3):
        y = torch.randn(3)
        _ok(_store(transport, replies, quick, f"q{i}", y))
        assert torch.equal(_value(_get(transport, replies, quick, f"q{i}")), y)
    assert replies.count(slow_cid) == 0, "the quick device waited for the slow plan"
    assert time.monotonic() - started < budget
    reply = replies.wait(slow_cid, budget + 120)
    assert reply.error.code == "TIME_LIMIT", reply


def test_a_poison_command_on_one_device_is_dead_lettered_and_the_others_serve_on(
    vhost: RunVhost, multi: Callable[..., MultiWorkerProcess], replies: Replies
) -> None:
    marker = f"crash-{secrets.token_hex(4)}"
    limit = 3
    poisoned, healthy, _ = _ids("p")
    worker = multi(
        [poisoned, healthy],
        env={"FEDPLAN_TEST_CRASH_MARKER": marker, "FEDPLAN_DELIVERY_LIMIT": str(limit)},
        app="tests.integration.crash_app",
    )
    settings = vhost.settings.replace(producer_id=f"t{secrets.token_hex(4)}", delivery_limit=limit)
    transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    try:
        for d in (poisoned, healthy):
            transport.ensure_device(d)
        dead = names.dead_letter_queue()
        dead_before = int(vhost.queue(dead).get("messages", 0))  # type: ignore[call-overload]
        poison = new_id()
        transport.publish(
            poisoned, cmd.store_object(poison, poisoned, marker, torch.ones(2)), command_id=poison
        )
        for i in range(3):  # served while the poison command kills pool processes
            y = torch.randn(2)
            _ok(_store(transport, replies, healthy, f"h{i}", y))
        reply = replies.wait(poison, 180)
        assert reply.error.code == "EXECUTION_FAILED", reply
        assert f"delivered {limit + 1} times" in reply.error.message
        vhost.wait_queue(dead, messages=dead_before + 1)
        assert worker.log_tail(400).count("WorkerLostError") >= limit
        y = torch.randn(2)
        _ok(_store(transport, replies, poisoned, "after", y))  # the device serves on
        assert torch.equal(_value(_get(transport, replies, poisoned, "after")), y)
        for i in range(3):
            assert _value(_get(transport, replies, healthy, f"h{i}")).shape == (2,)
        assert replies.count(poison) == 1
    finally:
        transport.close()


def test_a_sigkilled_multi_device_worker_runs_each_devices_commands_exactly_once(
    vhost: RunVhost,
    multi: Callable[..., MultiWorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    devices = _ids("k")
    worker = multi(devices)
    w = {d: torch.randn(16) for d in devices}
    x = torch.randn(16)
    for d in devices:
        transport.ensure_device(d)
        _ok(_store(transport, replies, d, "x", x))
        cid = new_id()
        _ok(
            _send(
                transport, replies, d, cmd.store_plan(cid, d, _accumulate(w[d].clone()), "acc"), cid
            )
        )
    runs = 4
    sent = []
    for i in range(runs):
        for d in devices:
            cid = new_id()
            transport.publish(d, cmd.run_plan(cid, d, "acc", ["x"], [f"y{i}"]), command_id=cid)
            sent.append(cid)
    worker.wait_log(sent[len(sent) // 3], timeout=120)  # some ran, some are queued
    worker.kill()
    assert any(replies.count(c) == 0 for c in sent), "all ran before the kill; nothing tested"
    multi(devices)  # a new worker process on the same devices dir
    for c in sent:
        _ok(replies.wait(c, 180))
    for d in devices:  # each run added x to the plan state exactly once
        cid = new_id()
        got = _value(_send(transport, replies, d, cmd.run_plan(cid, d, "acc", ["x"], ["z"]), cid))
        assert torch.allclose(got, (w[d] + (runs + 1) * x) * 2, atol=1e-5)


def test_a_gateway_user_serves_its_devices_on_one_connection_and_reads_no_other_queue(
    vhost: RunVhost, tmp_path: Path, replies: Replies
) -> None:
    from urllib.parse import quote

    import pika
    import pika.exceptions

    from broker_config.setup import create_gateway_user, declare_topology

    mine, other = _ids("g")[:2], f"other-{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    declare_topology(vhost.client, vhost.settings, [*mine, other])
    user = create_gateway_user(vhost.client, f"gw{secrets.token_hex(3)}", mine, password)
    url = f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost.name, safe='')}"
    worker = MultiWorkerProcess(
        mine,
        tmp_path / "devices",
        vhost,
        {"FEDPLAN_BROKER_URL": url, "FEDPLAN_WORKER_DECLARES": "false"},
    )
    settings = vhost.settings.replace(
        producer_id=f"t{secrets.token_hex(4)}", trusted_reply_users=user
    )
    transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    try:
        worker.start().wait_ready()
        queues = {names.device_queue(d) for d in mine}
        consumers = vhost.client.request("GET", f"consumers/{vhost.client.vq()}")
        connections = {
            c["channel_details"]["connection_name"]
            for c in consumers
            if c["queue"]["name"] in queues
        }
        assert len(connections) == 1, connections  # every device's queue on one connection
        for d in mine:
            transport.ensure_device(d)
            y = torch.randn(3)
            _ok(_store(transport, replies, d, "y", y))
            assert torch.equal(_value(_get(transport, replies, d, "y")), y)
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
                conn.channel().basic_get(names.device_queue(other))
            assert err.value.reply_code == 403
        finally:
            conn.close()
    finally:
        transport.close()
        worker.stop()
        vhost.admin.request("DELETE", f"users/{vhost.admin.q(user)}")


def test_one_senders_slow_plans_are_charged_to_that_sender_only_on_a_concurrent_worker(
    vhost: RunVhost,
    multi: Callable[..., MultiWorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    producer: tuple[str, str, str],
) -> None:
    """A's slow plan holds one pool process while B's quick commands, admitted meanwhile, run
    on the other. Each command is charged its own run time: A goes into debt on its device
    (its plan ran 10 s against a share of 6 s a minute), B keeps its share of the other."""
    slow, quick, _ = _ids("f")
    limits = {"FEDPLAN_SOFT_TIME_LIMIT": "300", "FEDPLAN_TIME_LIMIT": "400"}
    worker = multi([slow, quick], env=limits)  # two pool processes
    transport.ensure_device(slow)
    transport.ensure_device(quick)
    n = 600  # the plan runs until its wall budget (10 s) ends it, on any machine
    w, x = torch.randn(n, n) / math.sqrt(n), torch.randn(n, n)
    _ok(_store(transport, replies, slow, "big", x))
    cid = new_id()
    _ok(
        _send(transport, replies, slow, cmd.store_plan(cid, slow, cmd.slow_plan(4000, w), "p"), cid)
    )
    share = {"max_device_seconds_per_minute": 6}  # refilled at 0.1 s a second
    PolicyFile(worker.data_dir_of(slow)).update(budgets={**share, "max_wall_seconds": 10})
    PolicyFile(worker.data_dir_of(quick)).update(budgets=share)
    plan_cid = new_id()
    run = cmd.run_plan(plan_cid, slow, "p", ["big"], ["y"])
    transport.publish(slow, run, command_id=plan_cid)
    worker.wait_log(plan_cid, timeout=60)  # A's plan holds one pool process now
    b_replies = Replies()
    b = producer_transport(vhost, producer, b_replies)
    try:
        y = torch.randn(3)
        _ok(_store(b, b_replies, quick, "q", y))  # admitted while A's plan runs
        for _ in range(2):
            assert torch.equal(_value(_get(b, b_replies, quick, "q")), y)
        assert replies.count(plan_cid) == 0, "B's commands did not run beside A's plan"
        assert replies.wait(plan_cid, 180).error.code == "TIME_LIMIT"
        refused = _get(transport, replies, slow, "big")  # A: 10 s charged, 4 s in debt
        assert refused.error.code == "POLICY_REFUSED", refused
        assert "max_device_seconds_per_minute" in refused.error.message
        assert torch.equal(_value(_get(b, b_replies, quick, "q")), y), "B was charged A's time"
    finally:
        b.close()
