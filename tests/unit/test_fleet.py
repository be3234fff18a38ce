"""Tests of fp.connect, Fleet and Device over the embedded transport (and a silent double)."""

from __future__ import annotations

import pytest
import torch

import producer as fp
from producer.remote.collector import ReplyCollector
from producer.remote.fleet import Fleet
from producer.transport.base import ReplyHandler
from schemas.tensor_codec import FramedParts


class SilentTransport:
    """A transport double that accepts commands and never answers."""

    def __init__(self, on_reply: ReplyHandler) -> None:
        self.published: list[tuple[str, bytes]] = []

    def ensure_device(self, device_id: str) -> None:
        pass

    def publish(self, device_id: str, command: bytes | FramedParts, *, command_id: str) -> None:
        self.published.append((device_id, bytes(command)))

    def close(self) -> None:
        pass


class RefusingTransport(SilentTransport):
    def publish(self, device_id: str, command: bytes, *, command_id: str) -> None:
        raise fp.BrokerUnavailable("broker down", device_id=device_id)


def test_device_returns_the_same_handle_for_the_same_id_and_lists_devices_in_order() -> None:
    with fp.connect() as fleet:
        a = fleet.device("device_1")
        b = fleet.device("device_2")
        assert fleet.device("device_1") is a
        assert fleet.devices == (a, b)


def test_tagged_data_given_to_a_device_is_searchable_at_once() -> None:
    x = fp.tag(torch.tensor([-1, 2.0]), "input_data")
    y = fp.tag(torch.tensor([1, -2.0]), "input_data2")
    with fp.connect() as fleet:
        device = fleet.device("device_1", data=(x, y))
        [found] = device.search("input_data2")
        assert torch.equal(found.get(), y)
        assert device.search("input_data", "input_data2") == []


def test_objects_and_clear_objects_show_and_empty_the_device() -> None:
    with fp.connect() as fleet:
        bob = fleet.device("bob")
        x_ptr = fp.send(torch.tensor([1, 2, 3]), bob)
        y_ptr = fp.send(torch.tensor([1, 1, 1]), bob)
        assert set(bob.objects()) == {x_ptr.id, y_ptr.id}
        bob.clear_objects()
        assert bob.objects() == {}


def test_a_device_that_never_answers_raises_timeout_error_naming_it() -> None:
    collector = ReplyCollector()
    fleet = Fleet(transport=SilentTransport(collector.on_reply), collector=collector, timeout=0.05)
    with pytest.raises(TimeoutError, match="lost_device"):
        fleet.device("lost_device").search("x")


def test_a_refused_publish_raises_at_once_and_leaves_nothing_waiting() -> None:
    collector = ReplyCollector()
    fleet = Fleet(transport=RefusingTransport(collector.on_reply), collector=collector)
    with pytest.raises(fp.BrokerUnavailable):
        fp.send(torch.ones(1), fleet.device("bob"))
    assert collector.in_flight == 0


def test_closing_the_fleet_fails_waiting_commands_and_refuses_new_devices() -> None:
    collector = ReplyCollector()
    fleet = Fleet(transport=SilentTransport(collector.on_reply), collector=collector)
    ptr = fp.send(torch.ones(1), fleet.device("bob"))
    fleet.close()
    with pytest.raises(fp.TransportError):
        ptr.get()
    with pytest.raises(fp.TransportError):
        fleet.device("alice")


def test_commands_to_a_closed_embedded_fleet_raise_transport_error() -> None:
    fleet = fp.connect()
    bob = fleet.device("bob")
    fleet.close()
    with pytest.raises(fp.TransportError):
        fp.send(torch.ones(1), bob)


def test_connect_refuses_unknown_urls_and_broker_settings_for_embedded_devices() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        fp.connect("http://127.0.0.1:1")
    with pytest.raises(TypeError):
        fp.connect(heartbeat=3)


def test_commands_carry_the_device_id_and_the_tensor_bytes() -> None:
    from schemas.tensor_codec import tensor_from_proto
    from schemas.wire import decode_command

    collector = ReplyCollector()
    transport = SilentTransport(collector.on_reply)
    fleet = Fleet(transport=transport, collector=collector)
    fp.send(fp.tag(torch.tensor([3.0, 4.0]), "t"), fleet.device("bob"))
    [(device_id, data)] = transport.published
    command = decode_command(data)
    assert device_id == command.device_id == "bob"
    assert list(command.store_object.tags) == ["t"]
    assert torch.equal(tensor_from_proto(command.store_object.tensor), torch.tensor([3.0, 4.0]))


def test_a_pointer_is_a_remote_tensor_and_its_device_reaches_its_peers_without_the_fleet() -> None:
    from producer.plans.seams import RemoteTensor

    with fp.connect() as fleet:
        bob, alice = fleet.device("bob"), fleet.device("alice")
        x = bob.send_tensor(torch.tensor([1.0, 2.0]))
        assert isinstance(x, RemoteTensor) and not isinstance(torch.ones(1), RemoteTensor)
        assert bob.peer("alice") is alice and bob.shares_fleet(alice)
        with fp.connect() as other:
            assert not bob.shares_fleet(other.device("bob"))


def test_an_argument_a_device_cannot_hold_is_a_type_error_and_the_data_stays() -> None:
    with fp.connect() as fleet:
        bob = fleet.device("bob")
        x = bob.send_tensor(torch.tensor([1.0, 2.0]))
        x.wait()
        for bad in ({1: x}, object()):
            with pytest.raises(TypeError, match="cannot be sent to a device"):
                bob.run_op("torch.add", (x, bad))
        assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))
