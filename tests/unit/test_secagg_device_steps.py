"""The device runtime's secure-aggregation commands: a private value leaves only masked,
into a sum; the round's state is the producer's alone, persisted, and deleted at the end."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from consumer.policy.tenancy import scoped
from consumer.runtime.device import DeviceRuntime
from consumer.runtime.secagg_steps import MAX_OPEN_ROUNDS, STATE_TAG, state_key
from consumer.secagg import QuantizationParams, RoundConfig
from consumer.secagg import wire_codec as wc
from consumer.store.base import StoredObject
from consumer.store.memory import MemoryStore
from consumer.store.sqlite import SqliteStore
from producer.fl.secure_aggregation import SecureAggregate, SecureAggregationRound
from schemas import command_pb2 as cmd
from schemas.ir import ObjectId
from schemas.plan_pb2 import ValueList
from schemas.value_codec import value_to_proto
from schemas.wire import decode_reply, encode_command, new_id

PRODUCER = "lab"


def send(runtime: DeviceRuntime, body: str, msg: Any, sender: str = PRODUCER) -> cmd.Reply:
    command = cmd.Command(command_id=new_id(), device_id=runtime.device_id)
    getattr(command, body).CopyFrom(msg)
    return decode_reply(runtime.handle(encode_command(command), sender))


def ok(reply: cmd.Reply) -> cmd.Ok:
    assert reply.WhichOneof("outcome") == "ok", reply.error
    return reply.ok


def private_update(runtime: DeviceRuntime, values: torch.Tensor) -> str:
    """As the operator: private device data; as the producer: an op on it (a private value)."""
    runtime.store.put_object(StoredObject("data", values.clone(), ("#rows",)))
    msg = cmd.RunOp(target="torch.mul", result_ids=["update"], args=ValueList(
        items=[value_to_proto(ObjectId("data")), value_to_proto(1.0)]))
    ok(send(runtime, "run_op", msg))
    return "update"


Factory = Callable[[str], DeviceRuntime]


def memory_devices(ids: Collection[str]) -> dict[str, DeviceRuntime]:
    return {d: DeviceRuntime(device_id=d, store=MemoryStore()) for d in ids}


def drive(
    runtimes: dict[str, DeviceRuntime],
    cfg: RoundConfig,
    weights: dict[str, int],
    *,
    drop_after_mask: Collection[str] = (),
    restart: Callable[[str], DeviceRuntime] | None = None,
) -> SecureAggregate:
    """The server's side of one round, every step as a wire command to the runtimes."""
    server = SecureAggregationRound(cfg)

    def step(d: str, body: str, msg: Any) -> Any:
        if restart is not None:
            runtimes[d] = restart(d)  # a device restarted before every step
        return wc.reply_from_proto(ok(send(runtimes[d], body, msg)).secagg)

    proto = wc.config_to_proto(cfg)
    adverts = [step(d, "secagg_advertise", cmd.SecAggAdvertise(config=proto))
               for d in cfg.devices]
    shares = [step(d, "secagg_share", wc.share_request_to_proto(r))
              for d, r in server.collect_adverts(adverts).items()]
    masked = [step(d, "secagg_mask", wc.mask_request_to_proto(r, input_id="update",
                                                               weight=weights[d]))
              for d, r in server.collect_shares(shares).items()]
    responses = [step(d, "secagg_unmask", wc.unmask_request_to_proto(r))
                 for d, r in server.collect_masked_inputs(masked).items()
                 if d not in drop_after_mask]
    return server.collect_unmask_responses(responses)


def round_config(ids: list[str], length: int, round_id: str = "r1") -> RoundConfig:
    q = QuantizationParams(clip=1.0, num_clients=len(ids), max_weight=10)
    return RoundConfig.create(round_id, ids, length=length, quantization=q)


def values_for(ids: list[str], length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {d: torch.rand(length, generator=g) - 0.5 for d in ids}


def test_private_updates_aggregate_over_wire_commands_to_the_eager_weighted_sum() -> None:
    ids = [f"d{i}" for i in range(6)]
    values, weights = values_for(ids, 7), {d: i + 1 for i, d in enumerate(ids)}
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], values[d])
    result = drive(runtimes, round_config(ids, 7), weights)
    expected = sum(values[d].double() * weights[d] for d in ids)
    assert result.total_weight == sum(weights.values())
    assert np.abs(result.weighted_sum - expected.numpy()).max() <= result.error_bound
    entries = runtimes["d0"].audit.entries()
    masked = [e for e in entries if e.kind == "secagg_mask"]
    assert [e.rule for e in masked] == ["secure-aggregation"]
    assert masked[0].bytes_out > 0


