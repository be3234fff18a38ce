"""A worker under a least-privilege device user serves its queue and nothing else."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
import torch

from broker_config import names
from broker_config.setup import create_device_user, declare_topology
from producer.transport.amqp import AmqpTransport
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def device_user(vhost: RunVhost) -> Iterator[tuple[str, str]]:
    """A device id and the AMQP URL of its least-privilege user (deleted afterwards)."""
    device = f"lp{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    declare_topology(vhost.client, vhost.settings, [device, "other"])
    user = create_device_user(vhost.client, device, password)
    url = f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost.name, safe='')}"
    yield device, url
    vhost.admin.request("DELETE", f"users/{vhost.admin.q(user)}")


def test_a_worker_under_a_device_user_serves_its_own_queue(
    vhost: RunVhost,
    device_user: tuple[str, str],
    tmp_path: Path,
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    device, url = device_user
    worker = WorkerProcess(
        device,
        tmp_path / device,
        vhost,
        {"FEDPLAN_BROKER_URL": url, "FEDPLAN_WORKER_DECLARES": "false"},
    )
    try:
        worker.start().wait_ready()
        transport.ensure_device(device)
        x = torch.randn(3)
        store, get = new_id(), new_id()
        transport.publish(device, cmd.store_object(store, device, "x", x), command_id=store)
        assert replies.wait(store, 60).WhichOneof("outcome") == "ok", worker.log_tail()
        transport.publish(device, cmd.get_object(get, device, "x"), command_id=get)
        reply = replies.wait(get, 60)
        assert torch.equal(tensor_from_proto(reply.ok.objects[0].value), x)
    finally:
        worker.stop()


def test_a_device_user_can_read_no_other_queue(device_user: tuple[str, str]) -> None:
    _, url = device_user
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().basic_get(names.device_queue("other"))
        assert err.value.reply_code == 403
    finally:
        conn.close()


def test_a_device_user_can_publish_only_to_the_results_exchange(
    device_user: tuple[str, str],
) -> None:
    _, url = device_user
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(names.results_exchange(), "nobody", b"ok")  # allowed (unroutable)
        for exchange, key in (("", names.device_queue("other")), (names.commands_exchange(), "x")):
            ch = conn.channel()
            ch.confirm_delivery()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
                ch.basic_publish(exchange, key, b"forged")
            assert err.value.reply_code == 403
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().queue_declare(names.device_queue("mine"), durable=True)
        assert err.value.reply_code == 403
    finally:
        conn.close()
