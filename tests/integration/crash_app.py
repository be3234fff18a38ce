"""The device Celery app, except that running a command carrying a marker kills the worker.

Test-only stand-in for a command that crashes its worker process every time (an op that
exhausts memory or crashes torch): ``os._exit`` inside ``DeviceRuntime.handle_parts``, exactly
where such an op would run. The marker comes from ``FEDPLAN_TEST_CRASH_MARKER``.
"""

from __future__ import annotations

import os
from typing import Any

from consumer.runtime.device import DeviceRuntime
from consumer.worker.celery_app import app

MARKER = os.environ.get("FEDPLAN_TEST_CRASH_MARKER", "").encode()
_handle = DeviceRuntime.handle_parts  # the entry point the task calls (handle() too)


def _crashing_handle(self: DeviceRuntime, data: Any, sender: str = "local", **kw: Any) -> Any:
    if MARKER and MARKER in bytes(data):
        os._exit(70)
    return _handle(self, data, sender, **kw)


DeviceRuntime.handle_parts = _crashing_handle  # type: ignore[method-assign]
celery = app