def test_a_third_of_the_devices_dropping_after_masking_still_sums_every_masked_input() -> None:
    ids = [f"d{i}" for i in range(6)]
    values, weights = values_for(ids, 4), dict.fromkeys(ids, 2)
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], values[d])
    result = drive(runtimes, round_config(ids, 4), weights, drop_after_mask={"d1", "d4"})
    expected = sum(values[d].double() * 2 for d in ids)
    assert np.abs(result.weighted_sum - expected.numpy()).max() <= result.error_bound


def test_the_raw_update_still_cannot_be_fetched_after_it_was_masked() -> None:
    ids = ["a", "b", "c"]
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], torch.ones(2) / 4)
    drive(runtimes, round_config(ids, 2), dict.fromkeys(ids, 1))
    refused = send(runtimes["a"], "get_object", cmd.GetObject(id="update"))
    assert refused.error.code == "POLICY_REFUSED" and "private-data" in refused.error.message


def test_the_round_state_cannot_be_named_read_or_replaced_by_any_producer() -> None:
    runtime = DeviceRuntime(device_id="a", store=MemoryStore())
    cfg = round_config(["a", "b"], 2)
    ok(send(runtime, "secagg_advertise", cmd.SecAggAdvertise(config=wc.config_to_proto(cfg))))
    key = state_key(PRODUCER, "r1")
    assert runtime.store.has_object(key)
    for name in (key, "r1", "@secagg:r1", f"@secagg:{scoped(PRODUCER, 'r1')}"):
        reply = send(runtime, "get_object", cmd.GetObject(id=name))
        assert reply.error.code == "NOT_FOUND", name
    listed = ok(send(runtime, "list_objects", cmd.ListObjects()))
    assert list(listed.objects) == []
    assert not ok(send(runtime, "search", cmd.Search(tags=[STATE_TAG]))).objects
    other = send(runtime, "secagg_share", cmd.SecAggShare(round_id="r1"), sender="mallory")
    assert other.error.code == "SECAGG_PROTOCOL" and "no secure-aggregation round" in (
        other.error.message)


def test_a_started_round_is_never_re_keyed_but_the_same_advert_is_repeated() -> None:
    runtime = DeviceRuntime(device_id="a", store=MemoryStore())
    cfg = round_config(["a", "b", "c"], 2)
    start = cmd.SecAggAdvertise(config=wc.config_to_proto(cfg))
    first = ok(send(runtime, "secagg_advertise", start)).secagg.advert
    again = ok(send(runtime, "secagg_advertise", start)).secagg.advert
    assert again == first
    other = cmd.SecAggAdvertise(config=wc.config_to_proto(round_config(["a", "b"], 2)))
    refused = send(runtime, "secagg_advertise", other)
    assert refused.error.code == "SECAGG_PROTOCOL" and "never re-keyed" in refused.error.message


def test_a_round_that_could_reveal_a_single_value_is_refused_by_the_device() -> None:
    runtime = DeviceRuntime(device_id="a", store=MemoryStore())
    q = QuantizationParams(clip=1.0, num_clients=2)
    cfg = RoundConfig.create("r1", ["a", "b"], length=1, quantization=q, max_dropout=0.5)
    assert cfg.min_survivors == 1
    refused = send(runtime, "secagg_advertise", cmd.SecAggAdvertise(
        config=wc.config_to_proto(cfg)))
    assert refused.error.code == "POLICY_REFUSED" and "secure-aggregation" in (
        refused.error.message)


def test_device_data_itself_is_never_masked_out_of_the_device() -> None:
    ids = ["a", "b", "c"]
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], torch.ones(2))
    cfg = round_config(ids, 2)
    server = SecureAggregationRound(cfg)
    proto = wc.config_to_proto(cfg)
    adverts = [wc.reply_from_proto(ok(send(runtimes[d], "secagg_advertise",
                                           cmd.SecAggAdvertise(config=proto))).secagg)
               for d in ids]
    shares = [wc.reply_from_proto(ok(send(runtimes[d], "secagg_share",
                                          wc.share_request_to_proto(r))).secagg)
              for d, r in server.collect_adverts(adverts).items()]
    request = server.collect_shares(shares)["a"]
    refused = send(runtimes["a"], "secagg_mask",
                   wc.mask_request_to_proto(request, input_id="data", weight=1))
    assert refused.error.code == "POLICY_REFUSED" and "device data" in refused.error.message


def test_the_end_of_a_round_deletes_its_state_and_the_aggregated_value() -> None:
    ids = ["a", "b", "c"]
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], torch.ones(3) / 8)
    drive(runtimes, round_config(ids, 3), dict.fromkeys(ids, 1))
    ok(send(runtimes["a"], "secagg_end", cmd.SecAggEnd(round_id="r1", input_id="update")))
    assert not runtimes["a"].store.has_object(state_key(PRODUCER, "r1"))
    assert not runtimes["a"].store.has_object(scoped(PRODUCER, "update"))
    assert runtimes["a"].store.has_object("data")  # the device's own data stays
    ok(send(runtimes["a"], "secagg_end", cmd.SecAggEnd(round_id="r1", input_id="update")))


