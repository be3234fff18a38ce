"""A producer process for the recovery test: sets up, then leaves calls in flight and waits.

Usage: ``python tests/integration/killed_producer.py URL PRODUCER_ID JOURNAL_DIR``. It
stores a plan and an input on device ``alice``, prints ``READY``, waits for a line on stdin,
publishes a plan call (a tensor and a plain Python output), a call that fails on the device
and a get of a missing object, prints their ids as JSON and waits to be killed.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import producer as fp
from schemas.command_pb2 import GetObject

X = torch.tensor([1.0, -2.0, 3.0, -4.0])


@fp.func2plan(args_shape=[(-1,)])
def double_abs_and_len(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return torch.abs(x) * 2, x.shape[0]


def main(url: str, producer_id: str, journal_dir: str) -> None:
    fleet = fp.connect(url, producer_id=producer_id, journal_dir=journal_dir, timeout=120)
    alice = fleet.device("alice")
    plan_ptr = double_abs_and_len.send(alice)
    x_ptr = fp.send(X, alice).wait()
    bad_ptr = fp.send(torch.ones(2, 2), alice).wait()
    print("READY", flush=True)
    sys.stdin.readline()  # the worker is stopped now: replies cannot come before the kill
    y_ptr, n_ptr = plan_ptr(x_ptr)
    failing = plan_ptr(bad_ptr)
    missing = fleet.submit(
        "alice", "get_object", GetObject(id="no-such-object"), ("no-such-object",)
    )
    ids = {
        "tensor": y_ptr.id,
        "value": n_ptr.id,
        "failing": failing[0].id,
        "missing_command": missing.command_id,
    }
    print(json.dumps(ids), flush=True)
    time.sleep(120)  # SIGKILLed long before this


if __name__ == "__main__":
    main(*sys.argv[1:4])
