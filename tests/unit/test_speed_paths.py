"""The copy-free paths and worker settings of issue 13 (speed): behaviour, not timing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER, message_pieces
from broker_config.settings import Settings
from consumer.runtime.device import DeviceRuntime
from consumer.store.memory import MemoryStore
from consumer.worker import tasks
from consumer.worker.chunks import assemble, spool_chunk
from consumer.worker.devices import SENDER_HEADER
from producer.transport.reassembly import ReplyAssembler
from schemas import command_pb2 as cmd
from schemas.errors import FedplanError
from schemas.tensor_codec import FramedParts, encode_framed_parts, tensor_to_proto
from schemas.wire import (
    decode_reply,
    decode_reply_values,
    encode_command,
    encode_command_parts,
    new_id,
)


def _store_object_command(tensor: torch.Tensor, object_id: str) -> bytes:
    return encode_command(_store_object_command_msg(tensor, object_id), [tensor])


def test_a_framed_store_object_from_a_writable_buffer_is_stored_without_a_copy() -> None:
    store = MemoryStore()
    runtime = DeviceRuntime(device_id="d1", store=store)
    tensor = torch.arange(4096, dtype=torch.float32)
    data = bytearray(_store_object_command(tensor, "big"))
    reply = decode_reply(runtime.handle(data))
    assert reply.WhichOneof("outcome") == "ok", reply.error
    stored = next(iter(store._objects.values())).tensor
    assert torch.equal(stored, tensor)
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= stored.data_ptr() < start + len(data)  # a view of the received buffer
    stored.add_(1)  # writable, and the buffer it lives in is the device's own
    assert stored[0].item() == 1.0


def test_a_framed_store_object_from_read_only_bytes_is_copied_once_and_writable() -> None:
    store = MemoryStore()
    runtime = DeviceRuntime(device_id="d1", store=store)
    tensor = torch.ones(3, 5, dtype=torch.float64)
    reply = decode_reply(runtime.handle(_store_object_command(tensor, "x")))
    assert reply.WhichOneof("outcome") == "ok", reply.error
    stored = next(iter(store._objects.values())).tensor
    stored.mul_(2)
    assert torch.equal(stored, 2 * tensor)


def test_chunks_are_assembled_into_one_writable_buffer_in_order(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    parts = [bytes([i]) * 5000 for i in range(3)]
    out = None
    for index in (2, 0, 1):
        request = SimpleNamespace(
            **{TRANSFER_HEADER: "t1", CHUNK_HEADER: index, CHUNKS_HEADER: 3}
        )
        out = assemble(settings, request, parts[index])
    assert isinstance(out, memoryview) and not out.readonly
    assert bytes(out) == b"".join(parts)


def test_the_gate_stores_chunks_and_only_the_completing_one_reaches_the_pool(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    parts = [bytes([i]) * 70_000 for i in range(3)]
    headers = {TRANSFER_HEADER: "t2", CHUNKS_HEADER: 3, SENDER_HEADER: "guest"}
    handed_on = []
    for index in (1, 0, 2):  # spool_chunk True: stored and acked in the gate
        if not spool_chunk(settings, {**headers, CHUNK_HEADER: index}, parts[index]):
            handed_on.append(index)
    assert handed_on == [2]
    whole = assemble(settings, SimpleNamespace(**headers, **{CHUNK_HEADER: 2}), parts[2])
    assert isinstance(whole, memoryview) and bytes(whole) == b"".join(parts)


def test_a_chunk_from_another_sender_is_refused_in_the_gate_and_the_transfer_kept(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    headers = {TRANSFER_HEADER: "t3", CHUNKS_HEADER: 2, CHUNK_HEADER: 0}
    assert spool_chunk(settings, {**headers, SENDER_HEADER: "alice"}, b"a" * 70_000)
    with pytest.raises(FedplanError, match="another sender"):
        spool_chunk(settings, {**headers, CHUNK_HEADER: 1, SENDER_HEADER: "mallory"}, b"m")
    assert len(list((tmp_path / "chunks").glob("*/0"))) == 1


def test_a_chunked_reply_is_joined_into_one_writable_buffer() -> None:
    assembler = ReplyAssembler(max_reply_size=100, max_pending_bytes=200, max_transfers=4, ttl=9)
    pieces = [b"abc", b"def", b"g"]
    got = None
    for i in (1, 2, 0):
        headers = {TRANSFER_HEADER: "r1", CHUNK_HEADER: i, CHUNKS_HEADER: 3}
        got = assembler.add(headers, pieces[i], sender="guest")
    assert isinstance(got, memoryview) and not got.readonly and bytes(got) == b"abcdefg"
    assert assembler.transfers == 0 and assembler.pending_bytes == 0


def test_a_pool_process_runs_torch_with_the_configured_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("FEDPLAN_TORCH_THREADS", "1")  # the app here has no fedplan settings
    try:
        torch.set_num_threads(2)  # what torch starts with on a 2-core machine
        tasks._pool_process_init()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_negative_torch_thread_count_is_refused() -> None:
    with pytest.raises(FedplanError, match="torch_threads"):
        Settings.from_env({"FEDPLAN_TORCH_THREADS": "-1"})
    assert Settings.from_env({"FEDPLAN_TORCH_THREADS": "0"}).torch_threads == 0
    assert Settings.from_env({"FEDPLAN_TASK_EVENTS": "true"}).task_events


@pytest.mark.parametrize("size", [1, 7, 64, 1000, 4096])
def test_framed_parts_cut_into_pieces_equal_the_joined_command_cut_alike(size: int) -> None:
    tensors = [torch.arange(300, dtype=torch.float32), torch.ones(5, 7, dtype=torch.float64)]
    objects = [
        cmd.ObjectInfo(id=f"r{i}", has_value=True, value=tensor_to_proto(t, framed=True))
        for i, t in enumerate(tensors)
    ]
    parts = encode_framed_parts(cmd.Reply(command_id="c", ok=cmd.Ok(objects=objects)), tensors)
    joined = bytes(parts)
    count, bodies = message_pieces(parts, size)
    pieces = list(bodies)
    assert len(pieces) == count and all(len(p) <= size for p in pieces)
    assert pieces == [joined[i : i + size] for i in range(0, len(joined), size)]


def test_a_sent_tensors_bytes_are_a_view_of_its_memory_until_published() -> None:
    tensor = torch.randn(1000)
    parts = encode_command_parts(_store_object_command_msg(tensor, "x"), [tensor])
    assert isinstance(parts, FramedParts)
    frame = torch.frombuffer(parts.parts[-1], dtype=torch.uint8)
    assert frame.data_ptr() == tensor.data_ptr()  # no copy of the tensor before the pieces


def _store_object_command_msg(tensor: torch.Tensor, object_id: str) -> cmd.Command:
    command = cmd.Command(command_id=new_id(), device_id="d1")
    command.store_object.CopyFrom(
        cmd.StoreObject(id=object_id, tensor=tensor_to_proto(tensor, framed=True))
    )
    return command


def test_a_devices_reply_with_a_tensor_comes_as_parts_over_the_stored_tensor() -> None:
    store = MemoryStore()
    runtime = DeviceRuntime(device_id="d1", store=store)
    tensor = torch.arange(5000, dtype=torch.float32)
    runtime.handle(_store_object_command(tensor, "big"))
    get = cmd.Command(command_id=new_id(), device_id="d1", get_object=cmd.GetObject(id="big"))
    parts = runtime.handle_parts(encode_command(get))
    assert isinstance(parts, FramedParts) and parts.message is not None
    stored = next(iter(store._objects.values())).tensor
    assert torch.frombuffer(parts.parts[-1], dtype=torch.uint8).data_ptr() == stored.data_ptr()
    value = decode_reply_values(bytearray(bytes(parts)))[1]["big"]
    assert torch.equal(value, tensor)  # the same bytes as the joined reply of handle()
    assert bytes(parts) == runtime.handle(encode_command(get))
