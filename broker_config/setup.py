"""``fedplan broker setup``: declare the topology idempotently; create device and producer
users with least privilege."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from broker_config import names, topology
from broker_config.management import ManagementClient
from broker_config.settings import Settings

CELERY_EVENT_EXCHANGE = "celeryev"


def device_permissions(device_id: str) -> dict[str, str]:
    """Least privilege for a device: read its own queue, write the results exchange only.

    No fedplan queue or exchange may be configured (declared or deleted) and the default
    exchange is not writable, so a device can neither read another device's commands nor
    publish into a producer's results queue except through the results exchange. The one
    exception is Celery's event exchange (``celeryev``), which a worker declares and writes
    to for task events (Flower, with ``FEDPLAN_TASK_EVENTS=true``); run such workers with
    ``FEDPLAN_WORKER_DECLARES=false``.
    """
    events = re.escape(CELERY_EVENT_EXCHANGE)
    return {
        "configure": f"^{events}$",
        "write": f"^({re.escape(names.results_exchange())}|{events})$",
        "read": f"^{re.escape(names.device_queue(device_id))}$",
    }


def declare_topology(
    client: ManagementClient, settings: Settings, devices: Sequence[str] = ()
) -> list[str]:
    """Declare exchanges, the dead-letter queue and device queues; returns what was declared.

    Idempotent: declaring again with the same arguments changes nothing.
    """
    done: list[str] = []
    v = client.vq()
    for ex in topology.exchanges():
        client.request(
            "PUT",
            f"exchanges/{v}/{client.q(ex.name)}",
            {"type": ex.type, "durable": True, "auto_delete": False},
        )
        done.append(f"exchange {ex.name}")
    queues = [topology.dead_letter_queue(settings)]
    queues += [topology.device_queue(d, settings) for d in devices]
    for spec in queues:
        _declare_queue(client, spec)
        done.append(f"queue {spec.name}")
    return done


def _declare_queue(client: ManagementClient, spec: topology.QueueSpec) -> None:
    v = client.vq()
    client.request(
        "PUT",
        f"queues/{v}/{client.q(spec.name)}",
        {"durable": True, "auto_delete": False, "arguments": spec.arguments},
    )
    client.request(
        "POST",
        f"bindings/{v}/e/{client.q(spec.exchange)}/q/{client.q(spec.name)}",
        {"routing_key": spec.routing_key, "arguments": {}},
    )


def create_device_user(client: ManagementClient, device_id: str, password: str) -> str:
    """Create (or update) the device's user with :func:`device_permissions`; returns its name."""
    user = names.device_user(device_id)
    client.request("PUT", f"users/{client.q(user)}", {"password": password, "tags": ""})
    client.request(
        "PUT", f"permissions/{client.vq()}/{client.q(user)}", device_permissions(device_id)
    )
    return user


def gateway_user(gateway_id: str) -> str:
    """The RabbitMQ user of a multi-device worker (``fedplan broker setup --gateway``).

    Examples
    --------
    >>> gateway_user("lab")
    'fedplan-gateway-lab'
    """
    return f"{names.PREFIX}-gateway-{names.check_id('gateway', gateway_id)}"


def gateway_permissions(devices: Sequence[str]) -> dict[str, str]:
    """Least privilege for a worker serving ``devices`` on one connection: read exactly
    those devices' queues, write the results exchange (and Celery's event exchange).

    One AMQP connection authenticates one user, and the broker stamps that user on every
    reply it publishes, so a multi-device worker cannot speak as each device's own user:
    it is one gateway user holding several devices' queues (docs/fleet.md). Producers
    accept its replies when it is in ``FEDPLAN_TRUSTED_REPLY_USERS``.

    Examples
    --------
    >>> read = gateway_permissions(["a", "b"])["read"]
    >>> [bool(re.match(read, names.device_queue(d))) for d in ("a", "b", "c")]
    [True, True, False]
    """
    if not devices:
        raise ValueError("a gateway needs at least one device")
    events = re.escape(CELERY_EVENT_EXCHANGE)
    queues = "|".join(re.escape(names.device_queue(d)) for d in devices)
    return {
        "configure": f"^{events}$",
        "write": f"^({re.escape(names.results_exchange())}|{events})$",
        "read": f"^({queues})$",
    }


def create_gateway_user(
    client: ManagementClient, gateway_id: str, devices: Sequence[str], password: str
) -> str:
    """Create (or update) a gateway's user with :func:`gateway_permissions`."""
    user = gateway_user(gateway_id)
    client.request("PUT", f"users/{client.q(user)}", {"password": password, "tags": ""})
    client.request(
        "PUT", f"permissions/{client.vq()}/{client.q(user)}", gateway_permissions(devices)
    )
    return user


