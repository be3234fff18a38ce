"""The device gate (no broker): what it admits, what it refuses and the headers Celery sees."""

from __future__ import annotations

import bz2
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from broker_config.envelope import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    TRANSFER_HEADER,
    chunk_headers,
    task_headers,
)
from broker_config.settings import Settings
from consumer.worker.chunks import (
    MAX_PENDING_TRANSFERS,
    assemble,
    collect_expired,
    done_with_chunks,
    pending,
    pending_bytes,
    transfer_dir,
)
from consumer.worker.gate import (
    DELIVERIES_HEADER,
    MIN_CHUNK_BYTES,
    SENDER_HEADER,
    Gate,
    inspect,
    max_chunks,
)
from consumer.worker.limits import purge_cancelled_timers, time_budget
from schemas.errors import MessageRefused, TimeLimitError

S = Settings()


def _props(**headers: Any) -> dict[str, Any]:
    h = task_headers("c1")
    for k, v in headers.items():
        if v is _DROP:
            h.pop(k, None)
        else:
            h[k] = v
    return {
        "content_type": CONTENT_TYPE,
        "content_encoding": CONTENT_ENCODING,
        "application_headers": h,
        "correlation_id": "c1",
        "user_id": "producer-1",
        "reply_to": "fedplan.results.p1",
    }


_DROP = object()


def test_a_valid_command_is_admitted_with_clean_headers() -> None:
    v = inspect(_props(), b"body", S)
    assert v.refusal is None
    assert v.headers["task"] == "fedplan.handle" and v.headers["id"] == "c1"
    assert v.headers["timelimit"] == [None, None] and v.headers["eta"] is None
    assert (v.reply_to, v.command_id) == ("fedplan.results.p1", "c1")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"content_type": "application/data"}, "content type"),
        ({"content_type": "application/text"}, "content type"),
        ({"content_type": None}, "content type"),
        ({"content_type": "application/json"}, "content type"),
        ({"content_encoding": "utf-8"}, "content encoding"),
    ],
)
def test_content_types_kombu_accepts_by_itself_are_refused(
    change: dict[str, Any], reason: str
) -> None:
    props = {**_props(), **change}
    v = inspect(props, b"some text", S)
    assert v.refusal is not None and reason in v.refusal
    assert v.command_id == "c1" and v.reply_to == "fedplan.results.p1"  # still answered


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"id": ["a", "b"]}, "'id'"),
        ({"id": {"x": 1}}, "'id'"),
        ({"id": _DROP}, "'id'"),
        ({"task": ["fedplan.handle"]}, "'task'"),
        ({"task": {"a": 1}}, "'task'"),
        ({"task": "celery.chord_unlock"}, "'task'"),
        ({"task": "celery.group"}, "'task'"),
        ({"task": "other", "id": _DROP}, "'id'"),
        ({"timelimit": [-1, -1]}, "timelimit"),
        ({"timelimit": [100, 200]}, "timelimit"),
        ({"timelimit": "x"}, "timelimit"),
        ({"timelimit": [None]}, "timelimit"),
        ({"eta": "2999-01-01T00:00:00+00:00"}, "'eta'"),
        ({"countdown": 10}, "'countdown'"),
        ({"expires": "2000-01-01T00:00:00+00:00"}, "'expires'"),
        ({"retries": 3}, "'retries'"),
        ({"retries": True}, "'retries'"),
        ({"compression": "application/x-bz2"}, "compressed"),
        ({"shadow": "x"}, "'shadow'"),
        ({"lang": "js"}, "'lang'"),
        ({"argsrepr": "x" * 5000}, "'argsrepr'"),
        ({"big": "x" * 20_000}, "larger than"),
        ({"deep": [[[[[[[[[[1]]]]]]]]]]}, "too deep"),
    ],
)
def test_headers_celery_would_act_on_are_refused(headers: dict[str, Any], reason: str) -> None:
    v = inspect(_props(**headers), b"body", S)
    assert v.refusal is not None and reason in v.refusal, v.refusal


def test_a_compressed_bomb_is_refused_without_being_decompressed() -> None:
    bomb = bz2.compress(b"\0" * 10_000_000)
    v = inspect(_props(compression="application/x-bz2"), bomb, S)
    assert v.refusal == "compressed messages are not accepted"


@pytest.mark.parametrize(
    ("chunks", "reason"),
    [
        ({TRANSFER_HEADER: "t", CHUNK_HEADER: 0, CHUNKS_HEADER: 10**9}, "chunks"),
        ({TRANSFER_HEADER: "t", CHUNK_HEADER: "0", CHUNKS_HEADER: 3}, "integer"),
        ({TRANSFER_HEADER: "t", CHUNK_HEADER: 0, CHUNKS_HEADER: 2.5}, "integer"),
        ({TRANSFER_HEADER: "t", CHUNK_HEADER: True, CHUNKS_HEADER: 3}, "integer"),
        ({TRANSFER_HEADER: "t", CHUNK_HEADER: 3, CHUNKS_HEADER: 3}, "chunk 3"),
        ({TRANSFER_HEADER: "t", CHUNK_HEADER: -1, CHUNKS_HEADER: 3}, "chunk -1"),
        ({TRANSFER_HEADER: ["t"], CHUNK_HEADER: 0, CHUNKS_HEADER: 3}, TRANSFER_HEADER),
        ({CHUNK_HEADER: 0, CHUNKS_HEADER: 3}, "without"),
    ],
)
def test_bad_chunk_headers_are_refused_before_anything_is_allocated(
    chunks: dict[str, Any], reason: str
) -> None:
    v = inspect(_props(**chunks), b"x" * 100, S)
    assert v.refusal is not None and reason in v.refusal, v.refusal


