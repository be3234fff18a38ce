"""Pace steering: sample only devices that are online and not backlogged.

Before each round attempt the round runner asks a :class:`LoadProbe` how loaded each
device is: its command backlog (messages waiting or in progress) and whether anything
consumes its commands. On RabbitMQ that is the device queue's ``messages_ready +
messages_unacknowledged`` and ``consumers`` from the management API (what ``fedplan
status`` shows); on the embedded transport, the device thread's inbox and whether the
thread runs. Devices offline or with more than ``max_backlog`` commands waiting are
skipped (recorded with the reason) instead of being sampled and timing out.

Examples
--------
>>> probe = StaticProbe({"a": DeviceLoad("a", 0, 1), "b": DeviceLoad("b", 0, 0)})
>>> PaceSteering(probe).eligible(["a", "b", "c"])
(['a'], {'b': 'offline', 'c': 'unknown to the broker'})
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker_config import names
from schemas.errors import FedplanError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceLoad:
    """A device's command backlog and how many workers consume its commands."""

    device_id: str
    backlog: int
    consumers: int

    @property
    def online(self) -> bool:
        return self.consumers > 0


class LoadProbe(Protocol):
    """Reads the load of devices; a device missing from the answer is unknown."""

    def loads(self, device_ids: Sequence[str]) -> Mapping[str, DeviceLoad]: ...


@dataclass(frozen=True, slots=True)
class StaticProbe:
    """Fixed loads (tests, or a caller that measures load itself)."""

    table: Mapping[str, DeviceLoad]

    def loads(self, device_ids: Sequence[str]) -> Mapping[str, DeviceLoad]:
        return {d: self.table[d] for d in device_ids if d in self.table}


@dataclass(frozen=True, slots=True)
class BrokerProbe:
    """Device queue depth and consumers from the RabbitMQ management API (one GET a call).

    ``client`` is a ``broker_config.management.ManagementClient`` for the fleet's vhost.
    The API's counters lag the broker by its statistics interval (5 s by default).
    """

    client: Any

    def loads(self, device_ids: Sequence[str]) -> Mapping[str, DeviceLoad]:
        wanted = set(device_ids)
        out: dict[str, DeviceLoad] = {}
        for q in self.client.request("GET", f"queues/{self.client.vq()}") or []:
            device = names.device_from_queue(str(q.get("name", "")))
            if device is None or device not in wanted:
                continue
            ready = int(q.get("messages_ready", 0) or 0)
            unacked = int(q.get("messages_unacknowledged", 0) or 0)
            out[device] = DeviceLoad(device, ready + unacked, int(q.get("consumers", 0) or 0))
        return out


@dataclass(frozen=True, slots=True)
class EmbeddedProbe:
    """The embedded transport's equivalent: inbox length, and 1 consumer while its thread runs."""

    transport: Any

    def loads(self, device_ids: Sequence[str]) -> Mapping[str, DeviceLoad]:
        out: dict[str, DeviceLoad] = {}
        for device_id in device_ids:
            pending = self.transport.pending(device_id)
            if pending is not None:
                backlog, running = pending
                out[device_id] = DeviceLoad(device_id, backlog, 1 if running else 0)
        return out


def probe_for(fleet: Any) -> LoadProbe:
    """The load probe matching a fleet's transport (embedded or RabbitMQ).

    Examples
    --------
    >>> import producer as fp
    >>> with fp.connect() as fleet:
    ...     _ = fleet.device("d0")
    ...     probe_for(fleet).loads(["d0"])["d0"].online
    True
    """
    from producer.transport.local import LocalTransport

    transport = fleet.transport
    if isinstance(transport, LocalTransport):
        return EmbeddedProbe(transport)
    from broker_config.management import ManagementClient

    return BrokerProbe(ManagementClient.from_settings(transport.settings))


@dataclass(frozen=True, slots=True)
class PaceSteering:
    """Which devices a round may sample: online, known, at most ``max_backlog`` waiting.

    ``max_backlog`` counts commands already queued for the device (ready or being run);
    the default 1 tolerates one straggler from an earlier round.
    """

    probe: LoadProbe
    max_backlog: int = 1

    def eligible(self, device_ids: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The devices that may be sampled, and why each other one is skipped.

        When the probe itself fails (management API down), every device stays eligible
        and a warning is logged: losing the monitoring must not stop the training.
        """
        try:
            loads = self.probe.loads(device_ids)
        except FedplanError as exc:
            log.warning("pace steering cannot read device loads (%s); sampling all", exc)
            return list(device_ids), {}
        ok: list[str] = []
        skipped: dict[str, str] = {}
        for d in device_ids:
            load = loads.get(d)
            if load is None:
                skipped[d] = "unknown to the broker"
            elif not load.online:
                skipped[d] = "offline"
            elif load.backlog > self.max_backlog:
                skipped[d] = f"backlogged ({load.backlog} commands waiting)"
            else:
                ok.append(d)
        return ok, skipped