def producer_user(producer_id: str) -> str:
    """The RabbitMQ user name created for a producer by ``fedplan broker setup --producer``."""
    return f"{names.PREFIX}-producer-{names.check_id('producer', producer_id)}"


def producer_permissions(producer_id: str) -> dict[str, str]:
    """Least privilege for a producer: declare, bind and read its own results queue only,
    publish to the commands exchange only (never the results exchange, the default exchange
    or another producer's queue).

    The commands exchange routes by device (a direct exchange), which RabbitMQ permissions
    cannot restrict by routing key: which producers a device serves is the device's policy
    (``fedplan device policy --allow fedplan-producer-<id>``), enforced with the sender the
    broker validates (``user_id``). Connect it with ``FEDPLAN_PRODUCER_DECLARES=false``.
    """
    results = re.escape(names.results_queue(producer_id))
    return {
        "configure": f"^{results}$",
        "write": f"^({re.escape(names.commands_exchange())}|{results})$",
        "read": f"^({re.escape(names.results_exchange())}|{results})$",
    }


def producer_topic_permissions(producer_id: str) -> dict[str, str]:
    """The routing keys a producer may use on the (topic) results exchange: it binds its
    results queue with its own key only (never another producer's, nor ``#``), so it
    cannot receive copies of another producer's replies; it publishes there with none.

    Examples
    --------
    >>> print(producer_topic_permissions("p1")["read"])
    ^fedplan\\.results\\.p1$
    """
    return {
        "exchange": names.results_exchange(),
        "write": "^$",
        "read": f"^{re.escape(names.results_routing_key(producer_id))}$",
    }


def create_producer_user(client: ManagementClient, producer_id: str, password: str) -> str:
    """Create (or update) the producer's user with :func:`producer_permissions` and
    :func:`producer_topic_permissions`."""
    user = producer_user(producer_id)
    client.request("PUT", f"users/{client.q(user)}", {"password": password, "tags": ""})
    client.request(
        "PUT", f"permissions/{client.vq()}/{client.q(user)}", producer_permissions(producer_id)
    )
    client.request(
        "PUT",
        f"topic-permissions/{client.vq()}/{client.q(user)}",
        producer_topic_permissions(producer_id),
    )
    return user


def run(args: argparse.Namespace) -> int:
    """Entry point of ``fedplan broker setup``."""
    settings = Settings.from_env(broker_url=args.url)
    client = ManagementClient.from_settings(settings, args.api)
    devices: list[str] = list(args.device or [])
    for line in declare_topology(client, settings, devices):
        print(f"declared {line}")
    producers: list[str] = list(args.producer or [])
    if args.gateway is not None:
        if args.password is None or not devices:
            print("--gateway needs --password and the gateway's --device IDs")
            return 2
        user = create_gateway_user(client, args.gateway, devices, args.password)
        print(
            f"user {user} ready (reads the queues of {len(devices)} devices); run "
            f"`fedplan worker --devices-dir DIR` with it and FEDPLAN_WORKER_DECLARES=false, "
            f"and add it to the producers' FEDPLAN_TRUSTED_REPLY_USERS"
        )
        return 0
    if args.password is not None:
        if not devices and not producers:
            print("--password needs --device ID or --producer ID")
            return 2
        for d in devices:
            print(f"user {create_device_user(client, d, args.password)} ready (least privilege)")
        for p in producers:
            user = create_producer_user(client, p, args.password)
            print(
                f"user {user} ready (least privilege: its results queue, the commands "
                f"exchange); connect with producer_id={p!r} and FEDPLAN_PRODUCER_DECLARES=false"
            )
    elif producers:
        print("--producer needs --password")
        return 2
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedplan broker setup`` to the console script."""
    broker = subparsers.add_parser("broker", help="RabbitMQ topology and device users")
    sub = broker.add_subparsers(dest="broker_command", metavar="ACTION")
    p = sub.add_parser("setup", help="declare exchanges and queues, create device users")
    p.add_argument("--url", default=None, help="broker URL (default FEDPLAN_BROKER_URL)")
    p.add_argument("--api", default=None, help="management API URL (default from --url)")
    p.add_argument("--device", action="append", help="a device id (repeatable)")
    p.add_argument("--producer", action="append", help="a producer id to create a user for")
    p.add_argument(
        "--password", default=None, help="create each device's and producer's user with this"
    )
    p.add_argument(
        "--gateway",
        default=None,
        metavar="ID",
        help="with --password: one user for a multi-device worker reading the --device queues",
    )
    p.set_defaults(func=run)
