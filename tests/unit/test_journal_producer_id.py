"""One live producer per producer id: the journal's lock, released by close and by a kill."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from producer.transport.journal import Journal, ProducerIdInUse, journal_path
from schemas.errors import TransportError

HOLDER = """
import sys, time
from pathlib import Path
from producer.transport.journal import Journal
j = Journal(Path(sys.argv[1]))
j.record("c1", "alice", ("r1",))
print("HELD", flush=True)
time.sleep(120)
"""


def test_a_second_journal_of_a_producer_id_in_use_is_refused_with_a_typed_error(
    tmp_path: Path,
) -> None:
    path = journal_path(tmp_path, "p1")
    first = Journal(path)
    try:
        with pytest.raises(ProducerIdInUse, match="'p1' is in use") as refused:
            Journal(path)
        assert isinstance(refused.value, TransportError)
        assert refused.value.code == "PRODUCER_ID_IN_USE"
        first.record("c1", "alice", ("r1",))  # the holder is unaffected
        assert [e.command_id for e in first.in_flight()] == ["c1"]
    finally:
        first.close()
    second = Journal(path)  # closed: the id is free again, with its rows
    try:
        assert [e.command_id for e in second.in_flight()] == ["c1"]
    finally:
        second.close()


def test_a_sigkilled_producer_leaves_its_id_free_for_the_next_one(tmp_path: Path) -> None:
    path = journal_path(tmp_path, "p2")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "HELD"
        with pytest.raises(ProducerIdInUse):
            Journal(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    after = Journal(path)
    try:
        assert [e.command_id for e in after.in_flight()] == ["c1"]
    finally:
        after.close()


def test_a_full_journal_refuses_a_command_with_a_typed_error_before_it_is_published(
    tmp_path: Path,
) -> None:
    from producer.remote.collector import ReplyCollector

    journal = Journal(journal_path(tmp_path, "p3"))
    try:
        db = journal._db
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        db.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL at the next new page
        collector = ReplyCollector(journal=journal)
        big = tuple(f"r{i:05d}" for i in range(5000))  # a row over the pages left
        with pytest.raises(TransportError, match="was not sent"):
            collector.expect("c1", device_id="alice", result_ids=big)
        assert collector.in_flight == 0  # not registered: the caller never publishes it
        assert journal.in_flight() == []
    finally:
        journal.close()
