"""The device Celery app with an address-space data limit on its pool processes.

Test-only: ``FEDPLAN_TEST_DATA_LIMIT`` bytes of data (``RLIMIT_DATA``, which counts the
anonymous mappings big tensors live in) more than the pool process uses at its start, so a
plan that allocates a huge tensor meets the limit instead of the machine's memory.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from celery import signals

from consumer.worker.celery_app import app

LIMIT = int(os.environ.get("FEDPLAN_TEST_DATA_LIMIT", "0"))


def _data_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


@signals.worker_process_init.connect(weak=False)
def _limit(**_: Any) -> None:
    if LIMIT > 0:
        cap = _data_bytes() + LIMIT
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


celery = app
