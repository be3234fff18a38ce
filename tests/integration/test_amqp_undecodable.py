"""Deliveries the AMQP client libraries cannot decode must not take a device or producer down.

py-amqp (under the worker) raises on a short string property that is not UTF-8 or a header
timestamp past the year 9999, and pika (under the producer) on the latter; RabbitMQ passes
both through. Before the fix one such message stopped the worker for good ("Unrecoverable
error", and again for every worker after it) and cut a producer off its results queue.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.data
import pytest
import torch

from broker_config import names
from producer.transport.amqp import AmqpTransport
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess
from tests.integration.test_amqp_gate import RawSender, _dead, _ok

pytestmark = pytest.mark.rabbitmq


class RawField(bytes):
    """A header value written to the wire as these exact bytes (type letter and value)."""


HUGE_TIMESTAMP = RawField(b"T" + struct.pack(">Q", 2**64 - 1))


@pytest.fixture
def raw_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pika (the test's publisher) write :class:`RawField` header values verbatim."""
    original = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, RawField):
            pieces.append(bytes(value))
            return len(value)
        return original(pieces, value)  # type: ignore[no-any-return]

    monkeypatch.setattr(pika.data, "encode_value", encode_value)


@pytest.fixture
def sender(vhost: RunVhost, transport: AmqpTransport) -> Iterator[RawSender]:
    s = RawSender(vhost, names.results_routing_key(transport.producer_id))
    yield s
    s.close()


def test_deliveries_py_amqp_cannot_decode_are_refused_and_the_worker_keeps_serving(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    sender: RawSender,
    raw_fields: None,
) -> None:
    una = workers("una")
    transport.ensure_device("una")
    _ok(transport, replies, "una", torch.arange(3.0))
    dead_before = _dead(vhost)
    body = cmd.get_object("ignored", "una", "x")
    bad = b"\xff\xfe"
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, {"correlation_id": bad}),
        ({}, {"type": bad}),
        ({}, {"app_id": bad}),
        ({}, {"message_id": bad}),
        ({}, {"content_type": bad}),
        ({}, {"expiration": None, "cluster_id": bad}),
        ({"when": HUGE_TIMESTAMP}, {}),
        ({"nested": {"deeper": [1, HUGE_TIMESTAMP]}}, {}),
    ]
    cids = [sender.send("una", body, headers=h, **p) for h, p in cases]
    # no reply address that can be read: refused without a reply
    sender.send("una", body, reply_to=b"fedplan.results.\xff")
    for cid, case in zip(cids, cases, strict=True):
        reply = replies.wait(cid, 60)
        assert reply.error.code == "MESSAGE_REFUSED", (case, reply.error)
        assert "undecodable" in reply.error.message, (case, reply.error)
    vhost.wait_queue(names.dead_letter_queue(), messages=dead_before + len(cases) + 1)
    vhost.wait_queue(names.device_queue("una"), messages=0, messages_unacknowledged=0)
    assert una.proc is not None and una.proc.poll() is None  # the worker never died
    _ok(transport, replies, "una", torch.arange(5.0))
    assert all(replies.count(cid) == 1 for cid in cids)


def test_a_reply_with_a_timestamp_pika_cannot_decode_does_not_cut_the_producer_off(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    raw_fields: None,
) -> None:
    workers("vic")
    transport.ensure_device("vic")
    _ok(transport, replies, "vic", torch.arange(3.0))
    conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for headers in ({"t": HUGE_TIMESTAMP}, {"a": [HUGE_TIMESTAMP]}):
            ch.basic_publish(
                names.results_exchange(),
                names.results_routing_key(transport.producer_id),
                b"not a reply",
                pika.BasicProperties(user_id="guest", correlation_id=new_id(), headers=headers),
            )
    finally:
        conn.close()
    _ok(transport, replies, "vic", torch.arange(4.0))  # well within its reconnect delay
    assert transport.rejected_replies == 2  # both read, refused and acked
    vhost.wait_queue(
        names.results_queue(transport.producer_id), messages=0, messages_unacknowledged=0
    )
