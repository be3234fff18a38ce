"""Values larger than the maximum message size are chunked both ways and reassembled."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
import torch

from producer.transport.amqp import AmqpTransport
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq

MIB = 1024 * 1024


@pytest.fixture
def small_transport(vhost: RunVhost, replies: Replies) -> Iterator[AmqpTransport]:
    settings = vhost.settings.replace(producer_id=f"c{secrets.token_hex(4)}", max_message_size=MIB)
    t = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    yield t
    t.close()


def _round_trip(transport: AmqpTransport, replies: Replies, device: str, x: torch.Tensor) -> None:
    cid = new_id()
    transport.publish(device, cmd.store_object(cid, device, "big", x), command_id=cid)
    assert replies.wait(cid, 300).WhichOneof("outcome") == "ok"
    cid = new_id()
    transport.publish(device, cmd.get_object(cid, device, "big"), command_id=cid)
    reply = replies.wait(cid, 300)
    assert reply.WhichOneof("outcome") == "ok", reply.error
    assert torch.equal(tensor_from_proto(reply.ok.objects[0].value), x)


def test_a_tensor_larger_than_the_message_limit_round_trips_in_chunks(
    workers: Callable[..., WorkerProcess], small_transport: AmqpTransport, replies: Replies
) -> None:
    workers("frank", env={"FEDPLAN_MAX_MESSAGE_SIZE": str(MIB)})
    small_transport.ensure_device("frank")
    _round_trip(small_transport, replies, "frank", torch.randn(5 * MIB // 4 + 3))


@pytest.mark.slow
def test_a_512_mib_tensor_round_trips(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    workers("gina")
    transport.ensure_device("gina")
    _round_trip(transport, replies, "gina", torch.randn(128 * MIB))
