"""A producer SIGKILLed with calls in flight: a new one with its producer id gets every result.

The killed producer's journal names what it had in flight; ``fp.connect`` with the same
producer id re-registers those commands before consuming the durable results queue, so the
replies that came meanwhile (results, plain Python outputs, typed errors) are delivered by
id instead of being dropped as replies to unknown commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
import torch

import producer as fp
from schemas.errors import ObjectNotFound, PlanShapeError
from tests.integration.broker import REPO, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq

SCRIPT = Path(__file__).with_name("killed_producer.py")


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"the producer process ended early:\n{proc.stderr.read()[-4000:]}")
    return line.strip()


def test_a_killed_producers_pending_results_reach_a_new_producer_with_its_id(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    producer_id = f"k{os.getpid()}{tmp_path.name[-6:]}".replace("_", "")
    journal = tmp_path / "journal"
    worker = workers("alice")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), vhost.url, producer_id, str(journal)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _line(proc) == "READY"
        worker.stop()  # the calls wait in alice's durable queue
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ids = json.loads(_line(proc))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    workers("alice")  # alice comes back (same data dir) and answers into the results queue

    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as fleet:
        recovered = fleet.recover()
        assert ids["missing_command"] in recovered
        assert len(recovered) == 3
        collector = fleet.collector
        x = torch.tensor([1.0, -2.0, 3.0, -4.0])
        assert torch.equal(
            collector.for_result(ids["tensor"]).value(ids["tensor"], 120), x.abs() * 2
        )
        assert collector.for_result(ids["value"]).value(ids["value"], 120) == 4  # plain output
        with pytest.raises(PlanShapeError) as shape_err:
            collector.wait_result(ids["failing"], 120)
        assert shape_err.value.device_id == "alice"
        with pytest.raises(ObjectNotFound, match="no-such-object") as missing:
            recovered[ids["missing_command"]].reply(120)
        assert missing.value.device_id == "alice"
        assert collector.journal is not None
        assert collector.journal.in_flight() == []


def test_a_chunked_reply_half_received_by_a_stopped_producer_reaches_the_next_one(
    vhost: RunVhost, tmp_path: Path
) -> None:
    from broker_config import names
    from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER
    from producer.transport.amqp import AmqpTransport
    from schemas.command_pb2 import ObjectInfo, Ok, Reply
    from schemas.value_codec import value_to_proto
    from schemas.wire import encode_reply, new_id

    producer_id = f"c{new_id()[:12]}"
    journal = tmp_path / "journal"
    info = ObjectInfo(id="r", kind="value", python_value=value_to_proto("x" * 5000))
    cid = new_id()
    reply = encode_reply(Reply(command_id=cid, device_id="alice", ok=Ok(objects=[info])))
    half = len(reply) // 2

    def chunk(i: int, data: bytes) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            headers = {TRANSFER_HEADER: cid, CHUNK_HEADER: i, CHUNKS_HEADER: 2}
            props = pika.BasicProperties(headers=headers, user_id="guest", delivery_mode=2)
            ch.basic_publish(
                names.results_exchange(), names.results_routing_key(producer_id), data, props
            )
        finally:
            conn.close()

    first = fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal)
    first.collector.expect(cid, device_id="alice", result_ids=("r",))  # as if sent
    first.collector.published(cid)  # the broker confirmed it
    transport = first.transport
    assert isinstance(transport, AmqpTransport)
    chunk(0, reply[:half])
    deadline = time.monotonic() + 60
    while transport.incomplete_replies[0] != 1:
        assert time.monotonic() < deadline, "the first chunk never arrived"
        time.sleep(0.05)
    first.close()  # like a kill for the broker: the unacked chunk is queued again
    chunk(1, reply[half:])
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as second:
        assert second.recover()[cid].value("r", 60) == "x" * 5000


HALF_RECEIVER = """
import sys, time
import producer as fp
url, producer_id, journal, cid = sys.argv[1:5]
fleet = fp.connect(url, producer_id=producer_id, journal_dir=journal)
fleet.collector.expect(cid, device_id="alice", result_ids=("r",))  # as if it had sent it
fleet.collector.published(cid)  # and the broker had confirmed it
print("READY", flush=True)
while fleet.transport.incomplete_replies[0] != 1:
    time.sleep(0.02)
print("HELD", flush=True)
time.sleep(300)
"""


def test_a_producer_sigkilled_half_way_through_a_chunked_reply_leaves_all_of_it_to_the_next(
    vhost: RunVhost, tmp_path: Path
) -> None:
    from broker_config import names
    from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER
    from schemas.command_pb2 import ObjectInfo, Ok, Reply
    from schemas.value_codec import value_to_proto
    from schemas.wire import encode_reply, new_id

    producer_id = f"h{new_id()[:12]}"
    journal = tmp_path / "journal"
    cid = new_id()
    info = ObjectInfo(id="r", kind="value", python_value=value_to_proto("y" * 7000))
    reply = encode_reply(Reply(command_id=cid, device_id="alice", ok=Ok(objects=[info])))
    half = len(reply) // 2
    conn = pika.BlockingConnection(pika.URLParameters(vhost.url))
    ch = conn.channel()
    ch.confirm_delivery()

    def chunk(i: int, data: bytes) -> None:
        headers = {TRANSFER_HEADER: cid, CHUNK_HEADER: i, CHUNKS_HEADER: 2}
        props = pika.BasicProperties(headers=headers, user_id="guest", delivery_mode=2)
        ch.basic_publish(
            names.results_exchange(), names.results_routing_key(producer_id), data, props
        )

    proc = subprocess.Popen(
        [sys.executable, "-c", HALF_RECEIVER, vhost.url, producer_id, str(journal), cid],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _line(proc) == "READY"
        chunk(0, reply[:half])
        assert _line(proc) == "HELD"  # the first chunk is in, unacked
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        chunk(1, reply[half:])
        conn.close()
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as successor:
        assert successor.recover()[cid].value("r", 60) == "y" * 7000


UNSENT = """
import sys, os
import torch
import producer as fp
from schemas.command_pb2 import Command, StoreObject
from schemas.tensor_codec import tensor_to_proto
from schemas.wire import SCHEMA_VERSION, encode_command, new_id
url, producer_id, journal = sys.argv[1:4]
fleet = fp.connect(url, producer_id=producer_id, journal_dir=journal)
fleet.device("alice")
cid = new_id()
msg = StoreObject(id="kept", tensor=tensor_to_proto(torch.arange(4.0)))
data = encode_command(
    Command(schema_version=SCHEMA_VERSION, command_id=cid, device_id="alice", store_object=msg)
)
fleet.collector.expect(cid, device_id="alice", result_ids=("kept",), data=data)
print(cid, flush=True)
os._exit(0)  # killed between the journal row and the publish
"""


def test_a_command_whose_producer_died_before_publishing_it_is_sent_by_the_successor(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    producer_id = f"u{os.getpid()}{tmp_path.name[-6:]}".replace("_", "")
    journal = tmp_path / "journal"
    workers("alice")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", UNSENT, vhost.url, producer_id, str(journal)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    cid = done.stdout.split()[-1]
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as fleet:
        recovered = fleet.recover()
        assert set(recovered) == {cid}
        recovered[cid].result(60)  # published again on recovery, answered by alice
        assert torch.equal(fleet.device("alice").fetch("kept", timeout=60), torch.arange(4.0))
