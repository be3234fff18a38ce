"""Fresh randomness for every command a device runs: torch's generator reseeded from the OS.

Random ops in a plan (``torch.rand``, ``torch.randn_like``... — the Poisson sample and the
Gaussian noise of a DP-SGD plan, ``producer/fl/dpsgd.py``) draw from torch's global CPU
generator in the pool process. Left alone, that generator is a liability for privacy: a
prefork child starts from its parent's generator state, so a child that replaces a killed
or recycled one draws the same numbers again (two updates with the same noise: their
difference cancels it), and a plan that returns raw draws would let the server learn the
state and predict the noise of the next command. Reseeding before each command from
``os.urandom`` (64 bits) makes every command's draws unpredictable to the server and
independent of everything it saw before (``docs/dp_sgd.md`` §3).

Only the CPU generator is seeded (plans run on the CPU). ``torch.manual_seed`` would also
queue a lazy seed for every accelerator backend torch was built with (CUDA, XPU, MTIA),
each recording a ``traceback.format_stack()``: 0.3-0.7 ms a command, more than the rest of
a small plan's run (docs/performance.md). An accelerator that is already initialised in
the process is seeded too.

Examples
--------
>>> import torch
>>> reseed_from_os(); a = torch.rand(4)
>>> reseed_from_os(); b = torch.rand(4)
>>> torch.equal(a, b)
False
"""

from __future__ import annotations

import os
from typing import Any

import torch


def reseed_from_os(*_: Any, **__: Any) -> None:
    """Seed torch's global CPU generator with 64 bits from ``os.urandom`` (a Celery
    ``task_prerun`` handler: every argument is ignored)."""
    seed = int.from_bytes(os.urandom(8), "little")
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():  # never initialises CUDA itself
        torch.cuda.manual_seed_all(seed)
