"""One command run by two processes at once on one data dir (a redelivery while the first
run is still under way, e.g. a pool process outliving its killed worker): it runs once.

The reply cache is read before the command's unit takes the store's write lock; the second
process must look again once it holds the lock, or it runs the command a second time.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch

from consumer.runtime.device import DeviceRuntime
from consumer.store.sqlite import SqliteStore
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import decode_reply
from tests.integration import commands as cmd
from tests.unit.test_store_disk_full import _counter, _run


def _slow_run(data_dir: str, started: Any, out: Any) -> None:
    """Run c1, holding its unit open (the write lock taken) for a while before commit."""
    store = SqliteStore(data_dir)
    real_put_reply = store.put_reply

    def slow_put_reply(*args: Any) -> None:
        real_put_reply(*args)  # the unit holds the write lock from here to its commit
        started.set()
        time.sleep(1.5)

    store.put_reply = slow_put_reply  # type: ignore[method-assign]
    reply = decode_reply(DeviceRuntime(device_id="alice", store=store).handle(_run("c1")))
    out.put(float(tensor_from_proto(reply.ok.objects[0].value).item()))


def test_a_command_redelivered_while_its_first_run_is_under_way_runs_once(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path)
    runtime = DeviceRuntime(device_id="alice", store=store)
    for data in (
        cmd.store_object("c-x", "alice", "x", torch.ones(1)),
        cmd.store_plan("c-p", "alice", _counter(), "p"),
    ):
        assert decode_reply(runtime.handle(data)).WhichOneof("outcome") == "ok"
    ctx = mp.get_context("fork")
    started, out = ctx.Event(), ctx.Queue()
    first = ctx.Process(target=_slow_run, args=(str(tmp_path), started, out))
    first.start()
    try:
        assert started.wait(60)  # the first run holds the lock; its reply is not committed
        ran: list[str] = []
        dispatch = runtime._dispatch
        runtime._dispatch = lambda *a: ran.append(a[0]) or dispatch(*a)  # type: ignore[method-assign]
        again = decode_reply(runtime.handle(_run("c1")))  # a store opened before it began
        assert out.get(timeout=60) == 2.0
    finally:
        first.join(60)
    assert ran == []  # answered from the first run's reply, not run again
    assert float(tensor_from_proto(again.ok.objects[0].value).item()) == 2.0  # the same reply
    probe = DeviceRuntime(device_id="alice", store=SqliteStore(tmp_path)).handle(_run("c2"))
    assert float(tensor_from_proto(decode_reply(probe).ok.objects[0].value).item()) == 4.0
