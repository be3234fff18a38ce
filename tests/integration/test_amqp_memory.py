"""A plan that allocates more memory than its pool process may use ends with one typed
``MEMORY_LIMIT`` error reply, and the worker keeps serving (issue 8, "memory kill"; issue 11:
``FEDPLAN_POOL_MEMORY_LIMIT`` and the policy's ``max_alloc_bytes`` while a plan runs)."""

from __future__ import annotations

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
from tests.integration.test_amqp_gate import _ok

pytestmark = pytest.mark.rabbitmq


def _outer_plan() -> PlanIR:
    """``x -> torch.outer(x, x)``: n floats in, n*n floats out."""
    return PlanIR(
        name="outer",
        inputs=(Ref(0),),
        ops=[Op("torch.outer", (Ref(0), Ref(0)), {}, Ref(1))],
        outputs=Ref(1),
        num_slots=2,
        state={},
        state_values={},
    )


def test_a_plan_allocating_past_the_pool_process_memory_limit_gets_one_error_reply(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    mem = workers("mem", env={"FEDPLAN_POOL_MEMORY_LIMIT": str(1024**3)})  # 1 GiB over start
    transport.ensure_device("mem")
    small, huge = torch.arange(3.0), torch.ones(60_000)  # outer(huge, huge): 14.4 GB
    for build in (
        lambda c: cmd.store_object(c, "mem", "small", small),
        lambda c: cmd.store_object(c, "mem", "huge", huge),
        lambda c: cmd.store_plan(c, "mem", _outer_plan(), "outer"),
    ):
        cid = new_id()
        transport.publish("mem", build(cid), command_id=cid)
        assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"
    cid = new_id()
    transport.publish("mem", cmd.run_plan(cid, "mem", "outer", ["huge"], ["y"]), command_id=cid)
    reply = replies.wait(cid, 120)
    assert reply.error.code == "MEMORY_LIMIT", reply
    assert "FEDPLAN_POOL_MEMORY_LIMIT" in reply.error.message
    ok = new_id()  # the same plan on a small input still runs, and equals eager torch
    transport.publish("mem", cmd.run_plan(ok, "mem", "outer", ["small"], ["z"]), command_id=ok)
    got = replies.wait(ok, 60)
    assert got.WhichOneof("outcome") == "ok", got.error
    assert torch.equal(tensor_from_proto(got.ok.objects[0].value), torch.outer(small, small))
    _ok(transport, replies, "mem", torch.ones(2))
    vhost.wait_queue(names.device_queue("mem"), messages=0, messages_unacknowledged=0)
    assert replies.count(cid) == 1
    assert mem.proc is not None and mem.proc.poll() is None


def test_the_alloc_budget_limits_a_commands_memory_where_the_pre_check_cannot_see(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    from consumer.policy.rules import PolicyFile
    from tests.behaviour.test_run_budgets import _guarded_outer

    mem = workers("alloc")  # no pool limit: the policy's budget is the only bound
    transport.ensure_device("alloc")
    small, huge = torch.ones(3), torch.ones(60_000)  # outer(huge, huge): 14.4 GB
    for build in (
        lambda c: cmd.store_object(c, "alloc", "small", small),
        lambda c: cmd.store_object(c, "alloc", "huge", huge),
        lambda c: cmd.store_plan(c, "alloc", _guarded_outer.ir, "guarded"),
    ):
        cid = new_id()
        transport.publish("alloc", build(cid), command_id=cid)
        assert replies.wait(cid, 60).WhichOneof("outcome") == "ok"
    PolicyFile(mem.data_dir).update(budgets={"max_alloc_bytes": 64 * 1024 * 1024})
    cid = new_id()  # a guard on a value: not measured before; the allocation itself fails
    transport.publish(
        "alloc", cmd.run_plan(cid, "alloc", "guarded", ["huge"], ["y"]), command_id=cid
    )
    reply = replies.wait(cid, 120)
    assert reply.error.code == "MEMORY_LIMIT", reply
    assert "max_alloc_bytes" in reply.error.message
    ok = new_id()
    transport.publish(
        "alloc", cmd.run_plan(ok, "alloc", "guarded", ["small"], ["z"]), command_id=ok
    )
    got = replies.wait(ok, 60)
    assert got.WhichOneof("outcome") == "ok", got.error
    assert torch.equal(tensor_from_proto(got.ok.objects[0].value), torch.outer(small, small) + 1)
    vhost.wait_queue(names.device_queue("alloc"), messages=0, messages_unacknowledged=0)
    assert mem.proc is not None and mem.proc.poll() is None
