"""Attacks on the operator's policy file: edits racing each other or a command, and a
corrupt file (it must refuse every command, never fall back to allowing all)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from consumer.policy.rules import Policy, PolicyFile
from consumer.runtime.device import DeviceRuntime
from consumer.store.memory import MemoryStore
from schemas.command_pb2 import Command, StoreObject
from schemas.errors import PolicyError
from schemas.ir import SCHEMA_VERSION
from schemas.tensor_codec import tensor_to_proto
from schemas.wire import decode_reply, encode_command


def test_a_policy_rewritten_within_one_mtime_tick_with_the_same_size_is_read_again(
    tmp_path: Path,
) -> None:
    serving = PolicyFile(tmp_path)
    serving.save(Policy.from_json({"approved_plans": ["a" * 64]}))
    assert serving.current().approves("a" * 64)
    before = os.stat(serving.path)
    PolicyFile(tmp_path).save(Policy.from_json({"approved_plans": ["b" * 64]}))  # revoke a
    os.utime(serving.path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same tick, same size
    assert os.stat(serving.path).st_size == before.st_size
    assert not serving.current().approves("a" * 64)
    assert serving.current().approves("b" * 64)


def test_two_operators_editing_the_policy_at_once_both_get_their_change(tmp_path: Path) -> None:
    def approve_many(prefix: str) -> None:
        holder = PolicyFile(tmp_path)  # another process's view of the same file
        for i in range(25):
            holder.update(approve=[f"{prefix}{i:03d}"])

    threads = [threading.Thread(target=approve_many, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(PolicyFile(tmp_path).current().approved_plans) == 50


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"null", b'{"producers": "*"}', b'{"public_tags": "#"}', b"\xff\xfe{}"],
)
def test_a_corrupt_policy_file_refuses_every_command_instead_of_allowing_all(
    tmp_path: Path, content: bytes
) -> None:
    holder = PolicyFile(tmp_path)
    holder.path.write_bytes(content)
    with pytest.raises(PolicyError, match="policy file is invalid"):
        holder.current()
    runtime = DeviceRuntime(device_id="d", store=MemoryStore(), policy=holder)
    tensor = torch.ones(2)
    msg = StoreObject(id="x", tensor=tensor_to_proto(tensor, framed=True))
    command = Command(schema_version=SCHEMA_VERSION, command_id="c", store_object=msg)
    reply = decode_reply(runtime.handle(encode_command(command, [tensor]), "p"))
    assert reply.error.code == "POLICY_REFUSED"
    holder.save(Policy())  # the operator repairs it: served again, no restart
    command.command_id = "c2"
    reply = decode_reply(runtime.handle(encode_command(command, [tensor]), "p"))
    assert reply.HasField("ok")
