"""``fedplan broker setup``: declare the topology idempotently and create device users."""

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
    to for task events (Flower); run such workers with ``FEDPLAN_WORKER_DECLARES=false``.
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


def run(args: argparse.Namespace) -> int:
    """Entry point of ``fedplan broker setup``."""
    settings = Settings.from_env(broker_url=args.url)
    client = ManagementClient.from_settings(settings, args.api)
    devices: list[str] = list(args.device or [])
    for line in declare_topology(client, settings, devices):
        print(f"declared {line}")
    if args.password is not None:
        if not devices:
            print("--password needs --device ID")
            return 2
        for d in devices:
            print(f"user {create_device_user(client, d, args.password)} ready (least privilege)")
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedplan broker setup`` to the console script."""
    broker = subparsers.add_parser("broker", help="RabbitMQ topology and device users")
    sub = broker.add_subparsers(dest="broker_command", metavar="ACTION")
    p = sub.add_parser("setup", help="declare exchanges and queues, create device users")
    p.add_argument("--url", default=None, help="broker URL (default FEDPLAN_BROKER_URL)")
    p.add_argument("--api", default=None, help="management API URL (default from --url)")
    p.add_argument("--device", action="append", help="a device id (repeatable)")
    p.add_argument("--password", default=None, help="create each device's user with this")
    p.set_defaults(func=run)