def test_the_chunk_count_is_bounded_by_the_assembled_size() -> None:
    s = Settings(max_message_size=65536, max_command_size=4 * MIN_CHUNK_BYTES)
    assert max_chunks(s) == 4
    ok = inspect(_props(**chunk_headers("t", 3, 4)), b"x", s)
    assert ok.refusal is None and ok.chunked
    assert inspect(_props(**chunk_headers("t", 0, 5)), b"x", s).refusal


def test_bodies_that_are_empty_or_too_large_are_refused() -> None:
    s = Settings(max_message_size=4096)
    assert "non-empty" in str(inspect(_props(), b"", s).refusal)
    assert "4096" in str(inspect(_props(), b"x" * 4097, s).refusal)


def test_a_reply_to_outside_the_results_exchange_names_is_refused_without_a_reply() -> None:
    props = {**_props(), "reply_to": "amq.gen-xyz"}
    v = inspect(props, b"x", S)
    assert v.refusal and v.reply_to is None


def test_unknown_headers_are_dropped_and_a_sender_cannot_set_the_delivery_count() -> None:
    v = inspect(_props(stamps={"a": 1}, **{DELIVERIES_HEADER: 1}), b"x", S)
    assert v.refusal is None
    assert "stamps" not in v.headers and DELIVERIES_HEADER not in v.headers


def test_the_gate_never_raises_on_random_properties() -> None:
    rng = random.Random(8)
    values: list[Any] = [None, 1, -1, 2**70, 1.5, True, "x", b"\xff", [], {}, [1, [2]], {"a": {}}]
    for _ in range(3000):
        props = _props()
        headers = props["application_headers"]
        for _ in range(rng.randint(1, 4)):
            target = props if rng.random() < 0.3 else headers
            key = rng.choice([*props, *headers, "compression", "eta", "x"])
            target[key] = rng.choice(values)
        v = inspect(rng.choice([props, None, [], "s"]), rng.choice([b"x", b"", "s", None]), S)
        assert v.refusal is None or isinstance(v.refusal, str)


class _Channel:
    def __init__(self) -> None:
        self.rejected: list[tuple[int, bool]] = []

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.rejected.append((tag, requeue))


def _raw(props: dict[str, Any], body: bytes, redelivered: bool = False) -> Any:
    info = {"redelivered": redelivered, "routing_key": "fedplan.device.d1"}
    return SimpleNamespace(
        properties=props, body=body, delivery_info=info, delivery_tag=7, channel=_Channel()
    )


def test_the_gate_counts_redeliveries_and_refuses_past_the_hard_bound(tmp_path: Path) -> None:
    gate = Gate(Settings(data_dir=tmp_path, delivery_limit=2))
    sent: list[Any] = []
    gate._refuse = lambda raw, verdict, device, exc: sent.append(exc) or False  # type: ignore[method-assign]
    first = _raw(_props(), b"x")
    assert gate.admit(first, "fedplan.device.d1")
    assert first.properties["application_headers"][DELIVERIES_HEADER] == 1
    counts = []
    for _ in range(4):
        raw = _raw(_props(), b"x", redelivered=True)
        if gate.admit(raw, "fedplan.device.d1"):
            counts.append(raw.properties["application_headers"][DELIVERIES_HEADER])
    assert counts == [2, 3, 4]  # over the limit: the pool process refuses unless done
    assert len(sent) == 1 and "delivered 5 times" in sent[0].message


def test_a_refused_message_is_rejected_without_requeue(tmp_path: Path) -> None:
    gate = Gate(Settings(data_dir=tmp_path))
    raw = _raw({**_props(), "content_type": "application/json", "reply_to": None}, b"[]")
    assert not gate.admit(raw)  # no reply address: nothing published, still rejected
    assert raw.channel.rejected == [(7, False)]


def _request(transfer: str, index: int, count: int) -> Any:
    return SimpleNamespace(**{TRANSFER_HEADER: transfer, CHUNK_HEADER: index, CHUNKS_HEADER: count})


def test_chunks_assemble_within_the_bounds_and_refuse_beyond(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, max_message_size=4096, max_command_size=8192)
    assert assemble(s, _request("t", 0, 2), b"a" * 4096) is None
    assert assemble(s, _request("t", 1, 2), b"b" * 10) == b"a" * 4096 + b"b" * 10
    assert assemble(s, _request("u", 0, 3), b"a" * 4096) is None
    assert assemble(s, _request("u", 1, 3), b"a" * 4096) is None
    with pytest.raises(MessageRefused, match="max_command_size"):
        assemble(s, _request("u", 2, 3), b"c")


