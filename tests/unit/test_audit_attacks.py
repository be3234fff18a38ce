"""Attacks on the audit rule "every release is recorded", on the embedded runtime:
an audit sink that fails withholds the reply, and a cached reply sent again (a redelivery)
is recorded with the bytes it carries."""

from __future__ import annotations

import torch

from consumer.policy.audit import AuditEntry, MemoryAudit
from consumer.runtime.device import DeviceRuntime
from consumer.store.memory import MemoryStore
from schemas.command_pb2 import Command, GetObject, StoreObject
from schemas.ir import SCHEMA_VERSION
from schemas.tensor_codec import tensor_to_proto
from schemas.wire import decode_reply, encode_command


class _BrokenAudit(MemoryAudit):
    """An audit log that cannot be written (full disk, locked file)."""

    broken = True

    def record(self, entry: AuditEntry) -> None:
        if self.broken:
            raise OSError("No space left on device")
        super().record(entry)


def _store(cid: str, object_id: str, tensor: torch.Tensor) -> bytes:
    msg = StoreObject(id=object_id, tensor=tensor_to_proto(tensor, framed=True))
    command = Command(schema_version=SCHEMA_VERSION, command_id=cid, store_object=msg)
    return encode_command(command, [tensor])


def _get(cid: str, object_id: str, *, delete: bool = False) -> bytes:
    msg = GetObject(id=object_id, delete=delete)
    return encode_command(Command(schema_version=SCHEMA_VERSION, command_id=cid, get_object=msg))


def test_a_reply_is_withheld_when_its_audit_row_cannot_be_written_and_sent_once_it_can() -> None:
    audit = _BrokenAudit()
    runtime = DeviceRuntime(device_id="d", store=MemoryStore(), audit=audit)
    audit.broken = False
    assert decode_reply(runtime.handle(_store("c1", "x", torch.ones(4)), "p")).HasField("ok")
    audit.broken = True
    reply = decode_reply(runtime.handle(_get("c2", "x", delete=True), "p"))
    assert reply.error.code == "AUDIT_UNAVAILABLE" and not reply.HasField("ok")
    audit.broken = False
    again = decode_reply(runtime.handle(_get("c2", "x", delete=True), "p"))  # the same command
    assert again.ok.objects[0].has_value  # its kept reply, now recorded
    [row] = [e for e in audit.entries() if e.command_id == "c2"]
    assert row.bytes_out == 16 and row.rule == "cached-reply"


def test_a_cached_reply_sent_again_is_recorded_with_the_bytes_it_carries() -> None:
    audit = MemoryAudit()
    runtime = DeviceRuntime(device_id="d", store=MemoryStore(), audit=audit)
    runtime.handle(_store("c1", "x", torch.ones(8)), "p")
    first = runtime.handle(_get("c2", "x", delete=True), "p")
    assert runtime.handle(_get("c2", "x", delete=True), "p") == first  # a redelivery
    rows = [e for e in audit.entries() if e.command_id == "c2"]
    assert [r.bytes_out for r in rows] == [32, 32]