def test_a_producer_keeps_a_bounded_number_of_open_rounds_on_a_device() -> None:
    runtime = DeviceRuntime(device_id="a", store=MemoryStore())
    for i in range(MAX_OPEN_ROUNDS + 5):
        cfg = round_config(["a", "b"], 1, round_id=f"r{i}")
        ok(send(runtime, "secagg_advertise", cmd.SecAggAdvertise(config=wc.config_to_proto(cfg))))
    held = runtime.store.search([STATE_TAG])
    assert len(held) == MAX_OPEN_ROUNDS
    assert runtime.store.has_object(state_key(PRODUCER, f"r{MAX_OPEN_ROUNDS + 4}"))
    assert not runtime.store.has_object(state_key(PRODUCER, "r0"))


def test_a_device_restarted_between_every_step_finishes_the_round(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d"]
    values = values_for(ids, 5)

    def restart(d: str) -> DeviceRuntime:
        return DeviceRuntime(device_id=d, store=SqliteStore(tmp_path / d))

    runtimes = {d: restart(d) for d in ids}
    for d in ids:
        private_update(runtimes[d], values[d])
    result = drive(runtimes, round_config(ids, 5), dict.fromkeys(ids, 3), restart=restart)
    expected = sum(values[d].double() * 3 for d in ids)
    assert np.abs(result.weighted_sum - expected.numpy()).max() <= result.error_bound


@pytest.mark.parametrize("clip_norm", [0.5, 2.0])
def test_the_mask_step_clips_the_update_to_the_l2_norm_it_is_given(clip_norm: float) -> None:
    ids = ["a", "b", "c"]
    values = {d: torch.tensor([3.0, 4.0]) / 5 * (i + 1) for i, d in enumerate(ids)}  # norms 1..3
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], values[d])
    cfg = RoundConfig.create("r1", ids, length=2, quantization=QuantizationParams(
        clip=clip_norm, num_clients=3))
    server = SecureAggregationRound(cfg)
    proto = wc.config_to_proto(cfg)

    def reply(d: str, body: str, msg: Any) -> Any:
        return wc.reply_from_proto(ok(send(runtimes[d], body, msg)).secagg)

    adverts = [reply(d, "secagg_advertise", cmd.SecAggAdvertise(config=proto)) for d in ids]
    shares = [reply(d, "secagg_share", wc.share_request_to_proto(r))
              for d, r in server.collect_adverts(adverts).items()]
    masked = []
    for d, r in server.collect_shares(shares).items():
        msg = wc.mask_request_to_proto(r, input_id="update", weight=1)
        msg.clip_norm = clip_norm
        masked.append(reply(d, "secagg_mask", msg))
    responses = [reply(d, "secagg_unmask", wc.unmask_request_to_proto(r))
                 for d, r in server.collect_masked_inputs(masked).items()]
    result = server.collect_unmask_responses(responses)
    expected = sum(v * min(1.0, clip_norm / float(v.norm())) for v in values.values())
    assert np.abs(result.weighted_sum - expected.double().numpy()).max() <= result.error_bound


def test_a_weight_the_modulus_cannot_hold_is_a_typed_overflow_error_and_nothing_leaves() -> None:
    ids = ["a", "b", "c"]
    runtimes = memory_devices(ids)
    for d in ids:
        private_update(runtimes[d], torch.ones(2) / 2)
    cfg = round_config(ids, 2)  # max_weight 10
    server = SecureAggregationRound(cfg)
    proto = wc.config_to_proto(cfg)
    adverts = [wc.reply_from_proto(ok(send(runtimes[d], "secagg_advertise",
                                           cmd.SecAggAdvertise(config=proto))).secagg)
               for d in ids]
    shares = [wc.reply_from_proto(ok(send(runtimes[d], "secagg_share",
                                          wc.share_request_to_proto(r))).secagg)
              for d, r in server.collect_adverts(adverts).items()]
    request = server.collect_shares(shares)["a"]
    refused = send(runtimes["a"], "secagg_mask",
                   wc.mask_request_to_proto(request, input_id="update", weight=11))
    assert refused.error.code == "SECAGG_OVERFLOW" and "outside 0..10" in refused.error.message
    assert not refused.ok.secagg.masked.vector
    again = send(runtimes["a"], "secagg_mask",  # the state did not move: a valid weight works
                 wc.mask_request_to_proto(request, input_id="update", weight=10))
    assert ok(again).secagg.masked.vector
