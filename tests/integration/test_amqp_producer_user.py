"""A least-privilege producer user from ``fedplan broker setup --producer``, with a real worker.

It runs commands on a device and reads its replies, and the device sees it by its broker
user; it can neither read another producer's results queue, nor publish to the results
exchange (forging replies), nor declare queues; the device's policy decides which devices
serve it.
"""

from __future__ import annotations

from collections.abc import Callable

import pika
import pika.exceptions as pex
import pytest
import torch

from broker_config import names
from consumer.policy.rules import PolicyFile
from producer.transport.amqp import AmqpTransport
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess, producer_transport

pytestmark = pytest.mark.rabbitmq


def test_a_producer_user_runs_commands_and_can_do_nothing_else(
    vhost: RunVhost,
    producer: tuple[str, str, str],
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
) -> None:
    other_results = transport.results_queue  # another producer's (existing) results queue
    _pid, user, url = producer
    worker = workers("pu")
    replies = Replies()
    mine = producer_transport(vhost, producer, replies)
    try:
        mine.ensure_device("pu")
        cid = new_id()
        mine.publish("pu", cmd.store_object(cid, "pu", "x", torch.ones(2)), command_id=cid)
        assert replies.wait(cid, 60).WhichOneof("outcome") == "ok", worker.log_tail()
        PolicyFile(worker.data_dir).update(allow=["someone-else"])  # the device stops serving it
        cid = new_id()
        mine.publish("pu", cmd.get_object(cid, "pu", "x"), command_id=cid)
        reply = replies.wait(cid, 60)
        assert reply.error.code == "POLICY_REFUSED" and user in reply.error.message
        PolicyFile(worker.data_dir).update(allow=[user])
        cid = new_id()
        mine.publish("pu", cmd.get_object(cid, "pu", "x"), command_id=cid)
        assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"  # valid work goes on
    finally:
        mine.close()

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for attempt in (
            lambda ch: ch.basic_get(other_results),
            lambda ch: ch.queue_declare("fedplan.results.mine-too"),
            lambda ch: ch.basic_publish(names.results_exchange(), "x", b"forged"),
        ):
            ch = conn.channel()
            ch.confirm_delivery()
            with pytest.raises((pex.ChannelClosedByBroker, pex.ConnectionClosedByBroker)) as e:
                attempt(ch)
            assert "ACCESS_REFUSED" in str(e.value) or "403" in str(e.value)
    finally:
        if conn.is_open:
            conn.close()


def test_a_producer_user_cannot_bind_its_results_queue_to_another_producers_replies(
    vhost: RunVhost, producer: tuple[str, str, str], transport: AmqpTransport
) -> None:
    pid, _user, url = producer
    other_key = names.results_routing_key(transport.producer_id)  # another producer's replies
    mine = names.results_queue(pid)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.queue_declare(mine, durable=True)
        ch.queue_bind(mine, names.results_exchange(), routing_key=names.results_routing_key(pid))
        for key in (other_key, "#", "fedplan.results.*"):
            ch = conn.channel()
            with pytest.raises(pex.ChannelClosedByBroker) as e:
                ch.queue_bind(mine, names.results_exchange(), routing_key=key)
            assert e.value.reply_code == 403, key
    finally:
        if conn.is_open:
            conn.close()
    # a reply to the other producer reaches its queue and never mine
    admin = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        ch = admin.channel()
        ch.queue_purge(mine)
        ch.basic_publish(names.results_exchange(), other_key, b"not for mallory")
        ch.basic_publish(names.results_exchange(), names.results_routing_key(pid), b"mine")
        vhost.wait_queue(mine, messages=1)
        _, _, body = ch.basic_get(mine, auto_ack=True)
        assert body == b"mine"
    finally:
        admin.close()
