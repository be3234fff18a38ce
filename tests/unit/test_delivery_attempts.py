"""Tests of the durable per-message delivery counter."""

from __future__ import annotations

from pathlib import Path

from consumer.worker.delivery_attempts import DeliveryAttempts


def test_redeliveries_are_counted_per_message_and_survive_reopening(tmp_path: Path) -> None:
    first = DeliveryAttempts(tmp_path)
    assert first.record_redelivery("a") == 2  # the first delivery counted as one
    assert first.record_redelivery("a") == 3
    assert first.record_redelivery("b") == 2
    assert DeliveryAttempts(tmp_path).record_redelivery("a") == 4


def test_only_the_most_recent_messages_are_remembered(tmp_path: Path) -> None:
    attempts = DeliveryAttempts(tmp_path, keep=2)
    attempts.record_redelivery("old")
    attempts.record_redelivery("b")
    attempts.record_redelivery("c")
    assert attempts.record_redelivery("old") == 2  # forgotten, counted afresh
    assert attempts.record_redelivery("c") == 3
