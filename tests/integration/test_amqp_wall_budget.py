"""The policy's wall-time budget on a real worker: a slow plan ends with a typed TIME_LIMIT
error naming the budget, applied without a restart, and the device serves on."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from consumer.policy.rules import PolicyFile
from producer.transport.amqp import AmqpTransport
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def test_a_slow_plan_past_the_policys_wall_time_budget_gets_a_time_limit_reply(
    workers: Callable[..., WorkerProcess], transport: AmqpTransport, replies: Replies
) -> None:
    worker = workers("wall", env={"FEDPLAN_SOFT_TIME_LIMIT": "120", "FEDPLAN_TIME_LIMIT": "180"})
    transport.ensure_device("wall")
    n = 1200  # 1,500 steps of this: far past the 1 s limit on any machine
    w, x = torch.randn(n, n) / math.sqrt(n), torch.randn(n, n)
    for build in (
        lambda c: cmd.store_object(c, "wall", "big", x),
        lambda c: cmd.store_plan(c, "wall", cmd.slow_plan(1500, w), "slow"),
    ):
        cid = new_id()
        transport.publish("wall", build(cid), command_id=cid)
        assert replies.wait(cid, 120).WhichOneof("outcome") == "ok"
    PolicyFile(worker.data_dir).update(budgets={"max_wall_seconds": 1})  # no restart
    cid = new_id()
    transport.publish("wall", cmd.run_plan(cid, "wall", "slow", ["big"], ["y"]), command_id=cid)
    reply = replies.wait(cid, 60)
    assert reply.error.code == "TIME_LIMIT", reply
    assert "time limit of 1 s" in reply.error.message and "max_wall_seconds" in reply.error.message
    cid = new_id()
    transport.publish("wall", cmd.store_object(cid, "wall", "ok", torch.ones(2)), command_id=cid)
    assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"  # the device serves on
