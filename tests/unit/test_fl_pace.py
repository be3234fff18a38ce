"""Tests of producer.fl.pace: rounds sample only online devices that are not backlogged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import producer as fp
from producer.fl.pace import DeviceLoad, EmbeddedProbe, PaceSteering, StaticProbe, probe_for
from producer.fl.participants import EagerParticipant
from producer.fl.rounds import Deliver, FitTask, RoundPolicy, RoundRunner
from producer.fl.strategy import FedAvg
from producer.fl.training import TrainingSpec, get_weights
from schemas.errors import FedplanError


class _Recording(EagerParticipant):
    asked: list[int]

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        self.asked.append(task.server_round)
        super().start_fit(task, deliver)


def _devices(n: int = 4) -> list[_Recording]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        p = _Recording(f"d{k}", net, TrainingSpec(batch_size=4), x, y)
        p.asked = []
        out.append(p)
    return out


def test_offline_backlogged_and_unknown_devices_are_not_eligible() -> None:
    probe = StaticProbe(
        {
            "ok": DeviceLoad("ok", 1, 1),
            "off": DeviceLoad("off", 0, 0),
            "busy": DeviceLoad("busy", 5, 2),
        }
    )
    ok, skipped = PaceSteering(probe, max_backlog=1).eligible(["ok", "off", "busy", "gone"])
    assert ok == ["ok"]
    assert skipped == {
        "off": "offline",
        "busy": "backlogged (5 commands waiting)",
        "gone": "unknown to the broker",
    }


def test_a_round_never_asks_a_skipped_device_and_records_why() -> None:
    devices = _devices()
    loads = {d.device_id: DeviceLoad(d.device_id, 0, 1) for d in devices}
    loads["d1"] = DeviceLoad("d1", 0, 0)
    loads["d2"] = DeviceLoad("d2", 9, 1)
    runner = RoundRunner(devices, FedAvg(), RoundPolicy(), pace=PaceSteering(StaticProbe(loads)))
    out = runner.run_round(1, get_weights(nn.Linear(3, 2)))
    assert out.committed and out.asked == ["d0", "d3"] and not out.failures
    assert [d.asked for d in devices] == [[1], [], [], [1]]
    assert out.skipped == {"d1": "offline", "d2": "backlogged (9 commands waiting)"}
    rows = {r.device_id: r.status for r in out.device_rows()}
    assert rows == {"d0": "ok", "d3": "ok", "d1": "skipped", "d2": "skipped"}


def test_a_device_back_online_is_sampled_again() -> None:
    devices = _devices(2)
    loads = {"d0": DeviceLoad("d0", 0, 1), "d1": DeviceLoad("d1", 0, 0)}
    runner = RoundRunner(devices, FedAvg(), pace=PaceSteering(StaticProbe(loads)))
    w = get_weights(nn.Linear(3, 2))
    runner.run_round(1, w)
    loads["d1"] = DeviceLoad("d1", 0, 1)
    assert runner.run_round(2, w).asked == ["d0", "d1"]
    assert devices[1].asked == [2]


def test_too_few_eligible_devices_stop_the_job_naming_why() -> None:
    devices = _devices(2)
    loads = {"d0": DeviceLoad("d0", 0, 0), "d1": DeviceLoad("d1", 3, 1)}
    runner = RoundRunner(devices, FedAvg(), pace=PaceSteering(StaticProbe(loads)))
    with pytest.raises(FedplanError, match=r"0 devices are available.*d0: offline.*d1: backlogged"):
        runner.run_round(1, get_weights(nn.Linear(3, 2)))


def test_the_embedded_probe_sees_running_devices_and_stopped_ones() -> None:
    fleet = fp.connect()
    fleet.device("e0")
    probe = probe_for(fleet)
    assert isinstance(probe, EmbeddedProbe)
    assert probe.loads(["e0", "never"]) == {"e0": DeviceLoad("e0", 0, 1)}
    fleet.close()
    assert probe.loads(["e0"])["e0"].online is False


class _Down:
    def loads(self, device_ids: object) -> dict[str, DeviceLoad]:
        from schemas.errors import BrokerUnavailable

        raise BrokerUnavailable("cannot reach the RabbitMQ management API")


def test_a_management_api_that_is_down_leaves_every_device_eligible(
    caplog: pytest.LogCaptureFixture,
) -> None:
    devices = _devices(2)
    runner = RoundRunner(devices, FedAvg(), pace=PaceSteering(_Down()))
    out = runner.run_round(1, get_weights(nn.Linear(3, 2)))
    assert out.asked == ["d0", "d1"] and not out.skipped
    assert "cannot read device loads" in caplog.text


def test_the_broker_probe_reads_depth_and_consumers_of_device_queues_only() -> None:
    from producer.fl.pace import BrokerProbe

    class _Api:
        def vq(self) -> str:
            return "%2F"

        def request(self, method: str, path: str) -> list[dict[str, object]]:
            assert (method, path) == ("GET", "queues/%2F")
            return [
                {"name": "fedplan.device.a", "messages_ready": 2, "messages_unacknowledged": 1,
                 "consumers": 1},
                {"name": "fedplan.device.b", "consumers": 0},
                {"name": "fedplan.results.p1", "messages_ready": 50, "consumers": 1},
                {"name": "fedplan.device.other", "consumers": 3},
            ]  # fmt: skip

    loads = BrokerProbe(_Api()).loads(["a", "b", "c"])
    assert loads == {"a": DeviceLoad("a", 3, 1), "b": DeviceLoad("b", 0, 0)}