def test_a_flood_of_one_byte_transfers_stops_at_the_transfer_bound(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    for i in range(MAX_PENDING_TRANSFERS):
        assert assemble(s, _request(f"flood{i}", 1, 2), b"x") is None
    with pytest.raises(MessageRefused, match="incomplete chunked transfers already"):
        assemble(s, _request("one-more", 1, 2), b"x")
    assert not transfer_dir(s, "one-more", 2).exists()
    assert assemble(s, _request("flood0", 0, 2), b"y") == b"yx"  # open ones still complete
    done_with_chunks(s, _request("flood0", 0, 2))
    assert pending(s) == (MAX_PENDING_TRANSFERS - 1, (MAX_PENDING_TRANSFERS - 1) * MIN_CHUNK_BYTES)


def test_tiny_chunks_count_as_min_chunk_bytes_against_the_pending_bound(tmp_path: Path) -> None:
    s = Settings(
        data_dir=tmp_path,
        max_message_size=4096,
        max_command_size=MIN_CHUNK_BYTES * 3,
        max_pending_chunk_bytes=MIN_CHUNK_BYTES * 3,
    )
    for i in range(3):
        assert assemble(s, _request("t", i, 4), b"x") is None
    with pytest.raises(MessageRefused, match="max_pending_chunk_bytes"):
        assemble(s, _request("u", 0, 2), b"x")
    assert pending_bytes(s) == 3 * MIN_CHUNK_BYTES


def test_incomplete_transfers_expire_after_their_ttl(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, chunk_ttl=60)
    assert assemble(s, _request("old", 0, 2), b"x") is None
    assert assemble(s, _request("new", 0, 2), b"x") is None
    old = transfer_dir(s, "old", 2)
    past = time.time() - 120
    os.utime(old, (past, past))
    assert collect_expired(s) == 1
    assert not old.exists() and transfer_dir(s, "new", 2).exists()


def test_the_time_budget_stops_a_long_command_with_a_typed_error() -> None:
    with pytest.raises(TimeLimitError, match=r"time limit of 0\.2 s"), time_budget(0.2):
        while True:
            time.sleep(0.01)
    with time_budget(0.2):
        pass
    time.sleep(0.3)  # the alarm is off after the block: nothing fires


def test_cancelled_timer_entries_leave_the_heap() -> None:
    from kombu.asynchronous.timer import Timer

    timer = Timer()
    keep = timer.call_after(600, print)
    for _ in range(100):
        timer.call_after(600, print).cancel()
    assert purge_cancelled_timers(timer) == 100
    assert len(timer) == 1 and not keep.canceled


def test_the_dead_letter_queue_is_bounded_in_topology_and_definitions() -> None:
    import json

    from broker_config import names, topology

    s = Settings(dead_letter_max_length=7, dead_letter_ttl=60)
    args = topology.dead_letter_queue(s).arguments
    assert args == {"x-max-length": 7, "x-message-ttl": 60_000, "x-overflow": "drop-head"}
    path = Path(names.__file__).with_name("definitions.json")
    (dlq,) = [q for q in json.loads(path.read_text())["queues"] if q["name"] == "fedplan.dead"]
    assert dlq["arguments"] == topology.dead_letter_queue(Settings()).arguments


def test_bound_settings_are_read_from_the_environment_and_checked() -> None:
    from schemas.errors import FedplanError

    s = Settings.from_env({"FEDPLAN_CHUNK_TTL": "5", "FEDPLAN_LOG_FILE": "/tmp/w.log"})
    assert s.chunk_ttl == 5.0 and s.log_file == Path("/tmp/w.log")
    with pytest.raises(FedplanError, match="max_command_size"):
        Settings(max_command_size=1024)
    with pytest.raises(FedplanError, match="chunk_ttl"):
        Settings.from_env({"FEDPLAN_CHUNK_TTL": "0"})


def test_the_gate_takes_the_sender_from_user_id_and_drops_a_senders_own_claim() -> None:
    props = _props(fedplan_sender="victim")
    verdict = inspect(props, b"x", Settings())
    assert verdict.refusal is None
    assert verdict.headers[SENDER_HEADER] == "producer-1"


def test_a_command_without_user_id_is_refused() -> None:
    props = _props()
    del props["user_id"]
    assert "user_id" in (inspect(props, b"x", Settings()).refusal or "")


def test_acting_for_another_producer_is_honoured_from_device_users_only() -> None:
    props = _props(fedplan_on_behalf="victim")
    assert "device users only" in (inspect(props, b"x", Settings()).refusal or "")
    props["user_id"] = "fedplan-device-alice"
    verdict = inspect(props, b"x", Settings())
    assert verdict.refusal is None and verdict.headers[SENDER_HEADER] == "victim"
