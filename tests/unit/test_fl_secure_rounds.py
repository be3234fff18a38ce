"""The secure round runner's own rules: a device speaks for itself only, stage deadlines
drop the silent, and the job's settings become the round config the papers describe."""

from __future__ import annotations

import time

from consumer.secagg import QuantizationParams, RoundConfig, advertise_keys
from consumer.secagg import wire_codec as wc
from producer.fl.rounds import RoundPolicy
from producer.fl.secure_rounds import SecureAggregation, SecureRoundRunner, _Stage
from producer.fl.strategy import FedAvg
from producer.remote.collector import PendingCommand
from schemas import command_pb2 as cmd


def answered(device_id: str, message: object) -> PendingCommand:
    future = PendingCommand(f"c-{device_id}", device_id, ())
    future.set_result(cmd.Reply(command_id=f"c-{device_id}",
                                ok=cmd.Ok(secagg=wc.reply_to_proto(message))))  # type: ignore[arg-type]
    return future


def runner(deadline: float = 5.0) -> SecureRoundRunner:
    return SecureRoundRunner([], FedAvg(), SecureAggregation(stage_deadline=deadline),
                             RoundPolicy())


def test_a_reply_in_the_name_of_another_device_drops_its_sender() -> None:
    q = QuantizationParams(clip=1.0, num_clients=3)
    cfg = RoundConfig.create("r", ["a", "b", "c"], length=1, quantization=q)
    adverts = {d: advertise_keys(cfg, d)[1] for d in cfg.devices}
    pending = {"a": answered("a", adverts["a"]), "b": answered("b", adverts["c"])}
    stage = runner()._replies("adverts", pending, _Stage())
    assert set(stage.messages) == {"a"}
    assert "answered as 'c'" in stage.dropped["b"]


def test_a_device_silent_past_the_stage_deadline_is_dropped_not_waited_for() -> None:
    silent = PendingCommand("c-x", "x", ())
    start = time.monotonic()
    stage = runner(deadline=0.2)._replies("adverts", {"x": silent}, _Stage())
    assert time.monotonic() - start < 5
    assert stage.dropped == {"x": "no reply before the stage deadline"}


def test_neighbours_and_threshold_fraction_make_a_k_regular_t_of_k_round() -> None:
    ids = [f"d{i:02d}" for i in range(30)]
    cfg = SecureAggregation(neighbours=10, threshold_fraction=0.6).round_config(
        "r", ids, length=4, max_weight=5)
    assert {len(p) for p in cfg.neighbours.values()} == {10}
    assert cfg.threshold == 7  # floor(0.6 * 10) + 1
    assert cfg.min_survivors == 20  # a third of 30 may drop
    complete = SecureAggregation().round_config("r", ids[:9], length=4, max_weight=5)
    assert complete.threshold == 5 and complete.min_survivors == 6
