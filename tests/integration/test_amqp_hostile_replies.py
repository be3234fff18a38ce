"""Hostile replies published straight into a producer's results queue cannot harm it.

Bad chunk headers, floods of never-completed chunks, replies without or with the wrong
``user_id`` and replies naming the wrong device are refused; the transport keeps working
and real calls to a real worker succeed afterwards.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
import torch

from broker_config import names
from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER
from broker_config.setup import create_device_user, declare_topology
from producer.remote.collector import ReplyCollector
from producer.transport.amqp import AmqpTransport
from schemas.command_pb2 import ObjectInfo, Ok, Reply
from schemas.errors import PublishTimeout
from schemas.value_codec import value_to_proto
from schemas.wire import encode_reply, new_id
from tests.integration import commands as cmd
from tests.integration.broker import RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq

MIB = 1024 * 1024


@pytest.fixture
def collector() -> ReplyCollector:
    return ReplyCollector()


@pytest.fixture
def producer(vhost: RunVhost, collector: ReplyCollector) -> Iterator[AmqpTransport]:
    settings = vhost.settings.replace(producer_id=f"h{secrets.token_hex(4)}")
    t = AmqpTransport(on_reply=collector.on_reply, settings=settings)
    yield t
    t.close()


@pytest.fixture
def mallory(vhost: RunVhost) -> Iterator[str]:
    """The AMQP URL of a least-privilege device user for device ``mallory``."""
    password = secrets.token_hex(8)
    declare_topology(vhost.client, vhost.settings, ["mallory"])
    user = create_device_user(vhost.client, "mallory", password)
    yield f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost.name, safe='')}"
    vhost.admin.request("DELETE", f"users/{vhost.admin.q(user)}")


def _publish(url: str, producer_id: str, messages: list[tuple[dict[str, Any], bytes, Any]]) -> None:
    """Publish ``(headers, body, user_id)`` messages to the producer's results routing key."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for headers, body, user_id in messages:
            props = pika.BasicProperties(headers=headers, user_id=user_id, delivery_mode=2)
            ch.basic_publish(
                names.results_exchange(), names.results_routing_key(producer_id), body, props
            )
    finally:
        conn.close()


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _value_reply(command_id: str, device: str, value: object) -> bytes:
    info = ObjectInfo(id="r", kind="value", python_value=value_to_proto(value))
    return encode_reply(Reply(command_id=command_id, device_id=device, ok=Ok(objects=[info])))


def _round_trip(t: AmqpTransport, collector: ReplyCollector, device: str) -> None:
    """A real store + get through the real worker: the transport still works."""
    x = torch.randn(5)
    store, get = new_id(), new_id()
    collector.expect(store, device_id=device)
    t.publish(device, cmd.store_object(store, device, "x", x), command_id=store)
    collector.wait(store, 60)
    pending = collector.expect(get, device_id=device, result_ids=("x",))
    t.publish(device, cmd.get_object(get, device, "x"), command_id=get)
    assert torch.equal(pending.value("x", 60), x)


def _chunk(transfer: Any, index: Any, count: Any) -> dict[str, Any]:
    return {TRANSFER_HEADER: transfer, CHUNK_HEADER: index, CHUNKS_HEADER: count}


def test_bad_chunk_headers_and_floods_leave_the_transport_working(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    producer: AmqpTransport,
    collector: ReplyCollector,
) -> None:
    workers("hana")
    producer.ensure_device("hana")
    guest = vhost.url
    bad = [
        (_chunk("t", "zero", 2), b"x", "guest"),  # the header that used to kill the thread
        (_chunk("t", 0, 10**15), b"x", "guest"),  # a huge size in a small message
        (_chunk("t", -1, 2), b"x", "guest"),
        (_chunk("t", 0, "2"), b"x", "guest"),
        ({CHUNKS_HEADER: 3}, b"x", "guest"),
        ({}, b"\x00not a reply", "guest"),
    ]
    _publish(guest, producer.producer_id, bad)
    _until(lambda: producer.rejected_replies >= 5, "the bad chunks were refused")
    flood = [(_chunk(f"f{i}", 0, 2), b"y" * 1024, "guest") for i in range(500)]
    _publish(guest, producer.producer_id, flood)
    _round_trip(producer, collector, "hana")  # replies queue behind the flood: all consumed
    transfers, held = producer.incomplete_replies
    assert transfers <= 256 and held <= 2 * producer.settings.max_reply_size
    _round_trip(producer, collector, "hana")


