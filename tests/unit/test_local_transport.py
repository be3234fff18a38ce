"""Tests of the embedded transport: device threads fed with command bytes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import pytest
import torch

from consumer.policy.tenancy import scoped
from producer.transport.local import LocalTransport
from schemas import command_pb2 as cmd
from schemas.errors import DeviceNotFound, TransportError
from schemas.tensor_codec import tensor_to_proto
from schemas.wire import decode_reply, encode_command, new_id


def _store(device_id: str, object_id: str) -> tuple[bytes, str]:
    command = cmd.Command(
        command_id=new_id(),
        device_id=device_id,
        store_object=cmd.StoreObject(id=object_id, tensor=tensor_to_proto(torch.ones(2))),
    )
    return encode_command(command), command.command_id


def test_commands_are_run_in_order_and_every_one_gets_a_reply() -> None:
    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    transport = LocalTransport(replies.put)
    transport.ensure_device("d1")
    sent = []
    for i in range(5):
        data, command_id = _store("d1", f"x{i}")
        transport.publish("d1", data, command_id=command_id)
        sent.append(command_id)
    got = [decode_reply(replies.get(timeout=10)).command_id for _ in sent]
    transport.close()
    assert got == sent
    assert transport.runtime("d1").store.has_object(scoped("local", "x4"))


def test_publishing_to_a_device_never_started_raises_device_not_found() -> None:
    transport = LocalTransport(lambda data: None)
    data, command_id = _store("ghost", "x")
    with pytest.raises(DeviceNotFound, match="ghost"):
        transport.publish("ghost", data, command_id=command_id)
    transport.close()


def test_a_closed_transport_refuses_commands_and_new_devices() -> None:
    transport = LocalTransport(lambda data: None)
    transport.ensure_device("d1")
    transport.close()
    data, command_id = _store("d1", "x")
    with pytest.raises(TransportError):
        transport.publish("d1", data, command_id=command_id)
    with pytest.raises(TransportError):
        transport.ensure_device("d2")


def test_devices_forward_moved_objects_to_each_other() -> None:
    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    transport = LocalTransport(replies.put)
    transport.ensure_device("bob")
    transport.ensure_device("alice")
    data, command_id = _store("bob", "x")
    transport.publish("bob", data, command_id=command_id)
    move = cmd.Command(
        command_id=new_id(),
        device_id="bob",
        move_object=cmd.MoveObject(id="x", destination_device="alice"),
    )
    transport.publish("bob", encode_command(move), command_id=move.command_id)
    outcomes = {decode_reply(replies.get(timeout=10)).WhichOneof("outcome") for _ in range(3)}
    transport.close()
    assert outcomes == {"ok"}
    assert transport.runtime("alice").store.has_object(scoped("local", "x"))
    assert not transport.runtime("bob").store.has_object(scoped("local", "x"))


def _threads_seen_by_device(intra_op_threads: int | None = 1) -> int:
    """torch.get_num_threads() inside a device thread (the reply handler runs there)."""
    seen: queue.SimpleQueue[int] = queue.SimpleQueue()
    transport = LocalTransport(
        lambda _reply: seen.put(torch.get_num_threads()), intra_op_threads=intra_op_threads
    )
    transport.ensure_device("d1")
    data, command_id = _store("d1", "x")
    transport.publish("d1", data, command_id=command_id)
    threads = seen.get(timeout=10)
    transport.close()
    return threads


openmp_only = pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info() or torch.get_num_threads() < 2,
    reason="per-thread intra-op limits need torch's OpenMP backend and 2+ threads",
)


@openmp_only
def test_device_threads_use_one_intra_op_thread_and_leave_the_callers_setting_alone() -> None:
    before = torch.get_num_threads()
    assert _threads_seen_by_device() == 1
    assert torch.get_num_threads() == before
    seen_later: queue.SimpleQueue[int] = queue.SimpleQueue()
    later = threading.Thread(target=lambda: seen_later.put(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen_later.get(timeout=10) == before  # threads started later keep torch's default


@openmp_only
def test_device_threads_keep_torchs_default_when_asked_to() -> None:
    assert _threads_seen_by_device(intra_op_threads=None) == torch.get_num_threads()
    assert _threads_seen_by_device(intra_op_threads=2) == 2


def _watch_overlap(transport: LocalTransport, device_ids: list[str], inside: list[int]) -> None:
    """Make every device's runtime record how many commands are running when one starts."""
    lock = threading.Lock()
    active = [0]
    for device_id in device_ids:
        runtime = transport.runtime(device_id)
        original = runtime.handle

        def handle(
            data: bytes, sender: str = "local", original: Callable[..., bytes] = original
        ) -> bytes:
            with lock:
                active[0] += 1
                inside.append(active[0])
            try:
                time.sleep(0.05)  # leave room for another device to start meanwhile
                return original(data, sender)
            finally:
                with lock:
                    active[0] -= 1

        runtime.handle = handle  # type: ignore[method-assign]


def test_devices_run_one_command_at_a_time_across_the_transport() -> None:
    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    transport = LocalTransport(replies.put)
    devices = ["d1", "d2", "d3"]
    for device_id in devices:
        transport.ensure_device(device_id)
    inside: list[int] = []
    _watch_overlap(transport, devices, inside)
    for device_id in devices * 2:
        data, command_id = _store(device_id, f"x-{device_id}-{new_id()[:6]}")
        transport.publish(device_id, data, command_id=command_id)
    for _ in range(6):
        assert decode_reply(replies.get(timeout=10)).WhichOneof("outcome") == "ok"
    transport.close()
    assert inside and max(inside) == 1


def test_devices_may_overlap_when_one_at_a_time_is_off() -> None:
    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    transport = LocalTransport(replies.put, one_at_a_time=False)
    barrier = threading.Barrier(2, timeout=10)  # passes only if both devices run together
    for device_id in ("d1", "d2"):
        transport.ensure_device(device_id)
        runtime = transport.runtime(device_id)
        original = runtime.handle

        def handle(
            data: bytes, sender: str = "local", original: Callable[..., bytes] = original
        ) -> bytes:
            barrier.wait()
            return original(data)

        runtime.handle = handle  # type: ignore[method-assign]
    for device_id in ("d1", "d2"):
        data, command_id = _store(device_id, "x")
        transport.publish(device_id, data, command_id=command_id)
    got = {decode_reply(replies.get(timeout=20)).device_id for _ in range(2)}
    transport.close()
    assert got == {"d1", "d2"}
    assert not barrier.broken
