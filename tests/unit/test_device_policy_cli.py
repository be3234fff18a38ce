"""The operator's side: ``fedplan device policy|pending|approve|audit``, the policy file read
again when it changes (no restart), the append-only audit log."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from consumer.policy.audit import AuditLog
from consumer.policy.rules import PolicyFile
from consumer.runtime.device import DeviceRuntime
from consumer.store.base import StoredObject
from consumer.store.sqlite import SqliteStore
from producer.cli.main import main
from schemas import command_pb2 as cmd
from schemas.ir import SCHEMA_VERSION, ObjectId, Op, PlanIR, Ref
from schemas.plan_codec import plan_to_proto
from schemas.plan_pb2 import ValueList
from schemas.value_codec import value_to_proto
from schemas.wire import decode_reply, encode_command, new_id


def _device(data_dir: Path) -> DeviceRuntime:
    return DeviceRuntime(
        device_id="d1",
        store=SqliteStore(data_dir),
        policy=PolicyFile(data_dir),
        audit=AuditLog(data_dir),
    )


def _send(runtime: DeviceRuntime, body: str, msg: object, sender: str = "p1") -> cmd.Reply:
    command = cmd.Command(schema_version=SCHEMA_VERSION, command_id=new_id(), device_id="d1")
    getattr(command, body).CopyFrom(msg)
    return decode_reply(runtime.handle(encode_command(command), sender))


def _double() -> PlanIR:
    return PlanIR(
        name="double",
        inputs=(Ref(0),),
        ops=[Op("Tensor.__add__", (Ref(0), Ref(0)), {}, Ref(1))],
        outputs=Ref(1),
        num_slots=2,
    )


def test_the_operator_approves_a_pending_plan_and_its_outputs_leave_without_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = _device(tmp_path)
    SqliteStore(tmp_path).put_object(StoredObject("rows", torch.tensor([1.0, 2.0]), ("#t",)))
    proto = plan_to_proto(_double(), plan_id="p")
    assert _send(runtime, "store_plan", cmd.StorePlan(plan=proto)).WhichOneof("outcome") == "ok"
    run = cmd.RunPlan(
        plan_id="p",
        args=ValueList(items=[value_to_proto(ObjectId("rows"))]),
        result_ids=["y"],
        return_values=True,
    )
    refused = _send(runtime, "run_plan", run)
    assert refused.error.code == "POLICY_REFUSED" and "unapproved-plan" in refused.error.message
    assert main(["device", "pending", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert proto.content_hash in out and "Tensor.__add__" in out and "p1" in out
    assert main(["device", "approve", "--data-dir", str(tmp_path), proto.content_hash]) == 0
    ok = _send(runtime, "run_plan", run)  # the same runtime: the file is read again
    assert ok.WhichOneof("outcome") == "ok", ok.error
    assert ok.ok.objects[0].has_value  # the output left the device in the reply
    main(["device", "pending", "--data-dir", str(tmp_path)])
    assert "no plans waiting" in capsys.readouterr().out
    assert main(["device", "audit", "--data-dir", str(tmp_path), "--refused"]) == 0
    audit = capsys.readouterr().out
    assert "POLICY_REFUSED" in audit and "unapproved-plan" in audit and "p1" in audit


def test_public_tags_and_admitted_producers_are_set_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = _device(tmp_path)
    SqliteStore(tmp_path).put_object(StoredObject("rows", torch.ones(2), ("#open",)))
    get = cmd.GetObject(id="rows")
    assert _send(runtime, "get_object", get).error.code == "POLICY_REFUSED"
    main(["device", "policy", "--data-dir", str(tmp_path), "--public", "#open"])
    assert json.loads(capsys.readouterr().out)["public_tags"] == ["#open"]
    assert _send(runtime, "get_object", get).WhichOneof("outcome") == "ok"
    main(["device", "policy", "--data-dir", str(tmp_path), "--allow", "p2"])
    assert _send(runtime, "get_object", get).error.code == "POLICY_REFUSED"  # p1 not admitted
    assert _send(runtime, "get_object", get, sender="p2").WhichOneof("outcome") == "ok"
    entries = AuditLog(tmp_path).entries(sender="p2")
    assert entries[-1].rule == "public-tags" and entries[-1].bytes_out == 8


def test_an_invalid_policy_file_refuses_every_command_instead_of_dropping_the_rules(
    tmp_path: Path,
) -> None:
    runtime = _device(tmp_path)
    (tmp_path / "policy.json").write_text('{"public_tags": "#all"}')
    store = cmd.StoreObject(id="x")
    assert _send(runtime, "store_object", store).error.code == "POLICY_REFUSED"


def test_the_audit_log_cannot_be_rewritten(tmp_path: Path) -> None:
    runtime = _device(tmp_path)
    _send(runtime, "list_objects", cmd.ListObjects())
    db = sqlite3.connect(tmp_path / "audit.sqlite3")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET sender = 'nobody'")
