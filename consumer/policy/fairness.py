"""Fairness between producers on one device: a command rate and a share of device time.

A device serves its queue in order, one command at a time. A producer that publishes a
flood of commands would make every other producer's commands wait behind all of them. Two
budgets of the policy bound that, each a bucket per producer, refilled at its rate:

- ``max_commands_per_minute``: a bucket of that many commands; a command that finds its
  sender's bucket empty is refused (a flood of cheap commands);
- ``max_device_seconds_per_minute``: a bucket of that many seconds of the device's time;
  each command's run time is taken from its sender's bucket after it ran (it may go into
  debt), and a command whose sender's bucket is empty or in debt is refused until the
  refill pays the debt off (a flood of slow commands).

A refused command is not run: the device answers it with a typed ``PolicyError`` naming the
rule and when to try again, which costs a reply, not a run. So another producer's command
behind a flood waits for about one bucket of the flooder's commands (or device seconds)
plus one refusal per remaining flood command.

Where it is checked: on a Celery device in the gate, in the worker's main process, before
the command reaches the pool (:mod:`consumer.worker.gate`: a command's run time is its own,
from when a pool process accepted it to when its message was settled, kept per delivery
tag, so commands running side by side on a ``--concurrency`` > 1 worker are each charged
exactly their own time); on an embedded device
before the runtime runs the command (:class:`~consumer.runtime.device.DeviceRuntime`). One
chunked command counts once (its first chunk); redeliveries do not count again.

Example
-------
>>> now = [0.0]
>>> shares = ProducerBudgets(clock=lambda: now[0])
>>> [shares.take_command("p1", 2) for _ in range(3)]
[None, None, 30.0]
>>> shares.device_time_wait("p1", 6) is None     # 6 s of device time a minute
True
>>> shares.charge_device_time("p1", 9.0, 6)      # a 9 s command: 3 s in debt
>>> shares.device_time_wait("p1", 6)             # refilled at 0.1 s a second
30.0
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from schemas.errors import PolicyError

MAX_SENDERS = 4096
"""Buckets kept per budget; past it, buckets that are full again (idle senders) go."""


class _Buckets:
    """Token buckets per sender: ``capacity`` tokens, refilled at ``capacity`` a minute."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}  # sender -> (tokens, when)

    def level(self, sender: str, capacity: float) -> float:
        now = self._clock()
        tokens, when = self._state.get(sender, (capacity, now))
        tokens = min(capacity, tokens + (now - when) * capacity / 60.0)
        self._state[sender] = (tokens, now)
        return tokens

    def spend(self, sender: str, capacity: float, amount: float) -> None:
        tokens = self.level(sender, capacity)
        self._state[sender] = (tokens - amount, self._clock())
        if len(self._state) > MAX_SENDERS:
            for other in list(self._state):
                if other != sender and self.level(other, capacity) >= capacity:
                    del self._state[other]


class ProducerBudgets:
    """Both fairness buckets of one device (thread-safe); see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._commands = _Buckets(clock)
        self._seconds = _Buckets(clock)
        self._lock = threading.Lock()

    def take_command(self, sender: str, per_minute: int) -> float | None:
        """Take one command from ``sender``'s bucket: ``None`` when admitted, else the
        seconds until one would be (``per_minute`` 0: always admitted)."""
        if per_minute <= 0:
            return None
        with self._lock:
            tokens = self._commands.level(sender, per_minute)
            if tokens >= 1.0:
                self._commands.spend(sender, per_minute, 1.0)
                return None
            return (1.0 - tokens) * 60.0 / per_minute

    def device_time_wait(self, sender: str, seconds_per_minute: int) -> float | None:
        """``None`` when ``sender`` has device time left, else the seconds until it has."""
        if seconds_per_minute <= 0:
            return None
        with self._lock:
            tokens = self._seconds.level(sender, seconds_per_minute)
        if tokens > 0:
            return None
        return -tokens * 60.0 / seconds_per_minute

    def charge_device_time(self, sender: str, seconds: float, seconds_per_minute: int) -> None:
        """Take the run time of one of ``sender``'s commands from its bucket."""
        if seconds_per_minute <= 0 or seconds <= 0:
            return
        with self._lock:
            self._seconds.spend(sender, seconds_per_minute, seconds)

    def refusal(
        self,
        sender: str,
        *,
        commands_per_minute: int,
        seconds_per_minute: int,
        device_id: str,
        count: bool = True,
    ) -> PolicyError | None:
        """The typed refusal of ``sender``'s next command, or ``None`` to run it (taking one
        command from its bucket when ``count``)."""
        wait = self.device_time_wait(sender, seconds_per_minute)
        if wait is not None:
            return _refused(
                sender,
                device_id,
                f"used more than {seconds_per_minute} s of the device's time a minute",
                "max_device_seconds_per_minute",
                wait,
            )
        wait = self.take_command(sender, commands_per_minute) if count else None
        if wait is not None:
            return _refused(
                sender,
                device_id,
                f"sent more than {commands_per_minute} commands a minute",
                "max_commands_per_minute",
                wait,
            )
        return None


def _refused(sender: str, device_id: str, what: str, rule: str, wait: float) -> PolicyError:
    return PolicyError(
        f"producer {sender!r} {what} on device {device_id!r}; this command was not run "
        f"(rule: budgets.{rule}). Send it again in {wait:.1f} s, or fewer at a time",
        device_id=device_id or None,
    )


__all__ = ["ProducerBudgets"]
