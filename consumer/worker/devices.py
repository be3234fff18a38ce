"""Which device a delivery is for, and where that device keeps its data.

A worker serves one device (``FEDPLAN_DEVICE_ID``, its data in ``data_dir``) or many
(``FEDPLAN_DEVICES_DIR``: device ``<id>`` in ``<devices_dir>/<id>``). Either way the device
of a delivery is the device of the **queue** it was consumed from: the broker names the
consumer in every ``basic.deliver`` (its consumer tag), and the worker knows which queue it
opened each consumer on. Nothing the sender controls (headers, routing key, body) decides
which device's store, policy and audit a command reaches.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from broker_config import names
from broker_config.settings import Settings
from schemas.errors import DeviceError, FedplanError

DEVICE_HEADER = "fedplan_device"
"""Set by the gate only (a sender's value is dropped): the device of the delivery's queue."""

SENDER_HEADER = "fedplan_sender"
"""Set by the gate only: who sent the command, from the AMQP ``user_id`` property (which the
broker checked is the publishing connection's user); the task runs the command for it."""


def single_device() -> str | None:
    """The device of a one-device worker (``FEDPLAN_DEVICE_ID``), None for a multi-device one."""
    return os.environ.get("FEDPLAN_DEVICE_ID") or None


def device_settings(settings: Settings, device_id: str) -> Settings:
    """The settings one device of this worker runs with: its own ``data_dir``.

    Examples
    --------
    >>> s = Settings(devices_dir=Path("/srv/devices"))
    >>> str(device_settings(s, "alice").data_dir)
    '/srv/devices/alice'
    >>> str(device_settings(Settings(data_dir=Path("d")), "alice").data_dir)
    'd'
    """
    if settings.devices_dir is None:
        return settings
    return _per_device(settings, device_id)


@functools.lru_cache(maxsize=4096)
def _per_device(settings: Settings, device_id: str) -> Settings:
    root = Path(settings.devices_dir or ".")
    return settings.replace(data_dir=root / names.check_id("device", device_id))


def devices_in(devices_dir: str | os.PathLike[str]) -> list[str]:
    """The devices of a devices dir: its subdirectories whose names are device ids, sorted.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); (d / "b").mkdir(); (d / "a").mkdir(); (d / ".x").mkdir()
    >>> devices_in(d)
    ['a', 'b']
    """
    found = []
    for entry in sorted(Path(devices_dir).iterdir()):
        if entry.is_dir():
            try:
                found.append(names.check_id("device", entry.name))
            except FedplanError:
                continue
    return found


def data_dirs(settings: Settings) -> list[Path]:
    """Every device data dir this worker keeps (one, or each device dir's subdirectory)."""
    if settings.devices_dir is None:
        return [Path(settings.data_dir)]
    return [Path(settings.devices_dir) / d for d in devices_in(settings.devices_dir)]


def queue_of(consumer: Any, delivery_info: Any) -> str | None:
    """The queue a kombu ``consumer`` received a delivery from, by the broker's consumer tag."""
    tag = (delivery_info or {}).get("consumer_tag") if isinstance(delivery_info, dict) else None
    active = getattr(consumer, "_active_tags", None) or {}
    if tag is None:
        return None
    for queue, queue_tag in active.items():
        if queue_tag == tag:
            return str(queue)
    return None


def device_of(queue: str | None) -> str:
    """The device a delivery from ``queue`` is for; raises ``DeviceError`` when unknowable.

    A one-device worker's device is its ``FEDPLAN_DEVICE_ID``; a delivery from another
    device's queue is refused rather than run against the wrong store.
    """
    from_queue = names.device_from_queue(queue) if queue else None
    fixed = single_device()
    if fixed is not None:
        if from_queue is not None and from_queue != fixed:
            raise DeviceError(
                f"a delivery from queue {queue!r} reached the worker of device {fixed!r}"
            )
        return fixed
    if from_queue is None:
        raise DeviceError(f"the delivery's queue {queue!r} is not a fedplan device queue")
    return names.check_id("device", from_queue)


def worker_queues(devices: Iterable[str]) -> str:
    """The ``-Q`` argument of a worker serving ``devices``.

    Examples
    --------
    >>> worker_queues(["a", "b"])
    'fedplan.device.a,fedplan.device.b'
    """
    return ",".join(names.device_queue(d) for d in devices)
