"""Every RabbitMQ queue, exchange and routing-key name fedplan uses, one function each."""

from __future__ import annotations

import re

from schemas.errors import FedplanError

PREFIX = "fedplan"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe name part (letters, digits, ``_ . -``), else raise.

    Examples
    --------
    >>> check_id("device", "alice")
    'alice'
    """
    if not _ID.match(value):
        raise FedplanError(
            f"{kind} id {value!r} is not usable in a queue name: use 1-128 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        )
    return value


def commands_exchange() -> str:
    """The direct exchange the producer publishes commands to."""
    return f"{PREFIX}.commands"


def results_exchange() -> str:
    """The topic exchange devices publish replies to.

    A topic exchange so that RabbitMQ's topic permissions can limit the routing key a
    producer user may bind its results queue with to its own (``fedplan broker setup``):
    on a direct exchange a producer could bind its queue with another producer's key and
    receive copies of that producer's replies. (Named ``replies``: the ``results`` exchange
    of older fedplan was a direct exchange, and RabbitMQ refuses to redeclare a type.)
    """
    return f"{PREFIX}.replies"


def dead_letter_exchange() -> str:
    """The fanout exchange rejected or expired commands are dead-lettered to."""
    return f"{PREFIX}.dlx"


def dead_letter_queue() -> str:
    """The queue holding every dead-lettered command, for inspection."""
    return f"{PREFIX}.dead"


def device_queue(device_id: str) -> str:
    """The durable command queue of one device (what ``celery worker -Q`` consumes)."""
    return f"{PREFIX}.device.{check_id('device', device_id)}"


def device_routing_key(device_id: str) -> str:
    """The routing key binding a device's queue to the commands exchange."""
    return device_queue(device_id)


def device_from_queue(queue: str) -> str | None:
    """The device id of a device queue name, or None for any other queue."""
    head = f"{PREFIX}.device."
    return queue[len(head) :] if queue.startswith(head) else None


def results_queue(producer_id: str) -> str:
    """The durable results queue of one producer (its ``reply_to``)."""
    return f"{PREFIX}.results.{check_id('producer', producer_id)}"


def results_routing_key(producer_id: str) -> str:
    """The routing key binding a producer's results queue to the results exchange."""
    return results_queue(producer_id)


def device_user(device_id: str) -> str:
    """The RabbitMQ user name created for a device by ``fedplan broker setup``."""
    return f"{PREFIX}-device-{check_id('device', device_id)}"


TASK_NAME = "fedplan.handle"
"""The Celery task name every command message carries in its ``task`` header."""
