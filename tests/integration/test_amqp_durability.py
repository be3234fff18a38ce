"""Real Celery workers: plan state kept across restarts, poison commands refused."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
import torch

from broker_config import names
from producer.transport.amqp import AmqpTransport
from schemas.ir import Op, PlanIR, Ref
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def _accumulate(w: torch.Tensor) -> PlanIR:
    """``x -> w.add_(x) * 2``: state ``w`` grows by ``x`` at every run."""
    return PlanIR(
        name="accumulate",
        inputs=(Ref(0),),
        ops=[
            Op("Tensor.add_", (Ref(1), Ref(0)), {}, Ref(2)),
            Op("torch.mul", (Ref(2), 2.0), {}, Ref(3)),
        ],
        outputs=Ref(3),
        num_slots=4,
        state={"w": 1},
        state_values={"w": w},
    )


def _send(transport: AmqpTransport, replies: Replies, data: bytes, cid: str, device: str) -> object:
    transport.publish(device, data, command_id=cid)
    return replies.wait(cid, 60.0)


def _run(transport: AmqpTransport, replies: Replies, device: str, result: str) -> object:
    cid = new_id()
    return _send(transport, replies, cmd.run_plan(cid, device, "acc", ["x"], [result]), cid, device)


def _value(reply: object) -> torch.Tensor:
    assert reply.WhichOneof("outcome") == "ok", reply  # type: ignore[attr-defined]
    return tensor_from_proto(reply.ok.objects[0].value)  # type: ignore[attr-defined]


def _setup(
    transport: AmqpTransport, replies: Replies, device: str, w: torch.Tensor, x: torch.Tensor
) -> None:
    for data_of in (
        lambda c: cmd.store_object(c, device, "x", x),
        lambda c: cmd.store_plan(c, device, _accumulate(w.clone()), "acc"),
    ):
        cid = new_id()
        r = _send(transport, replies, data_of(cid), cid, device)
        assert r.WhichOneof("outcome") == "ok", r  # type: ignore[attr-defined]


def test_plan_state_changed_by_runs_survives_a_worker_restart(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    w, x = torch.randn(8), torch.randn(8)
    erin = workers("erin")
    transport.ensure_device("erin")
    _setup(transport, replies, "erin", w, x)
    eager = w.clone()
    for i in range(3):
        got = _value(_run(transport, replies, "erin", f"y{i}"))
        assert torch.allclose(got, eager.add_(x) * 2)
    erin.stop()
    workers("erin")  # a new worker process on the same data directory
    got = _value(_run(transport, replies, "erin", "y3"))
    assert torch.allclose(got, eager.add_(x) * 2)


def test_a_command_that_kills_its_worker_every_time_gets_an_error_reply_and_the_dlq(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], replies: Replies
) -> None:
    marker = f"crash-{secrets.token_hex(4)}"
    limit = 3
    frank = workers(
        "frank",
        env={"FEDPLAN_TEST_CRASH_MARKER": marker, "FEDPLAN_DELIVERY_LIMIT": str(limit)},
        app="tests.integration.crash_app",
    )
    settings = vhost.settings.replace(producer_id=f"t{secrets.token_hex(4)}", delivery_limit=limit)
    transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)  # same queue args
    try:
        _poison_then_valid(vhost, frank, transport, replies, marker, limit)
    finally:
        transport.close()


def _poison_then_valid(
    vhost: RunVhost,
    frank: WorkerProcess,
    transport: AmqpTransport,
    replies: Replies,
    marker: str,
    limit: int,
) -> None:
    transport.ensure_device("frank")
    w, x = torch.randn(4), torch.randn(4)
    _setup(transport, replies, "frank", w, x)
    dead = names.dead_letter_queue()
    dead_before = int(vhost.queue(dead).get("messages", 0))  # type: ignore[call-overload]
    cid = new_id()
    poison = cmd.run_plan(cid, "frank", "acc", ["x"], [marker])
    reply = _send(transport, replies, poison, cid, "frank")
    assert reply.WhichOneof("outcome") == "error"  # type: ignore[attr-defined]
    error = reply.error  # type: ignore[attr-defined]
    assert error.code == "EXECUTION_FAILED"
    assert f"delivered {limit + 1} times" in error.message
    assert list(reply.result_ids) == [marker]  # type: ignore[attr-defined]
    vhost.wait_queue(dead, messages=dead_before + 1)
    vhost.wait_queue(names.device_queue("frank"), messages=0)
    assert frank.log_tail(400).count("WorkerLostError") >= limit
    got = _value(_run(transport, replies, "frank", "y"))  # the refused run changed nothing
    assert torch.allclose(got, (w + x) * 2)
    assert replies.count(cid) == 1
