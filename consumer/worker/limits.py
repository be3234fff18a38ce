"""Time limits of a device worker without Celery's per-task timers piling up.

Celery keeps a timer entry per task in the main process's heap until it falls due, even
after the task finished and the entry was cancelled (600 s with the default soft limit:
~0.5 KiB a call). So the soft limit is enforced in the pool process itself
(:func:`time_budget`, SIGALRM, a typed ``TIME_LIMIT`` error reply), Celery keeps only the
hard limit as a backstop, and cancelled entries are dropped from the heap as each task
ends (:func:`purge_cancelled_timers`).
"""

from __future__ import annotations

import heapq
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from schemas.errors import TimeLimitError

log = logging.getLogger(__name__)


@contextmanager
def time_budget(
    seconds: float, hint: str = "raise FEDPLAN_SOFT_TIME_LIMIT on the device"
) -> Iterator[None]:
    """Raise :class:`TimeLimitError` in this (main) thread after ``seconds``.

    Outside the main thread (where signals cannot be used) it does nothing; the hard time
    limit of the worker still applies.

    Examples
    --------
    >>> with time_budget(5.0):
    ...     pass
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeLimitError(
            f"the command ran longer than the device's time limit of {seconds:g} s and was "
            f"stopped; make it smaller or {hint}"
        )

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def purge_cancelled_timers(timer: Any) -> int:
    """Drop cancelled entries from a kombu timer's heap; returns how many went.

    Examples
    --------
    >>> from kombu.asynchronous.timer import Timer
    >>> t = Timer(); tref = t.call_after(600, print); tref.cancel()
    >>> purge_cancelled_timers(t), len(t)
    (1, 0)
    """
    queue = getattr(timer, "_queue", None)
    if not isinstance(queue, list) or not queue:
        return 0
    kept = [e for e in queue if not getattr(getattr(e, "entry", None), "canceled", False)]
    removed = len(queue) - len(kept)
    if removed:
        queue[:] = kept
        heapq.heapify(queue)
    return removed
