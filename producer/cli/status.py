"""``fedplan status``: one row per device from the RabbitMQ management HTTP API."""

from __future__ import annotations

import argparse
import io
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Console, JustifyMethod
from rich.table import Table

from broker_config import names
from broker_config.management import ManagementClient
from broker_config.settings import Settings
from schemas.errors import FedplanError


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """What the broker knows about one device's queue."""

    device_id: str
    ready: int
    unacked: int
    consumers: int
    publish_rate: float
    deliver_rate: float
    dead_lettered: int
    refused: int | None = None
    """Commands the device's policy refused (from its audit log, when readable here)."""

    @property
    def online(self) -> bool:
        """A worker consumes the device's queue."""
        return self.consumers > 0


def _rate(stats: dict[str, Any], key: str) -> float:
    return float((stats.get(f"{key}_details") or {}).get("rate", 0.0))


def dead_lettered_by_queue(client: ManagementClient, *, peek: int = 500) -> Counter[str]:
    """How many messages in the dead-letter queue came from each queue (first ``peek``).

    Messages are read with ``ack_requeue_true``: they stay in the dead-letter queue.
    """
    path = f"queues/{client.vq()}/{client.q(names.dead_letter_queue())}/get"
    found = client.request(
        "POST",
        path,
        {"count": peek, "ackmode": "ack_requeue_true", "encoding": "base64", "truncate": 1},
    )
    counts: Counter[str] = Counter()
    for msg in found or []:
        deaths = ((msg.get("properties") or {}).get("headers") or {}).get("x-death") or []
        if deaths:
            counts[str(deaths[0].get("queue", ""))] += 1
    return counts


def device_statuses(client: ManagementClient) -> list[DeviceStatus]:
    """The status of every ``fedplan.device.*`` queue, sorted by device id.

    Examples
    --------
    >>> client = ManagementClient.from_settings(Settings())  # doctest: +SKIP
    >>> [s.device_id for s in device_statuses(client)]  # doctest: +SKIP
    ['alice', 'bob']
    """
    queues = client.request("GET", f"queues/{client.vq()}") or []
    dead = dead_lettered_by_queue(client)
    rows: list[DeviceStatus] = []
    for q in queues:
        device = names.device_from_queue(str(q.get("name", "")))
        if device is None:
            continue
        stats = q.get("message_stats") or {}
        rows.append(
            DeviceStatus(
                device_id=device,
                ready=int(q.get("messages_ready", 0) or 0),
                unacked=int(q.get("messages_unacknowledged", 0) or 0),
                consumers=int(q.get("consumers", 0) or 0),
                publish_rate=_rate(stats, "publish"),
                deliver_rate=_rate(stats, "deliver_get"),
                dead_lettered=dead.get(str(q["name"]), 0),
            )
        )
    return sorted(rows, key=lambda r: r.device_id)


def format_table(rows: list[DeviceStatus]) -> str:
    """A plain-text table (``rich``), one line per device under a header line.

    Examples
    --------
    >>> print(format_table([DeviceStatus("alice", 3, 1, 1, 2.5, 2.0, 0)]))
    DEVICE  STATE   READY  UNACKED  CONSUMERS  PUB/S  DELIVER/S  DEAD
    alice   online      3        1          1    2.5        2.0     0
    """
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="")
    audited = any(r.refused is not None for r in rows)
    for name, justify in _COLUMNS + ((("REFUSED", "right"),) if audited else ()):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        refused = ("-" if r.refused is None else str(r.refused),) if audited else ()
        table.add_row(
            r.device_id,
            "online" if r.online else "offline",
            str(r.ready),
            str(r.unacked),
            str(r.consumers),
            f"{r.publish_rate:.1f}",
            f"{r.deliver_rate:.1f}",
            str(r.dead_lettered),
            *refused,
        )
    out = io.StringIO()
    Console(file=out, width=10_000, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("DEVICE", "left"), ("STATE", "left"), ("READY", "right"), ("UNACKED", "right"),
    ("CONSUMERS", "right"), ("PUB/S", "right"), ("DELIVER/S", "right"), ("DEAD", "right"),
)  # fmt: skip


def with_refusals(rows: list[DeviceStatus], devices_dir: str) -> list[DeviceStatus]:
    """Add each device's count of policy refusals from ``<devices_dir>/<device>/audit.sqlite3``
    (devices whose data dir is readable from here; others show ``-``)."""
    from dataclasses import replace
    from pathlib import Path

    from consumer.policy.audit import AUDIT_FILE, AuditLog

    out = []
    for r in rows:
        data_dir = Path(devices_dir) / r.device_id
        refused = AuditLog(data_dir).refusals() if (data_dir / AUDIT_FILE).is_file() else None
        out.append(replace(r, refused=refused))
    return out


def run(args: argparse.Namespace) -> int:
    """Entry point of ``fedplan status``."""
    settings = Settings.from_env(broker_url=args.url)
    client = ManagementClient.from_settings(settings, args.api)
    try:
        rows = device_statuses(client)
        if args.devices_dir:
            rows = with_refusals(rows, args.devices_dir)
    except FedplanError as e:
        print(e)
        return 1
    print(format_table(rows) if rows else "no fedplan device queues on this broker")
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedplan status`` to the console script."""
    p = subparsers.add_parser("status", help="per-device queue depth, consumers and rates")
    p.add_argument("--api", default=None, help="management API URL (default from settings)")
    p.add_argument("--url", default=None, help="broker URL for credentials")
    p.add_argument(
        "--devices-dir",
        default=None,
        help="a dir holding the devices' data dirs (<dir>/<device>): adds policy refusals",
    )
    p.set_defaults(func=run)
