"""Issue 11 budgets, unit level: the allocation tally and pre-check, the per-command memory
limit, the per-producer command rate (gate and embedded runtime), chunks of one sender."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from broker_config.envelope import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    TRANSFER_HEADER,
    task_headers,
)
from broker_config.settings import Settings
from consumer.policy.audit import AuditLog
from consumer.policy.fairness import ProducerBudgets
from consumer.policy.rules import MemoryPolicy, Policy, PolicyFile
from consumer.runtime.budgets import RunBudget, measure_op, measure_plan
from consumer.runtime.device import DeviceRuntime
from consumer.runtime.interpreter import LoadedPlan
from consumer.store.memory import MemoryStore
from consumer.worker.chunks import assemble, done_with_chunks, transfer_dir
from consumer.worker.gate import SENDER_HEADER, Gate
from consumer.worker.memory import command_memory
from schemas.command_pb2 import Command, StoreObject
from schemas.errors import MessageRefused
from schemas.ir import SCHEMA_VERSION, Op, PlanIR, Ref
from schemas.tensor_codec import tensor_to_proto
from schemas.wire import decode_reply, encode_command

QUEUE = "fedplan.device.d1"
"""The queue the test deliveries come from (the gate names the device from it)."""


def _outer() -> PlanIR:
    return PlanIR(
        name="outer",
        inputs=(Ref(0),),
        ops=[
            Op("torch.outer", (Ref(0), Ref(0)), {}, Ref(1)),
            Op("Tensor.add_", (Ref(1), 1.0), {}, Ref(2)),  # in place: costs nothing more
            Op("Tensor.view", (Ref(2), -1), {}, Ref(3)),  # a view: costs nothing more
            Op("torch.sum", (Ref(3),), {}, Ref(4)),
        ],
        outputs=Ref(4),
        num_slots=5,
    )


def test_the_pre_check_measures_an_input_dependent_allocation_without_allocating_it() -> None:
    loaded = LoadedPlan(_outer())
    n = 1_000_000  # outer(x, x) would be 4 TB
    peak = measure_plan(loaded, (torch.ones(n),), {}, {}, ValueError)
    assert peak == n * n * 4 + 4  # the outer product (its view and in-place result are free)
    assert measure_plan(loaded, (torch.ones(3),), {}, {}, ValueError) == 3 * 3 * 4 + 4
    assert measure_op(torch.outer, [torch.ones(n), torch.ones(n)], {}) == n * n * 4


def test_the_pre_check_leaves_the_random_state_as_it_was() -> None:
    ir = PlanIR(
        name="noise",
        inputs=(Ref(0),),
        ops=[Op("torch.randn_like", (Ref(0),), {}, Ref(1))],
        outputs=Ref(1),
        num_slots=2,
    )
    torch.manual_seed(0)
    expected = torch.randn(4)
    torch.manual_seed(0)
    assert measure_plan(LoadedPlan(ir), (torch.ones(4),), {}, {}, ValueError) == 16
    assert torch.equal(torch.randn(4), expected)


def test_the_live_tally_stops_a_run_past_its_budget_and_counts_views_and_frees_as_free() -> None:
    loaded = LoadedPlan(_outer())
    budget = RunBudget(limit=100 * 100 * 4 - 1, over=lambda n: MemoryError(f"{n} bytes"))
    with pytest.raises(MemoryError, match="40000 bytes"):
        loaded.run((torch.ones(100),), {}, {}, watch=budget.watch)
    fits = RunBudget(limit=100 * 100 * 4 + 4)
    out = loaded.run((torch.ones(100),), {}, {}, watch=fits.watch)
    assert out.item() == pytest.approx(
        float((torch.outer(torch.ones(100), torch.ones(100)) + 1).sum())
    )
    assert fits.peak == 100 * 100 * 4 + 4


def test_a_command_over_the_budget_meets_the_memory_limit_and_the_process_allocates_after() -> None:
    resource = pytest.importorskip("resource")
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with (
        command_memory(64 * 1024 * 1024),
        pytest.raises((MemoryError, RuntimeError), match="memory"),
    ):
        torch.ones(4 * 1024**3 // 4)  # 4 GiB: past the budget + slack
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    assert torch.ones(1024**2).sum().item() == 1024**2


def test_the_command_rate_refuses_a_sender_over_its_bucket_and_refills_it() -> None:
    now = [0.0]
    rates = ProducerBudgets(clock=lambda: now[0])
    assert [rates.take_command("p1", 3) for _ in range(3)] == [None, None, None]
    assert rates.take_command("p1", 3) == pytest.approx(20.0)  # 3 a minute: one every 20 s
    assert rates.take_command("p2", 3) is None  # another sender has its own bucket
    now[0] = 20.0
    assert rates.take_command("p1", 3) is None
    assert rates.take_command("p1", 0) is None  # no budget: no limit
    refusal = rates.refusal("p1", commands_per_minute=3, seconds_per_minute=0, device_id="d1")
    assert refusal is not None and "budgets.max_commands_per_minute" in refusal.message


def test_device_time_is_charged_after_a_command_and_refuses_its_sender_until_repaid() -> None:
    now = [0.0]
    shares = ProducerBudgets(clock=lambda: now[0])
    assert shares.device_time_wait("p1", 6) is None
    shares.charge_device_time("p1", 4.0, 6)
    assert shares.device_time_wait("p1", 6) is None  # 2 s left
    shares.charge_device_time("p1", 5.0, 6)  # a long command runs to its end: 3 s in debt
    assert shares.device_time_wait("p1", 6) == pytest.approx(30.0)  # 0.1 s back a second
    refusal = shares.refusal("p1", commands_per_minute=0, seconds_per_minute=6, device_id="d")
    assert refusal is not None and "budgets.max_device_seconds_per_minute" in refusal.message
    assert shares.device_time_wait("p2", 6) is None  # others are served
    now[0] = 30.5
    assert shares.device_time_wait("p1", 6) is None


class _Channel:
    def __init__(self) -> None:
        self.rejected: list[Any] = []
        self.acked: list[int] = []

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.rejected.append((tag, requeue))

    def basic_ack(self, tag: int) -> None:
        self.acked.append(tag)


def _raw(
    user: str, headers: dict[str, Any] | None = None, redelivered: bool = False, tag: int = 7
) -> Any:
    props = {
        "content_type": CONTENT_TYPE,
        "content_encoding": CONTENT_ENCODING,
        "application_headers": {**task_headers("c1"), **(headers or {})},
        "correlation_id": "c1",
        "user_id": user,
        "reply_to": "fedplan.results.p1",
    }
    info = {"redelivered": redelivered, "routing_key": "fedplan.device.d1"}
    return SimpleNamespace(
        properties=props, body=b"x", delivery_info=info, delivery_tag=tag, channel=_Channel()
    )


def test_the_gate_refuses_a_producer_over_its_command_rate_acked_not_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("consumer.worker.gate.send_error", lambda *a, **k: sent.append(a[2]))
    sent: list[Any] = []
    PolicyFile(tmp_path).update(budgets={"max_commands_per_minute": 2})
    gate = Gate(Settings(data_dir=tmp_path))
    assert gate.admit(_raw("p1"), QUEUE) and gate.admit(_raw("p1"), QUEUE)
    refused = _raw("p1")
    assert not gate.admit(refused, QUEUE)
    assert refused.channel.acked == [7] and refused.channel.rejected == []
    assert sent[0].code == "POLICY_REFUSED" and "max_commands_per_minute" in sent[0].message
    [row] = AuditLog(tmp_path).entries()  # the refusal is audited
    assert (row.sender, row.rule) == ("p1", "budgets.max_commands_per_minute")
    assert gate.admit(_raw("p2"), QUEUE)  # another producer is served
    assert gate.admit(_raw("p1", redelivered=True), QUEUE)  # a redelivery does not count again
    chunk = _raw("p1", {TRANSFER_HEADER: "t1", CHUNK_HEADER: 1, CHUNKS_HEADER: 2})
    assert not gate.admit(chunk, QUEUE)  # nor a transfer's later chunks: stored by the gate,
    assert chunk.channel.acked == [7] and len(sent) == 1  # acked, not refused
    assert [f.name for f in (tmp_path / "chunks").glob("*/1")] == ["1"]


def test_the_gate_charges_each_command_its_own_run_time_when_commands_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("consumer.worker.gate.send_error", lambda *a, **k: sent.append(a[2]))
    monkeypatch.setattr("consumer.worker.gate.time.monotonic", lambda: now[0])
    sent: list[Any] = []
    PolicyFile(tmp_path).update(budgets={"max_device_seconds_per_minute": 6})
    gate = Gate(Settings(data_dir=tmp_path))
    gate.fairness = ProducerBudgets(clock=lambda: now[0])
    assert gate.admit(_raw("p1", tag=1), QUEUE)  # p1's slow command
    gate.started(1, now[0] + 0.5)  # a pool process takes it half a second later
    now[0] += 1.0
    assert gate.admit(_raw("p2", tag=2), QUEUE)  # p2's quick one, on the other pool process
    gate.started(2)
    now[0] += 0.2
    gate.finished(2)  # p2 ran 0.2 s
    now[0] += 9.3
    gate.finished(1)  # p1 ran 10 s, from its start to its end, beside p2's
    gate.finished(1)  # a second settle of the same delivery charges nothing more
    assert gate.admit(_raw("p2", tag=3), QUEUE)  # p2 was charged its own 0.2 s only
    gate.finished(3)
    assert not gate.admit(_raw("p1", tag=4), QUEUE)  # p1 is 4 s in debt
    assert "max_device_seconds_per_minute" in sent[0].message
    now[0] += 41.0  # repaid at 0.1 s a second
    assert gate.admit(_raw("p1", tag=5), QUEUE)
    gate.started(5)
    now[0] += 20.0  # its reply is out, its message not settled yet: the next command comes
    assert not gate.admit(_raw("p1", tag=6), QUEUE)  # the 20 s so far count already
    gate.finished(5)


def test_a_command_waiting_for_a_pool_process_is_charged_from_its_start_not_its_admission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("consumer.worker.gate.send_error", lambda *a, **k: None)
    monkeypatch.setattr("consumer.worker.gate.time.monotonic", lambda: now[0])
    PolicyFile(tmp_path).update(budgets={"max_device_seconds_per_minute": 6})
    gate = Gate(Settings(data_dir=tmp_path))
    gate.fairness = ProducerBudgets(clock=lambda: now[0])
    assert gate.admit(_raw("p1", tag=1), QUEUE)
    now[0] += 30.0  # prefetched behind other commands for 30 s
    gate.started(1)
    now[0] += 1.0
    gate.finished(1)
    assert gate.admit(_raw("p1", tag=2), QUEUE)  # charged 1 s, not 31 s


def _store(cid: str) -> bytes:
    body = StoreObject(id=cid, tensor=tensor_to_proto(torch.ones(2)))
    return encode_command(
        Command(schema_version=SCHEMA_VERSION, command_id=cid, device_id="d1", store_object=body)
    )


def test_an_embedded_device_refuses_a_producer_over_its_command_rate_unrun() -> None:
    store = MemoryStore()
    policy = MemoryPolicy(Policy.from_json({"budgets": {"max_commands_per_minute": 2}}))
    runtime = DeviceRuntime(device_id="d1", store=store, policy=policy, rates=ProducerBudgets())
    outcomes = [decode_reply(runtime.handle(_store(f"c{i}"), "p1")) for i in range(3)]
    assert [r.WhichOneof("outcome") for r in outcomes] == ["ok", "ok", "error"]
    assert outcomes[2].error.code == "POLICY_REFUSED"
    assert "max_commands_per_minute" in outcomes[2].error.message
    assert not store.has_object("@2:p1/c2")  # unrun
    assert decode_reply(runtime.handle(_store("c9"), "p2")).WhichOneof("outcome") == "ok"


def _chunk(transfer: str, index: int, count: int, sender: str) -> Any:
    return SimpleNamespace(
        **{TRANSFER_HEADER: transfer, CHUNK_HEADER: index, CHUNKS_HEADER: count},
        **{SENDER_HEADER: sender},
    )


def test_a_chunk_from_another_sender_is_refused_and_does_not_poison_the_transfer(
    tmp_path: Path,
) -> None:
    s = Settings(data_dir=tmp_path, max_message_size=4096, max_command_size=16384)
    assert assemble(s, _chunk("t", 0, 3, "alice"), b"a" * 4096) is None
    with pytest.raises(MessageRefused, match="another sender"):
        assemble(s, _chunk("t", 1, 3, "mallory"), b"EVIL")
    done_with_chunks(s, _chunk("t", 1, 3, "mallory"))  # the refusal's clean-up keeps it
    assert transfer_dir(s, "t", 3).exists()
    assert assemble(s, _chunk("t", 1, 3, "alice"), b"b" * 4096) is None
    with pytest.raises(MessageRefused, match="another sender"):
        assemble(s, _chunk("t", 2, 3, "mallory"), b"c")  # not even the last chunk
    assert assemble(s, _chunk("t", 2, 3, "alice"), b"c") == b"a" * 4096 + b"b" * 4096 + b"c"


def test_what_a_device_forwards_for_a_producer_over_its_budget_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("consumer.worker.gate.send_error", lambda *a, **k: None)
    PolicyFile(tmp_path).update(budgets={"max_commands_per_minute": 1})
    gate = Gate(Settings(data_dir=tmp_path))
    assert gate.admit(_raw("p1"), QUEUE) and not gate.admit(_raw("p1"), QUEUE)
    moved = _raw("fedplan-device-bob", {"fedplan_on_behalf": "p1"})  # a move's object
    assert gate.admit(moved, QUEUE)  # the source already sent it off: refusing would lose it
    policy = MemoryPolicy(Policy.from_json({"budgets": {"max_commands_per_minute": 1}}))
    runtime = DeviceRuntime(
        device_id="d1", store=MemoryStore(), policy=policy, rates=ProducerBudgets()
    )
    assert decode_reply(runtime.handle(_store("a"), "p1")).WhichOneof("outcome") == "ok"
    assert decode_reply(runtime.handle(_store("b"), "p1")).WhichOneof("outcome") == "error"
    forwarded = decode_reply(runtime.handle(_store("c"), "p1", forwarded=True))
    assert forwarded.WhichOneof("outcome") == "ok"
