"""Which device a delivery is for (the queue it came from) and the multi-device command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from broker_config.envelope import CONTENT_ENCODING, CONTENT_TYPE, task_headers
from broker_config.settings import Settings
from consumer.worker.cli import worker_command
from consumer.worker.devices import DEVICE_HEADER, device_of, device_settings, queue_of
from consumer.worker.gate import Gate
from schemas.errors import DeviceError, FedplanError


def _raw(routing_key: str, tag: str) -> Any:
    headers = task_headers("c1")
    props = {
        "content_type": CONTENT_TYPE,
        "content_encoding": CONTENT_ENCODING,
        "application_headers": headers,
        "correlation_id": "c1",
        "user_id": "producer-1",
    }
    info = {"redelivered": False, "routing_key": routing_key, "consumer_tag": tag}
    return SimpleNamespace(
        properties=props, body=b"x", delivery_info=info, delivery_tag=1, channel=None
    )


def test_the_device_comes_from_the_consumer_tags_queue_not_the_routing_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FEDPLAN_DEVICE_ID", raising=False)
    consumer = SimpleNamespace(_active_tags={"fedplan.device.a": "t1", "fedplan.device.b": "t2"})
    raw = _raw("fedplan.device.a", "t2")  # the sender's routing key names a, the queue is b
    queue = queue_of(consumer, raw.delivery_info)
    assert queue == "fedplan.device.b"
    gate = Gate(Settings(devices_dir=tmp_path))
    assert gate.admit(raw, queue)
    assert raw.properties["application_headers"][DEVICE_HEADER] == "b"


def test_a_delivery_from_an_unknown_consumer_is_refused_by_a_multi_device_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FEDPLAN_DEVICE_ID", raising=False)
    refused: list[FedplanError] = []
    gate = Gate(Settings(devices_dir=tmp_path))
    gate._refuse = lambda raw, verdict, device, exc: refused.append(exc) or False  # type: ignore[method-assign]
    raw = _raw("fedplan.device.a", "t9")
    assert not gate.admit(raw, queue_of(SimpleNamespace(_active_tags={}), raw.delivery_info))
    assert "not a fedplan device queue" in refused[0].message
    with pytest.raises(DeviceError):
        device_of("fedplan.results.p1")


def test_a_one_device_worker_refuses_another_devices_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPLAN_DEVICE_ID", "alice")
    assert device_of("fedplan.device.alice") == "alice"
    assert device_of(None) == "alice"
    with pytest.raises(DeviceError, match="reached the worker of device 'alice'"):
        device_of("fedplan.device.bob")


def test_each_device_of_a_devices_dir_gets_its_own_data_dir(tmp_path: Path) -> None:
    s = Settings(devices_dir=tmp_path, delivery_limit=7)
    a, b = device_settings(s, "a"), device_settings(s, "b")
    assert (a.data_dir, b.data_dir) == (tmp_path / "a", tmp_path / "b")
    assert a.delivery_limit == 7 and device_settings(s, "a") is a
    with pytest.raises(FedplanError):
        device_settings(s, "../etc")


def _args(**kw: Any) -> argparse.Namespace:
    base = dict(device=None, data_dir=None, devices_dir=None, broker=None, loglevel="info",
                concurrency=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_the_worker_command_serves_every_device_dir_on_one_worker(tmp_path: Path) -> None:
    for d in ("b", "a", ".hidden"):
        (tmp_path / d).mkdir()
    argv, env = worker_command(_args(devices_dir=str(tmp_path)))
    assert argv[argv.index("-Q") + 1] == "fedplan.device.a,fedplan.device.b"
    assert argv[argv.index("-c") + 1] == "2"
    assert env["FEDPLAN_DEVICES_DIR"] == str(tmp_path.resolve())
    assert "FEDPLAN_DEVICE_ID" not in env
    argv, _ = worker_command(_args(devices_dir=str(tmp_path), device=["c"], concurrency=3))
    assert argv[argv.index("-Q") + 1] == "fedplan.device.c" and (tmp_path / "c").is_dir()
    with pytest.raises(FedplanError, match="one --device with its --data-dir"):
        worker_command(_args(device=["a", "b"], data_dir=str(tmp_path)))
    with pytest.raises(FedplanError, match="named twice"):
        worker_command(_args(device=["a", "a"], devices_dir=str(tmp_path)))
