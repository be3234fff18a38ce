"""A producer killed between a reply's arrival and its journal row's delete loses no reply.

The child process below receives the reply to its command and dies (``os._exit``, as a
SIGKILL would leave it) just before or just after the journal deletes the command's row.
Either its application got the reply (the future's callback ran), or the next producer
with its id recovers the command from the journal: never neither.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from producer.remote.collector import ReplyCollector
from producer.transport.journal import Journal, journal_path

CHILD = """
import os, sys
from pathlib import Path
from producer.remote.collector import ReplyCollector
from producer.transport.journal import Journal
from schemas.command_pb2 import ObjectInfo, Ok, Reply
from schemas.value_codec import value_to_proto
from schemas.wire import encode_reply

journal = Journal(Path(sys.argv[1]))
where = sys.argv[2]
real_done = journal.done

def done_then_die(command_id):
    if where == "after_delete":
        real_done(command_id)
    os._exit(70)

journal.done = done_then_die
collector = ReplyCollector(journal=journal)
pending = collector.expect("c1", device_id="alice", result_ids=("r1",))
pending.add_done_callback(lambda p: print("HANDED", p.value("r1"), flush=True))
info = ObjectInfo(id="r1", kind="value", python_value=value_to_proto(42))
collector.on_reply(encode_reply(Reply(command_id="c1", device_id="alice", ok=Ok(objects=[info]))))
print("NOT KILLED", flush=True)
"""


@pytest.mark.parametrize("where", ["before_delete", "after_delete"])
def test_a_producer_killed_at_the_handover_either_handed_the_reply_or_leaves_it_to_recover(
    tmp_path: Path, where: str
) -> None:
    path = journal_path(tmp_path, "p1")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 70, child.stderr
    handed = "HANDED 42" in child.stdout
    successor = ReplyCollector(journal=Journal(path))
    try:
        recovered = successor.recover()
    finally:
        assert successor.journal is not None
        successor.journal.close()
    assert handed or "c1" in recovered, (child.stdout, recovered)
    assert handed  # the reply reaches the future before its row may go
