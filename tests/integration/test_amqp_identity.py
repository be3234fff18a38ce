"""Identity over RabbitMQ with a real worker: the sender is the broker-validated ``user_id``.

A forged ``user_id`` never reaches the device (the broker closes the channel), a sender's
own ``fedplan_sender`` header is ignored, a command without ``user_id`` is refused by the
gate; after each, valid work still succeeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions as pex
import pytest
import torch

from broker_config import names
from broker_config.envelope import CONTENT_ENCODING, CONTENT_TYPE, task_headers
from producer.transport.amqp import AmqpTransport
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def _publish(
    vhost: RunVhost, transport: AmqpTransport, device: str, body: bytes, cid: str, **props: Any
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(
            names.commands_exchange(),
            names.device_routing_key(device),
            body,
            pika.BasicProperties(
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                correlation_id=cid,
                reply_to=names.results_routing_key(transport.producer_id),
                delivery_mode=2,
                **props,
            ),
        )
    finally:
        if conn.is_open:
            conn.close()


def _stores_and_reads(transport: AmqpTransport, replies: Replies, device: str) -> None:
    x = torch.randn(3)
    cid = new_id()
    transport.publish(device, cmd.store_object(cid, device, "ok", x), command_id=cid)
    assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"
    cid = new_id()
    transport.publish(device, cmd.get_object(cid, device, "ok"), command_id=cid)
    assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"


def test_a_forged_user_id_is_refused_by_the_broker_and_a_forged_sender_header_is_ignored(
    vhost: RunVhost,
    transport: AmqpTransport,
    replies: Replies,
    workers: Callable[..., WorkerProcess],
) -> None:
    device = "idn"
    workers(device)
    transport.ensure_device(device)
    cid = new_id()
    transport.publish(device, cmd.store_object(cid, device, "mine", torch.ones(2)), command_id=cid)
    assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"

    forged = new_id()
    with pytest.raises((pex.ChannelClosedByBroker, pex.ConnectionClosedByBroker)) as closed:
        _publish(
            vhost,
            transport,
            device,
            cmd.get_object(forged, device, "mine"),
            forged,
            headers=task_headers(forged),
            user_id="fedplan-victim",
        )
    assert "PRECONDITION_FAILED" in str(closed.value) or "406" in str(closed.value)

    # a sender's own header claiming another identity: the gate rebuilds it from user_id
    claim = new_id()
    headers = {**task_headers(claim), "fedplan_sender": "someone-else"}
    _publish(
        vhost,
        transport,
        device,
        cmd.get_object(claim, device, "mine"),
        claim,
        headers=headers,
        user_id=transport.user,
    )
    assert replies.wait(claim, 60).WhichOneof("outcome") == "ok"  # ran as its real sender

    anonymous = new_id()  # no user_id at all: the gate refuses it
    _publish(
        vhost,
        transport,
        device,
        cmd.get_object(anonymous, device, "ok"),
        anonymous,
        headers=task_headers(anonymous),
    )
    reply = replies.wait(anonymous, 60)
    assert reply.error.code == "MESSAGE_REFUSED" and "user_id" in reply.error.message
    _stores_and_reads(transport, replies, device)
