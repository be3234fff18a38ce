"""The device Celery app, except that a command carrying a marker never ends.

Test-only stand-in for an op stuck in native code (where the in-process time budget cannot
interrupt it): SIGALRM is blocked and the pool process sleeps, so only Celery's hard time
limit stops it. The marker comes from ``FEDPLAN_TEST_STALL_MARKER``.
"""

from __future__ import annotations

import os
import signal
import time

from consumer.runtime.device import DeviceRuntime
from consumer.worker.celery_app import app

MARKER = os.environ.get("FEDPLAN_TEST_STALL_MARKER", "").encode()
_handle = DeviceRuntime.handle


def _stalling_handle(self: DeviceRuntime, data: bytes, sender: str = "local") -> bytes:
    if MARKER and MARKER in data:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    return _handle(self, data, sender)


DeviceRuntime.handle = _stalling_handle  # type: ignore[method-assign]
celery = app
