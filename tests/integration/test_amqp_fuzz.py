"""Fuzzing a real worker: seeded random mutations of valid commands, properties and headers.

The worker must never die, valid work interleaved with the mutations must succeed, and the
device queue must drain (nothing stays unacked). Bounded: ``FUZZ_MESSAGES`` messages, and
publishing stops after ``FUZZ_SECONDS`` whatever the count.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest
import torch

from broker_config import names
from broker_config.envelope import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    TRANSFER_HEADER,
    task_headers,
)
from producer.transport.amqp import AmqpTransport
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq

FUZZ_MESSAGES = int(os.environ.get("FEDPLAN_FUZZ_MESSAGES", "2500"))
FUZZ_SECONDS = 40.0
SEED = int(os.environ.get("FEDPLAN_FUZZ_SEED", "20261201"))

_KEYS = [
    "id",
    "task",
    "lang",
    "eta",
    "countdown",
    "expires",
    "timelimit",
    "retries",
    "compression",
    "shadow",
    "group",
    "root_id",
    "parent_id",
    "argsrepr",
    "stamps",
    "x-delivery-count",
    "fedplan_deliveries",
    TRANSFER_HEADER,
    CHUNK_HEADER,
    CHUNKS_HEADER,
]
_CONTENT_TYPES = [
    None,
    CONTENT_TYPE,
    "application/json",
    "application/data",
    "application/text",
    "application/x-python-serialize",
    "application/x-yaml",
    "text/plain",
]


def _value(rng: random.Random) -> Any:
    pool: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([0, 1, -1, 2, 3, 10**9, -(2**63), 2**63 - 1]),
        lambda: rng.choice([True, False]),
        lambda: "".join(rng.choice("ab.:-_0 \u00e9") for _ in range(rng.randint(0, 40))),
        lambda: "x" * rng.choice([200, 1100, 30_000]),
        lambda: rng.randbytes(rng.randint(0, 20)),
        lambda: [None, None] if rng.random() < 0.5 else [rng.randint(-5, 500)] * 2,
        lambda: {"a": rng.randint(0, 9), "b": [1, {"c": "d"}]},
        lambda: "fedplan.handle",
        lambda: rng.choice(["celery.chord_unlock", "celery.group", "celery.chain"]),
        lambda: "2999-01-01T00:00:00+00:00",
        lambda: "application/x-bz2",
    ]
    return rng.choice(pool)()


def _mutate(rng: random.Random, body: bytes, cid: str) -> tuple[bytes, dict[str, Any]]:
    headers: dict[str, Any] = task_headers(cid)
    props: dict[str, Any] = {
        "content_type": CONTENT_TYPE,
        "content_encoding": CONTENT_ENCODING,
        "correlation_id": cid,
        "delivery_mode": 2,
    }
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.35:
            headers[rng.choice(_KEYS)] = _value(rng)
        elif kind < 0.45:
            headers.pop(rng.choice(list(headers) or ["id"]), None)
        elif kind < 0.6:
            data = bytearray(body)
            for _ in range(rng.randint(1, 8)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            body = bytes(data)
        elif kind < 0.7:
            body = body[: rng.randint(0, len(body))] + rng.randbytes(rng.randint(0, 64))
        elif kind < 0.8:
            props["content_type"] = rng.choice(_CONTENT_TYPES)
        elif kind < 0.85:
            props["content_encoding"] = rng.choice([None, "binary", "utf-8", "gzip"])
        elif kind < 0.9:
            props["correlation_id"] = rng.choice([None, "", "x" * 255, "ok-id", cid])
        elif kind < 0.95:
            props["expiration"] = rng.choice(["0", "50", "100000"])
        else:
            headers.update(
                {
                    TRANSFER_HEADER: rng.choice(["t1", "t2", cid]),
                    CHUNK_HEADER: rng.randint(-1, 4),
                    CHUNKS_HEADER: rng.choice([2, 3, 10**9]),
                }
            )
    props["headers"] = headers
    return body, props


def test_a_fuzzed_stream_never_kills_the_worker_and_valid_work_interleaved_succeeds(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
) -> None:
    fuzz = workers("fuzz")
    transport.ensure_device("fuzz")
    reply_to = names.results_routing_key(transport.producer_id)
    seeds = [
        cmd.store_object("s", "fuzz", "x", torch.arange(6.0).reshape(2, 3)),
        cmd.get_object("g", "fuzz", "x"),
        cmd.store_plan("p", "fuzz", cmd.slow_plan(2, torch.eye(3)), "p"),
        cmd.run_plan("r", "fuzz", "p", ["x"], ["y"]),
    ]
    rng = random.Random(SEED)
    conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
    ch = conn.channel()
    valid: dict[str, torch.Tensor] = {}
    sent = 0
    deadline = time.monotonic() + FUZZ_SECONDS
    try:
        while sent < FUZZ_MESSAGES and time.monotonic() < deadline:
            cid = new_id()
            body, props = _mutate(rng, rng.choice(seeds), cid)
            if rng.random() < 0.8:
                props["reply_to"] = reply_to
            ch.basic_publish(
                names.commands_exchange(),
                names.device_routing_key("fuzz"),
                body,
                pika.BasicProperties(**props),
            )
            sent += 1
            if sent % 250 == 0:  # valid work in between
                x = torch.randn(3)
                vid = new_id()
                data = cmd.store_object(vid, "fuzz", f"v{sent}", x)
                transport.publish("fuzz", data, command_id=vid)
                valid[vid] = x
    finally:
        conn.close()
    assert sent >= min(FUZZ_MESSAGES, 500)
    for vid in valid:
        assert replies.wait(vid, 120).WhichOneof("outcome") == "ok"
    vhost.wait_queue(names.device_queue("fuzz"), timeout=120, messages=0, messages_unacknowledged=0)
    assert fuzz.proc is not None and fuzz.proc.poll() is None, fuzz.log_tail()
    for i, x in enumerate(valid.values()):  # the stored values are intact
        gid = new_id()
        key = f"v{(i + 1) * 250}"
        transport.publish("fuzz", cmd.get_object(gid, "fuzz", key), command_id=gid)
        got = replies.wait(gid, 60)
        assert got.WhichOneof("outcome") == "ok", got.error
        assert torch.equal(tensor_from_proto(got.ok.objects[0].value), x)
    log = fuzz.log_tail(100_000)
    for bad in ("Unrecoverable error", "the gate failed", "WorkerLostError", "exited with"):
        assert bad not in log, bad  # no crash of the main process, the gate or the pool
