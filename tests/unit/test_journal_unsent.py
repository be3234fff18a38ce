"""A command whose publish was never confirmed is published again by the next producer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from producer.remote.collector import ReplyCollector
from producer.transport.journal import MAX_JOURNALED_BODY, CommandNotSent, Journal


def test_a_command_keeps_its_bytes_in_the_journal_until_its_publish_is_confirmed(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "p1.sqlite3")
    journal.record("c1", "alice", ("r1",), b"command-bytes")
    [entry] = journal.in_flight()
    assert (entry.published, entry.body) == (False, b"command-bytes")
    journal.published("c1")
    [entry] = journal.in_flight()
    assert (entry.published, entry.body) == (True, None)
    journal.close()


def test_a_command_too_large_to_journal_keeps_only_its_row(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "p1.sqlite3")
    journal.record("c1", "alice", (), b"x" * (MAX_JOURNALED_BODY + 1))
    [entry] = journal.in_flight()
    assert (entry.published, entry.body) == (False, None)
    journal.close()


def test_recovery_hands_back_unconfirmed_commands_to_publish_again(tmp_path: Path) -> None:
    first = ReplyCollector(journal=Journal(tmp_path / "p1.sqlite3"))
    first.expect("sent", device_id="alice", data=b"a")
    first.published("sent")
    first.expect("cut-short", device_id="bob", result_ids=("r2",), data=b"b")
    first.journal.close()  # type: ignore[union-attr]  # the producer died here
    successor = ReplyCollector(journal=Journal(tmp_path / "p1.sqlite3"))
    recovered = successor.recover()
    assert set(recovered) == {"sent", "cut-short"}
    assert successor.unsent() == [("bob", "cut-short", b"b")]
    successor.published("cut-short")
    assert all(e.published for e in successor.journal.in_flight())  # type: ignore[union-attr]


def test_an_unconfirmed_command_too_large_to_journal_fails_at_once_with_command_not_sent(
    tmp_path: Path,
) -> None:
    first = ReplyCollector(journal=Journal(tmp_path / "p1.sqlite3"))
    first.expect("big", device_id="alice", data=b"x" * (MAX_JOURNALED_BODY + 1))
    first.journal.close()  # type: ignore[union-attr]
    successor = ReplyCollector(journal=Journal(tmp_path / "p1.sqlite3"))
    recovered = successor.recover()
    assert successor.unsent() == []
    with pytest.raises(CommandNotSent, match="send it again"):
        recovered["big"].result(0)
    assert successor.journal.in_flight() == []  # type: ignore[union-attr]


def test_a_journal_of_an_older_version_counts_its_commands_as_published(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "p1.sqlite3")
    db.execute(
        "CREATE TABLE in_flight (command_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, "
        "result_ids TEXT NOT NULL, created REAL NOT NULL)"
    )
    db.execute("INSERT INTO in_flight VALUES ('c0', 'alice', '[]', 1.0)")
    db.commit()
    db.close()
    journal = Journal(tmp_path / "p1.sqlite3")
    [entry] = journal.in_flight()
    assert (entry.command_id, entry.published, entry.body) == ("c0", True, None)
    journal.close()
