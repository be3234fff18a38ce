"""Secure-aggregation rounds on both transports: the committed model is eager FedAvg of the
devices' updates (within the quantization error), a third may drop after masking, more
fail cleanly, and no message the producer sends or receives holds an update in the clear."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import producer as fp
from consumer.secagg.errors import SecAggThresholdError
from consumer.secagg.quantize import unpack_vector
from producer.fl.participants import PlanParticipant
from producer.fl.rounds import RoundPolicy
from producer.fl.secure_rounds import SecureAggregation, SecureRoundRunner
from producer.fl.secure_training import build_update_plan
from producer.fl.strategy import FedAvg
from producer.fl.training import (
    TrainingSpec,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
)
from producer.remote.collector import ReplyCollector
from schemas import command_pb2 as cmd
from schemas.wire import decode_command
from tests.behaviour.conftest import DeviceFactory

pytestmark = pytest.mark.timeout(900)  # RabbitMQ rounds take minutes on a loaded machine

SPEC = TrainingSpec(batch_size=4, lr=0.2)


@dataclass
class Wiretap:
    """Every command the producer publishes and every reply it takes, as bytes; commands of
    the bodies in ``drop`` never reach the listed devices (as if they went offline)."""

    commands: list[tuple[str, str, bytes]] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    drop: dict[str, set[str]] = field(default_factory=dict)

    def bodies(self, body: str) -> list[str]:
        return [d for d, b, _ in self.commands if b == body]


@pytest.fixture
def wiretap(fleet: fp.Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[Wiretap]:
    tap = Wiretap()
    publish = fleet.transport.publish

    def recording_publish(device_id: str, data: bytes, *, command_id: str) -> None:
        body = decode_command(data).WhichOneof("body") or ""
        tap.commands.append((device_id, body, bytes(data)))
        if device_id in tap.drop.get(body, set()):
            return
        publish(device_id, data, command_id=command_id)

    deliver = ReplyCollector._deliver

    def recording_deliver(self: ReplyCollector, pending: Any, reply: cmd.Reply,
                          sender: str | None, values: Any = None) -> bool:
        tap.replies.append(reply.SerializeToString())
        return deliver(self, pending, reply, sender, values)

    monkeypatch.setattr(fleet.transport, "publish", recording_publish)
    monkeypatch.setattr(ReplyCollector, "_deliver", recording_deliver)
    yield tap


@dataclass
class Setup:
    model: nn.Module
    weights: dict[str, torch.Tensor]
    data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    members: list[PlanParticipant]


def make_setup(device: DeviceFactory, n: int, sizes: tuple[int, ...] = (8, 12), *,
               adaptive_clip: bool = False) -> Setup:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    run = secrets.token_hex(3)
    g = torch.Generator().manual_seed(1)
    data, members = {}, []
    plans: dict[int, Any] = {}
    for i in range(n):
        rows = sizes[i % len(sizes)]
        x, y = torch.randn(rows, 4, generator=g), torch.randint(0, 3, (rows,), generator=g)
        dev = device(f"sa{i}-{run}", data=[fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
        data[dev.id] = (x, y)

        def plan_for(rows: int) -> Any:
            if rows not in plans:
                plans[rows] = build_update_plan(model, SPEC, rows, adaptive_clip=adaptive_clip)
            return plans[rows]

        members.append(PlanParticipant(dev, plan_for, timeout=120))
    return Setup(model, get_weights(model), data, members)


def eager_updates(s: Setup, server_round: int = 1) -> dict[str, torch.Tensor]:
    """Each device's update ``w_k - w``, computed with plain torch."""
    out = {}
    for index, member in enumerate(s.members):
        x, y = s.data[member.device_id]
        order = sample_order(len(x), 1000 * server_round + index)
        new, _ = train_eager(scratch_copy(s.model), SPEC, s.weights, x, y, order)
        out[member.device_id] = flatten(new) - flatten(s.weights)
    return out


def runner(s: Setup, **secure: Any) -> SecureRoundRunner:
    secure.setdefault("stage_deadline", 300.0)  # a stage ends early when every device answered
    return SecureRoundRunner(s.members, FedAvg(), SecureAggregation(**secure),
                             RoundPolicy(deadline=300.0, max_attempts=1))


