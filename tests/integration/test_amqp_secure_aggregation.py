"""A secure-aggregation round on real Celery workers over RabbitMQ, watched from the broker:
a queue bound to the results exchange with the producer's routing key gets a copy of every
reply, and none holds a device's update or its quantized form."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pika
import pytest
import torch

import producer as fp
from broker_config import names
from consumer.secagg.quantize import unpack_vector
from producer.fl.training import flatten
from schemas import command_pb2 as cmd
from schemas.wire import decode_reply
from tests.behaviour.conftest import DeviceFactory
from tests.behaviour.test_secure_adaptive_clip import (
    adaptive_runner,
    assert_indicator_masked,
    assert_nowhere,
    eager_clipped,
)
from tests.behaviour.test_secure_aggregation import (
    assert_fedavg_of,
    eager_updates,
    make_setup,
    runner,
)
from tests.integration.fleet import connect_rabbitmq, worker_pool

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(900)]  # minutes on a loaded machine


@pytest.fixture
def fleet() -> Iterator[fp.Fleet]:
    fleet = connect_rabbitmq()
    try:
        yield fleet
    finally:
        fleet.close()


@contextmanager
def results_spy(fleet: fp.Fleet) -> Iterator[Callable[[], list[bytes]]]:
    """A queue bound to the results exchange with the producer's routing key (a copy of
    every reply); yields a function that drains it. The queue is deleted afterwards."""
    producer_id = fleet.transport.settings.producer_id  # type: ignore[attr-defined]
    assert producer_id
    spy = f"spy-{secrets.token_hex(4)}"
    connection = pika.BlockingConnection(pika.URLParameters(worker_pool().vhost.url))
    try:
        channel = connection.channel()
        channel.queue_declare(spy, auto_delete=False, durable=False)
        channel.queue_bind(spy, names.results_exchange(), names.results_routing_key(producer_id))

        def drain() -> list[bytes]:
            bodies: list[bytes] = []
            while True:
                method, _props, body = channel.basic_get(spy, auto_ack=True)
                if method is None:
                    return bodies
                bodies.append(body)

        yield drain
    finally:
        try:
            connection.channel().queue_delete(spy)
        finally:
            connection.close()


def fleet_devices(fleet: fp.Fleet) -> DeviceFactory:
    def device(name: str, data: tuple[torch.Tensor, ...] = ()) -> fp.Device:
        handle = fleet.device(name)
        handle.clear_objects()
        for tensor in data:
            handle.send_tensor(tensor).wait()
        return handle

    return device


def test_a_queue_on_the_results_exchange_sees_only_masked_updates_of_a_secure_round(
    fleet: fp.Fleet,
) -> None:
    with results_spy(fleet) as drain:
        s = make_setup(fleet_devices(fleet), 4)
        run = runner(s)
        outcome = run.run_round(1, s.weights)
        assert outcome.committed and outcome.weights is not None
        assert run.last_aggregate is not None and run.last_config is not None
        assert_fedavg_of(s, outcome.weights, [m.device_id for m in s.members],
                         run.last_aggregate.error_bound)
        bodies = drain()

    updates = eager_updates(s)
    replies = [decode_reply(b) for b in bodies]
    masked = [r.ok.secagg.masked for r in replies if r.ok.secagg.masked.vector]
    assert sorted(m.device_id for m in masked) == sorted(m.device_id for m in s.members)
    for member in s.members:
        update = updates[member.device_id]
        changed = int(torch.nonzero(update.abs() > 1e-6)[0])
        for vector in (update, flatten(s.weights) + update):
            window = vector[changed : changed + 3]
            for raw in (window.numpy().tobytes(), window.double().numpy().tobytes()):
                assert not any(raw in b for b in bodies), member.device_id
    q = run.last_config.quantization
    mod = 1 << q.modulus_bits
    for message in masked:
        member = next(m for m in s.members if m.device_id == message.device_id)
        values = unpack_vector(message.vector, run.last_config.length + 1, q.modulus_bits)[:-1]
        scaled = updates[member.device_id].double().numpy() * member.num_examples * 2**16
        floor = np.floor(scaled).astype(np.int64) % mod
        hits = (values == floor.astype(np.uint64)) | (
            values == ((floor + 1) % mod).astype(np.uint64))
        assert hits.mean() < 0.05
    assert all(isinstance(r, cmd.Reply) for r in replies)


def test_a_queue_on_the_results_exchange_sees_no_update_and_no_indicator_of_an_adaptive_round(
    fleet: fp.Fleet,
) -> None:
    with results_spy(fleet) as drain:
        s = make_setup(fleet_devices(fleet), 4, adaptive_clip=True)
        updates = eager_updates(s)
        norms = sorted(float(u.double().norm()) for u in updates.values())
        clip_norm = (norms[1] + norms[2]) / 2  # two of the four updates are clipped
        run = adaptive_runner(s, clip_norm, z=1.0)
        assert run.adaptive is not None
        scale = run.adaptive.scale
        outcome = run.run_round(1, s.weights)
        assert outcome.committed and run.last_config is not None
        bodies = drain()
    assert outcome.results[0].metrics["clip_norm"] == clip_norm
    masked = [r.ok.secagg.masked for r in map(decode_reply, bodies) if r.ok.secagg.masked.vector]
    assert sorted(m.device_id for m in masked) == sorted(m.device_id for m in s.members)
    for member in s.members:
        update = updates[member.device_id]
        assert_nowhere([update, eager_clipped(update, clip_norm)], bodies, member.device_id)
    config = run.last_config
    for message in masked:
        values = unpack_vector(message.vector, config.length + 1,
                               config.quantization.modulus_bits)
        assert_indicator_masked(int(values[-2]), scale, config)
