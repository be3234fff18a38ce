"""The fedplan topology as plain data: exchanges, queue arguments and bindings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker_config import names
from broker_config.settings import Settings


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """One durable exchange."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One durable queue, its arguments and its binding (exchange, routing key)."""

    name: str
    arguments: dict[str, Any]
    exchange: str
    routing_key: str


def exchanges() -> list[ExchangeSpec]:
    """The exchanges every fedplan broker has."""
    return [
        ExchangeSpec(names.commands_exchange(), "direct"),
        ExchangeSpec(names.results_exchange(), "topic"),
        ExchangeSpec(names.dead_letter_exchange(), "fanout"),
    ]


def dead_letter_queue(settings: Settings | None = None) -> QueueSpec:
    """Where rejected commands end up (bound to the fanout dead-letter exchange).

    Bounded in length and age (RabbitMQ's disk alarm stops the whole node, so a flood of
    refused messages must not pile up): the oldest are dropped first. A quorum queue when
    ``settings.queue_type`` is quorum: on a cluster every durable queue fedplan declares is
    replicated, so losing one node loses no queue. ``settings`` default to
    :meth:`Settings.from_env`.
    """
    s = settings or Settings.from_env()
    args: dict[str, Any] = {
        "x-max-length": s.dead_letter_max_length,
        "x-message-ttl": int(s.dead_letter_ttl * 1000),
        "x-overflow": "drop-head",
        **_replicated(s),
    }
    return QueueSpec(names.dead_letter_queue(), args, names.dead_letter_exchange(), "")


def _replicated(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else {}


def device_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of a device queue: dead-lettering, bounded length with back-pressure.

    A full queue refuses new publishes (``reject-publish``): the producer's publisher
    confirm is nacked and it raises, instead of piling up work for an offline device.
    Quorum queues also get a delivery limit (a command that kills its worker every time is
    dead-lettered after ``delivery_limit`` deliveries).
    """
    args: dict[str, Any] = {
        "x-dead-letter-exchange": names.dead_letter_exchange(),
        "x-max-length": settings.queue_max_length,
        "x-overflow": "reject-publish",
    }
    if settings.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        args["x-delivery-limit"] = settings.delivery_limit
    return args


def device_queue(device_id: str, settings: Settings) -> QueueSpec:
    """The command queue of one device, bound to the commands exchange."""
    return QueueSpec(
        names.device_queue(device_id),
        device_queue_arguments(settings),
        names.commands_exchange(),
        names.device_routing_key(device_id),
    )


def results_queue(producer_id: str, settings: Settings) -> QueueSpec:
    """A producer's durable results queue; it expires when unused for a long time.

    Quorum (replicated) when ``settings.queue_type`` is quorum, like the device queues.
    """
    return QueueSpec(
        names.results_queue(producer_id),
        {"x-expires": int(settings.results_queue_expires * 1000), **_replicated(settings)},
        names.results_exchange(),
        names.results_routing_key(producer_id),
    )
