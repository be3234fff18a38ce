"""Fairness between producers on one device: a command rate per producer.

A device serves its queue in order, one command at a time. A producer that publishes a
flood of slow commands would make every other producer's commands wait behind all of them.
The policy's ``max_commands_per_minute`` budget bounds that: each producer has a bucket of
that many commands, refilled at that rate; a command that finds its sender's bucket empty
is refused at once, unrun, with a typed ``PolicyError`` naming the rule
(``budgets.max_commands_per_minute``) and when to try again. A refusal costs the device a
reply, not a run, so another producer's command behind the flood waits for at most one
bucket of the flooder's commands.

Where it is checked: on a Celery device in the gate, in the worker's main process, before
the command reaches the pool (:mod:`consumer.worker.gate`); on an embedded device before
the runtime runs the command (:class:`~consumer.runtime.device.DeviceRuntime`). One chunked
command counts once (its first chunk); redeliveries do not count again.

Example
-------
>>> rates = CommandRates(clock=lambda: 0.0)
>>> [rates.take("p1", 2) for _ in range(3)]
[None, None, 30.0]
>>> rates.take("p2", 2) is None
True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from schemas.errors import PolicyError

MAX_SENDERS = 4096
"""Buckets kept; past it, buckets that are full again (idle senders) are forgotten."""


class CommandRates:
    """Token buckets per sender (thread-safe); see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, sender: str, per_minute: int) -> float | None:
        """Take one command from ``sender``'s bucket: ``None`` when admitted, else the
        seconds until the next one would be (``per_minute`` 0: always admitted)."""
        if per_minute <= 0:
            return None
        now = self._clock()
        rate = per_minute / 60.0
        with self._lock:
            tokens, when = self._buckets.get(sender, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - when) * rate)
            if tokens >= 1.0:
                self._buckets[sender] = (tokens - 1.0, now)
                self._prune(now, rate, per_minute)
                return None
            self._buckets[sender] = (tokens, now)
            return (1.0 - tokens) / rate

    def _prune(self, now: float, rate: float, capacity: int) -> None:
        if len(self._buckets) <= MAX_SENDERS:
            return
        for sender, (tokens, when) in list(self._buckets.items()):
            if tokens + (now - when) * rate >= capacity:
                del self._buckets[sender]

    def refusal(self, sender: str, per_minute: int, device_id: str) -> PolicyError | None:
        """:meth:`take`, as the typed refusal a device answers with (``None``: admitted)."""
        wait = self.take(sender, per_minute)
        if wait is None:
            return None
        return PolicyError(
            f"producer {sender!r} sent more than {per_minute} commands a minute to device "
            f"{device_id!r}; this one was not run (rule: budgets.max_commands_per_minute). "
            f"Send it again in {wait:.1f} s or fewer at a time",
            device_id=device_id or None,
        )


__all__ = ["CommandRates"]
