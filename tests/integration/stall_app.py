"""The device Celery app, except that a command carrying a marker never ends.

Test-only stand-in for an op stuck in native code (where the in-process time budget cannot
interrupt it): SIGALRM is blocked and the pool process sleeps, so only Celery's hard time
limit stops it. The marker comes from ``FEDPLAN_TEST_STALL_MARKER``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from consumer.runtime.device import DeviceRuntime
from consumer.worker.celery_app import app

MARKER = os.environ.get("FEDPLAN_TEST_STALL_MARKER", "").encode()
_handle = DeviceRuntime.handle_parts  # the entry point the task calls (handle() too)


def _stalling_handle(self: DeviceRuntime, data: Any, sender: str = "local", **kw: Any) -> Any:
    if MARKER and MARKER in bytes(data):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    return _handle(self, data, sender, **kw)


DeviceRuntime.handle_parts = _stalling_handle  # type: ignore[method-assign]
celery = app
