"""Failover to a cluster's other nodes: producer (pika) and worker (kombu) take URL lists."""

from __future__ import annotations

import pytest

from broker_config.settings import Settings
from consumer.worker.celery_app import _DeviceQueues, make_app
from producer.transport.amqp import AmqpTransport, connection_parameters
from schemas.errors import BrokerUnavailable

URLS = "amqp://u:pw@127.0.0.1:5681/v;amqp://u:pw@127.0.0.1:5682/v;amqp://u:pw@127.0.0.1:5683/v"


def test_the_producer_gets_one_set_of_connection_parameters_per_node_in_order() -> None:
    params = connection_parameters(Settings(broker_url=URLS, heartbeat=7), "fedplan producer p")
    assert [p.port for p in params] == [5681, 5682, 5683]
    assert {p.virtual_host for p in params} == {"v"}
    assert {p.heartbeat for p in params} == {7}
    assert all(p.client_properties == {"connection_name": "fedplan producer p"} for p in params)


def test_a_producer_that_reaches_no_node_names_every_address_it_tried_and_no_password() -> None:
    settings = Settings(
        broker_url="amqp://u:s3cret@127.0.0.1:1/;amqp://u:s3cret@127.0.0.1:2/",
        confirm_timeout=10,
    )
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1/;amqp://127\.0\.0\.1:2/") as e:
        AmqpTransport(on_reply=lambda _: None, settings=settings)
    assert "s3cret" not in str(e.value)


def test_the_worker_connection_fails_over_across_every_url_round_robin() -> None:
    before = _DeviceQueues.settings
    app = make_app(Settings(broker_url=URLS))
    _DeviceQueues.settings = before  # make_app sets the class default for -Q queues
    conn = app.connection_for_read()
    try:
        assert conn.port == 5681
        assert [u.split("@")[1] for u in conn.alt] == [
            "127.0.0.1:5681/v",
            "127.0.0.1:5682/v",
            "127.0.0.1:5683/v",
        ]
        assert app.conf.broker_failover_strategy in (None, "round-robin")
    finally:
        conn.release()
