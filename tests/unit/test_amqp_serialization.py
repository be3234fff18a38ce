"""Tests of the fedplan kombu content type, Celery headers, chunking and the Celery app."""

from __future__ import annotations

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

from broker_config import names
from broker_config.envelope import CONTENT_TYPE, split_chunks, task_headers
from broker_config.settings import Settings
from consumer.worker.celery_app import make_app
from consumer.worker.serialization import SERIALIZER, register_content_type

register_content_type()


@pytest.mark.parametrize("body", [b"\x00\xffgarbage", b"\x00", memoryview(b"abc"), "text", 12345])
def test_the_decoder_wraps_any_body_and_never_raises(body: object) -> None:
    args, kwargs, embed = loads(body, CONTENT_TYPE, "binary", accept=[CONTENT_TYPE])
    assert len(args) == 1 and isinstance(args[0], bytes)
    assert kwargs == {} and embed["callbacks"] is None
    if isinstance(body, bytes | memoryview):
        assert args[0] == bytes(body)


def test_the_encoder_sends_the_bytes_unchanged() -> None:
    content_type, encoding, data = dumps(b"\x01\x02", serializer=SERIALIZER)
    assert (content_type, encoding, data) == (CONTENT_TYPE, "binary", b"\x01\x02")


def test_json_and_pickle_bodies_are_refused_when_only_protobuf_is_accepted() -> None:
    for content_type in ("application/json", "application/x-python-serialize"):
        with pytest.raises(ContentDisallowed):
            loads(b"[]", content_type, "utf-8", accept=[CONTENT_TYPE])


def test_task_headers_carry_what_a_celery_worker_requires() -> None:
    h = task_headers("abc", extra={"fedplan_chunk": 1})
    assert h["task"] == names.TASK_NAME and h["id"] == "abc" and h["lang"] == "py"
    assert h["timelimit"] == [None, None] and h["retries"] == 0
    assert h["fedplan_chunk"] == 1


@pytest.mark.parametrize(("size", "limit", "count"), [(0, 10, 1), (10, 10, 1), (25, 10, 3)])
def test_chunks_rejoin_to_the_original_bytes(size: int, limit: int, count: int) -> None:
    data = bytes(range(256))[:size] if size <= 256 else bytes(size)
    pieces = split_chunks(data, limit)
    assert len(pieces) == count
    assert all(len(p) <= limit for p in pieces)
    assert b"".join(pieces) == data


def test_the_celery_app_acks_late_prefetches_one_and_accepts_only_protobuf() -> None:
    app = make_app(Settings(soft_time_limit=5, time_limit=7))
    c = app.conf
    assert c.task_acks_late and c.task_reject_on_worker_lost
    assert c.worker_prefetch_multiplier == 1
    assert list(c.accept_content) == [CONTENT_TYPE]
    # the soft limit is enforced in the pool process (no Celery timer per task)
    assert (c.task_soft_time_limit, c.task_time_limit) == (None, 7)
    assert c.fedplan_settings.soft_time_limit == 5
    assert not c.task_acks_on_failure_or_timeout  # failed or timed out: dead-lettered
    assert not c.worker_send_task_events  # off unless FEDPLAN_TASK_EVENTS (Flower)
    assert make_app(Settings(task_events=True)).conf.worker_send_task_events
    assert names.TASK_NAME in app.tasks


def test_a_device_queue_named_on_the_command_line_gets_fedplan_arguments() -> None:
    app = make_app(Settings(queue_max_length=9))
    queue = app.amqp.queues[names.device_queue("zed")]
    assert queue.exchange.name == names.commands_exchange()
    assert queue.routing_key == names.device_routing_key("zed")
    assert queue.queue_arguments["x-max-length"] == 9
    assert queue.queue_arguments["x-dead-letter-exchange"] == names.dead_letter_exchange()


def test_a_body_that_is_not_bytes_becomes_an_empty_command_and_the_log_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from consumer.worker.serialization import _decode

    with caplog.at_level("WARNING", logger="consumer.worker.serialization"):
        args, _, _ = _decode(10**12)  # bytes(10**12) would try to allocate a terabyte
    assert args == (b"",)
    assert "int body is not bytes; it is handled as empty" in caplog.text
