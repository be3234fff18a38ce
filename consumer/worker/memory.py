"""Memory limits of a device worker's pool process, so a command cannot take the machine's.

Two limits, both ``RLIMIT_DATA`` (which counts the anonymous mappings tensors live in):

- ``FEDPLAN_POOL_MEMORY_LIMIT`` (:func:`limit_pool_process`): set once in every pool process
  at its start, that many bytes above what the process uses then. Hard: a command cannot
  raise it.
- the policy's ``max_alloc_bytes`` (:func:`command_memory`): for the duration of one
  command, the soft limit is lowered to what the process uses before it, plus the budget,
  plus :data:`SLACK` for what a command needs beside its tensors; restored afterwards.

An allocation past either fails inside the op (``MemoryError``, or torch's "can't allocate
memory"); the runtime answers it as a typed ``MEMORY_LIMIT`` error and the worker serves on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

try:
    import resource
except ImportError:  # not on this platform: the limits are not applied
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SLACK = 256 * 1024 * 1024
"""Bytes a command may use beside its budgeted tensors (Python objects, decoding, torch's
scratch memory) under the per-command limit."""


def data_bytes() -> int:
    """The process's data segment now (``VmData``: heap and anonymous mappings), in bytes."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def limit_pool_process(extra_bytes: int) -> int | None:
    """Cap this process's data at its current size plus ``extra_bytes`` (soft and hard);
    returns the cap, or None when ``extra_bytes`` is 0 or the platform has no rlimits.

    Examples
    --------
    >>> limit_pool_process(0) is None
    True
    """
    if extra_bytes <= 0 or resource is None:
        return None
    cap = data_bytes() + extra_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    log.info(
        "pool process %d may use %d bytes of data (FEDPLAN_POOL_MEMORY_LIMIT)", os.getpid(), cap
    )
    return cap


@contextmanager
def command_memory(budget_bytes: int) -> Iterator[None]:
    """Lower the data limit to what the process uses now + ``budget_bytes`` + ``SLACK``
    for the ``with`` block (a tighter limit already in force stays); 0 does nothing.

    Examples
    --------
    >>> with command_memory(0):
    ...     pass
    """
    if budget_bytes <= 0 or resource is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    want = data_bytes() + budget_bytes + SLACK
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft <= want:
        yield
        return
    resource.setrlimit(resource.RLIMIT_DATA, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


__all__ = ["SLACK", "command_memory", "data_bytes", "limit_pool_process"]
