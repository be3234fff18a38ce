"""``fedplan status``: a summary line, then one row per device (filtered, sorted, limited)
from the RabbitMQ management HTTP API."""

from __future__ import annotations

import argparse
import fnmatch
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

    @property
    def backlog(self) -> int:
        """Commands waiting for the device: queued plus delivered and not yet acked."""
        return self.ready + self.unacked


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


@dataclass(frozen=True, slots=True)
class StatusFilter:
    """Which devices ``fedplan status`` lists, in which order, and how many.

    ``state`` is ``"online"``, ``"offline"`` or None (both); ``backlogged`` keeps devices
    with commands waiting; ``patterns`` are shell globs over device ids (any may match);
    ``sort`` is ``"device"`` (by id) or ``"backlog"`` (most waiting first); ``limit`` rows
    at most (0: all).

    Examples
    --------
    >>> rows = [DeviceStatus("a", 0, 0, 1, 0, 0, 0), DeviceStatus("b", 5, 1, 0, 0, 0, 0)]
    >>> [r.device_id for r in StatusFilter(sort="backlog").apply(rows)]
    ['b', 'a']
    >>> [r.device_id for r in StatusFilter(state="online").apply(rows)]
    ['a']
    """

    state: str | None = None
    backlogged: bool = False
    patterns: tuple[str, ...] = ()
    sort: str = "device"
    limit: int = 0

    def __post_init__(self) -> None:
        if self.state not in (None, "online", "offline"):
            raise FedplanError(f"state {self.state!r}: use online, offline or neither")
        if self.sort not in ("device", "backlog"):
            raise FedplanError(f"sort {self.sort!r}: use device or backlog")
        if self.limit < 0:
            raise FedplanError(f"limit {self.limit}: use 0 (all) or more")

    def matches(self, row: DeviceStatus) -> bool:
        if self.state is not None and row.online != (self.state == "online"):
            return False
        if self.backlogged and row.backlog == 0:
            return False
        return not self.patterns or any(
            fnmatch.fnmatchcase(row.device_id, p) for p in self.patterns
        )

    def apply(self, rows: list[DeviceStatus]) -> list[DeviceStatus]:
        """The matching rows, sorted, at most ``limit`` of them."""
        found = [r for r in rows if self.matches(r)]
        if self.sort == "backlog":
            found.sort(key=lambda r: (-r.backlog, r.device_id))
        else:
            found.sort(key=lambda r: r.device_id)
        return found[: self.limit] if self.limit else found


def summary_line(rows: list[DeviceStatus]) -> str:
    """One line over every device: how many, online, backlog, dead letters and refusals.

    Examples
    --------
    >>> rows = [DeviceStatus("a", 3, 1, 1, 0, 0, 2), DeviceStatus("b", 0, 0, 0, 0, 0, 0)]
    >>> print(summary_line(rows))
    2 devices: 1 online, 1 offline; backlog 4 commands on 1 device; 2 dead-lettered
    """
    online = sum(1 for r in rows if r.online)
    backlog = sum(r.backlog for r in rows)
    backlogged = sum(1 for r in rows if r.backlog)
    dead = sum(r.dead_lettered for r in rows)
    line = (
        f"{_n(len(rows), 'device')}: {online} online, {len(rows) - online} offline; "
        f"backlog {_n(backlog, 'command')} on {_n(backlogged, 'device')}; {dead} dead-lettered"
    )
    audited = [r.refused for r in rows if r.refused is not None]
    if audited:
        line += f"; {sum(audited)} policy refusals on {_n(len(audited), 'audited device')}"
    return line


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
        wanted = StatusFilter(
            state="online" if args.online else "offline" if args.offline else None,
            backlogged=args.backlogged,
            patterns=tuple(args.device or ()),
            sort=args.sort,
            limit=args.limit,
        )
        rows = device_statuses(client)
        if args.devices_dir:
            rows = with_refusals(rows, args.devices_dir)
    except FedplanError as e:
        print(e)
        return 1
    if not rows:
        print("no fedplan device queues on this broker")
        return 0
    print(summary_line(rows))
    shown = wanted.apply(rows)
    if shown:
        print(format_table(shown))
    matching = sum(1 for r in rows if wanted.matches(r))
    if matching > len(shown):
        print(f"... {matching - len(shown)} more devices match (--limit 0 shows all)")
    elif not shown:
        print("no device matches the filters")
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
    state = p.add_mutually_exclusive_group()
    state.add_argument("--online", action="store_true", help="only devices with a worker")
    state.add_argument("--offline", action="store_true", help="only devices without a worker")
    p.add_argument("--backlogged", action="store_true", help="only devices with commands waiting")
    p.add_argument("--device", action="append", metavar="GLOB", help="device ids (shell glob)")
    p.add_argument("--sort", choices=("device", "backlog"), default="device")
    p.add_argument("--limit", type=int, default=50, help="rows at most (default 50; 0 for all)")
    p.set_defaults(func=run)