def test_replies_without_or_with_another_devices_user_are_refused(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    producer: AmqpTransport,
    collector: ReplyCollector,
    mallory: str,
) -> None:
    workers("hana")
    producer.ensure_device("hana")
    awaited = new_id()  # a command to hana still awaiting its reply
    pending = collector.expect(awaited, device_id="hana", result_ids=("r",))
    forged = _value_reply(awaited, "hana", 666)
    _publish(mallory, producer.producer_id, [({}, forged, None)])  # no user_id
    _until(lambda: producer.rejected_replies >= 1, "a reply without user_id was refused")
    _publish(mallory, producer.producer_id, [({}, forged, "fedplan-device-mallory")])
    _until(lambda: collector.refused >= 1, "mallory's reply for hana was refused")
    assert not pending.done()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:  # the broker checks it
        _publish(mallory, producer.producer_id, [({}, forged, "guest")])
    assert err.value.reply_code == 406
    _round_trip(producer, collector, "hana")
    assert not pending.done()


def test_a_reply_naming_the_wrong_device_is_refused_under_the_shared_user(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    producer: AmqpTransport,
    collector: ReplyCollector,
) -> None:
    workers("hana")
    producer.ensure_device("hana")
    awaited = new_id()
    pending = collector.expect(awaited, device_id="hana", result_ids=("r",))
    _publish(vhost.url, producer.producer_id, [({}, _value_reply(awaited, "ivan", 1), "guest")])
    _until(lambda: collector.refused >= 1, "a reply naming ivan for hana's command was refused")
    _publish(vhost.url, producer.producer_id, [({}, _value_reply(awaited, "hana", 2), "guest")])
    assert pending.value("r", 60) == 2  # the shared user is trusted: only the device id checks
    _round_trip(producer, collector, "hana")


def test_a_publish_that_outlives_its_confirm_timeout_fails_alone(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], collector: ReplyCollector
) -> None:
    workers("hana")
    settings = vhost.settings.replace(
        producer_id=f"h{secrets.token_hex(4)}", confirm_timeout=1.0, max_message_size=MIB
    )
    t = AmqpTransport(on_reply=collector.on_reply, settings=settings)
    try:
        t.ensure_device("hana")
        t.ensure_device("sink")  # no worker: what gets through waits in its queue
        cid = new_id()
        with pytest.raises(PublishTimeout, match=r"within 1\.0s") as err:
            t.publish("sink", b"\x00" * (400 * MIB), command_id=cid)
        assert isinstance(err.value, TimeoutError)
        for _ in range(3):
            _round_trip(t, collector, "hana")
        assert t.alive
    finally:
        t.close()


@pytest.fixture
def shared_user(vhost: RunVhost) -> Iterator[tuple[str, str]]:
    """A broker user with full rights in the vhost, other than the producer's: (name, URL)."""
    user, password = f"fedplan-shared-{secrets.token_hex(3)}", secrets.token_hex(8)
    vhost.admin.request("PUT", f"users/{vhost.admin.q(user)}", {"password": password, "tags": ""})
    vhost.admin.request(
        "PUT",
        f"permissions/{vhost.admin.q(vhost.name)}/{vhost.admin.q(user)}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield user, f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost.name, safe='')}"
    vhost.admin.request("DELETE", f"users/{vhost.admin.q(user)}")


def test_workers_on_another_shared_user_are_heard_only_when_it_is_trusted(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    collector: ReplyCollector,
    shared_user: tuple[str, str],
) -> None:
    user, url = shared_user
    workers("jo", env={"FEDPLAN_BROKER_URL": url})
    base = vhost.settings.replace(producer_id=f"h{secrets.token_hex(4)}")
    deaf = AmqpTransport(on_reply=collector.on_reply, settings=base)
    try:
        deaf.ensure_device("jo")
        cid = new_id()
        pending = collector.expect(cid, device_id="jo")
        deaf.publish("jo", cmd.store_object(cid, "jo", "x", torch.ones(2)), command_id=cid)
        _until(lambda: deaf.rejected_replies >= 1, "the untrusted user's reply was refused")
        assert not pending.done()
    finally:
        deaf.close()
    trusting = AmqpTransport(
        on_reply=collector.on_reply,
        settings=base.replace(producer_id=f"h{secrets.token_hex(4)}", trusted_reply_users=user),
    )
    try:
        _round_trip(trusting, collector, "jo")
    finally:
        trusting.close()