def assert_fedavg_of(s: Setup, new: dict[str, torch.Tensor], who: list[str],
                     bound: float) -> None:
    updates = eager_updates(s)
    counts = {m.device_id: m.num_examples for m in s.members}
    total = sum(counts[d] for d in who)
    mean = sum(updates[d].double() * counts[d] for d in who) / total
    got = flatten(new).double() - flatten(s.weights).double()
    assert (got - mean).abs().max().item() <= bound / total + 1e-6


def test_a_secure_round_commits_eager_fedavg_of_the_updates_within_the_quantization_error(
    device: DeviceFactory, wiretap: Wiretap
) -> None:
    s = make_setup(device, 4)
    run = runner(s)
    outcome = run.run_round(1, s.weights)
    assert outcome.committed and outcome.weights is not None
    aggregate = run.last_aggregate
    assert aggregate is not None and len(aggregate.survivors) == 4
    assert aggregate.total_weight == sum(m.num_examples for m in s.members)
    assert_fedavg_of(s, outcome.weights, [m.device_id for m in s.members],
                     aggregate.error_bound)
    assert sorted(wiretap.bodies("secagg_end")) == sorted(m.device_id for m in s.members)


def test_no_message_the_producer_sends_or_receives_holds_an_update_in_the_clear(
    device: DeviceFactory, wiretap: Wiretap
) -> None:
    s = make_setup(device, 4)
    run = runner(s)
    assert run.run_round(1, s.weights).committed
    config = run.last_config
    assert config is not None
    q = config.quantization
    updates = eager_updates(s)
    messages = [m for _, _, m in wiretap.commands] + wiretap.replies
    assert wiretap.replies and any(b == "secagg_mask" for _, b, _ in wiretap.commands)
    for member in s.members:
        update = updates[member.device_id]
        new = flatten(s.weights) + update
        changed = int(torch.nonzero(update.abs() > 1e-6)[0])
        for vector in (update, new):  # the update, or the weights it makes, in 3 coordinates
            window = vector[changed : changed + 3]
            for raw in (window.numpy().tobytes(), window.double().numpy().tobytes()):
                assert not any(raw in m for m in messages), member.device_id
    masked = [cmd.Reply.FromString(r).ok.secagg.masked for r in wiretap.replies]
    masked = [m for m in masked if m.vector]
    assert len(masked) == len(s.members)
    for message in masked:  # quantized and unmasked, floor or ceil, in no masked vector
        values = unpack_vector(message.vector, config.length + 1, q.modulus_bits)[:-1]
        member = next(m for m in s.members if m.device_id == message.device_id)
        scaled = updates[member.device_id].double().numpy() * member.num_examples * 2**16
        mod = 1 << q.modulus_bits
        floor = np.floor(scaled).astype(np.int64) % mod
        hits = (values == floor.astype(np.uint64)) | (values == ((floor + 1) % mod).astype(
            np.uint64))
        assert hits.mean() < 0.05


def test_a_third_of_the_devices_dropping_after_masking_still_commits_the_right_sum(
    device: DeviceFactory, wiretap: Wiretap
) -> None:
    s = make_setup(device, 6)
    dropped = {s.members[1].device_id, s.members[4].device_id}
    wiretap.drop["secagg_unmask"] = dropped
    run = runner(s, stage_deadline=60.0)  # the unmask stage waits this long for the dropped
    outcome = run.run_round(1, s.weights)
    assert outcome.committed and outcome.weights is not None
    assert run.last_aggregate is not None
    assert_fedavg_of(s, outcome.weights, [m.device_id for m in s.members],
                     run.last_aggregate.error_bound)
    assert {f.device_id for f in outcome.failures} == dropped


def test_more_than_a_third_dropping_fails_the_round_and_nothing_is_unmasked(
    device: DeviceFactory, wiretap: Wiretap
) -> None:
    s = make_setup(device, 6)
    wiretap.drop["secagg_mask"] = {s.members[i].device_id for i in (0, 2, 5)}
    run = runner(s, stage_deadline=20.0)
    with pytest.raises(SecAggThresholdError, match="nothing was unmasked"):
        run.run_round(1, s.weights)
    assert wiretap.bodies("secagg_unmask") == []  # no device was asked to reveal a share
    assert run.last_aggregate is None
    assert sorted(wiretap.bodies("secagg_end")) == sorted(m.device_id for m in s.members)
