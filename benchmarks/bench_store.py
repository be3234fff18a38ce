"""The device store's costs and bounds, in process (no broker): what issue 10/8 measured.

(a) per-command time of a 10-op plan run (+ get of its 1 KiB result) on a ``SqliteStore``
    runtime, stateless and with a state tensor updated in place: the cost of one
    transaction per command (compare with the same script on an older checkout);
(b) RSS growth after storing and reading back 10 x 100 MiB (the in-memory LRU bound);
(c) time to refuse a stored plan of a million ops (``PLAN_TOO_LARGE``).

Run from the repository root:

    .venv/bin/python benchmarks/bench_store.py [--runs 600] [--plan-ops 1000000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from consumer.runtime.device import DeviceRuntime  # noqa: E402
from consumer.store.base import StoredObject  # noqa: E402
from consumer.store.memory import MemoryStore  # noqa: E402
from consumer.store.sqlite import SqliteStore  # noqa: E402
from schemas import command_pb2 as cmd  # noqa: E402
from schemas.ir import ObjectId, Op, PlanIR, Ref  # noqa: E402
from schemas.plan_codec import plan_to_proto  # noqa: E402
from schemas.plan_pb2 import ValueList  # noqa: E402
from schemas.tensor_codec import tensor_to_proto  # noqa: E402
from schemas.value_codec import value_to_proto  # noqa: E402
from schemas.wire import decode_reply, encode_command, new_id  # noqa: E402

MIB = 1024 * 1024


def _plan(stateful: bool) -> PlanIR:
    ops = [
        Op("torch.mul" if i % 2 else "torch.add", (Ref(i), 0.5), {}, Ref(i + 1)) for i in range(10)
    ]
    if not stateful:
        return PlanIR(name="p", inputs=(Ref(0),), ops=ops, outputs=Ref(10), num_slots=11)
    ops.append(Op("Tensor.add_", (Ref(11), Ref(10)), {}, Ref(12)))
    return PlanIR(
        name="p",
        inputs=(Ref(0),),
        ops=ops,
        outputs=Ref(10),
        num_slots=13,
        state={"w": 11},
        state_values={"w": torch.zeros(256)},
    )


def per_command(stateful: bool, runs: int, data_dir: str) -> tuple[float, float, float]:
    """p10, p50, p90 in ms of one run_plan command (results of the last run deleted first)."""
    runtime = DeviceRuntime(device_id="d", store=SqliteStore(data_dir))

    def send(body: str, msg: object, delete: list[str]) -> None:
        command = cmd.Command(command_id=new_id(), device_id="d", delete_first=delete)
        getattr(command, body).CopyFrom(msg)
        reply = decode_reply(runtime.handle(encode_command(command)))
        assert reply.WhichOneof("outcome") == "ok", reply

    send("store_object", cmd.StoreObject(id="x", tensor=tensor_to_proto(torch.randn(256))), [])
    send("store_plan", cmd.StorePlan(plan=plan_to_proto(_plan(stateful), plan_id="p")), [])
    previous: list[str] = []
    times: list[float] = []
    args = ValueList(items=[value_to_proto(ObjectId("x"))])
    for _ in range(runs + 100):
        rid = new_id()
        msg = cmd.RunPlan(plan_id="p", args=args, result_ids=[rid], return_values=True)
        start = time.perf_counter()
        send("run_plan", msg, previous)
        times.append((time.perf_counter() - start) * 1000)
        previous = [rid]
    times = sorted(times[100:])
    return times[len(times) // 10], statistics.median(times), times[len(times) * 9 // 10]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / MIB


def rss_growth(data_dir: str) -> float:
    """MiB of RSS added by storing and reading back 10 x 100 MiB, one unit each."""
    store = SqliteStore(data_dir)
    base = _rss_mib()
    for i in range(10):
        store.begin()
        store.put_object(StoredObject(f"t{i}", torch.full((25 * MIB,), float(i))))
        store.commit()
        gc.collect()
    for i in range(10):
        store.begin()
        assert float(store.get_object(f"t{i}").tensor[0]) == i
        store.commit()
    gc.collect()
    return _rss_mib() - base


def refuse_big_plan(n_ops: int) -> tuple[float, str]:
    """Seconds to answer a StorePlan of ``n_ops`` ops (encoding it is not counted)."""
    ops = [Op("torch.abs", (Ref(i),), {}, Ref(i + 1)) for i in range(n_ops)]
    ir = PlanIR(name="big", inputs=(Ref(0),), ops=ops, outputs=Ref(n_ops), num_slots=n_ops + 1)
    plan = cmd.StorePlan(plan=plan_to_proto(ir, plan_id="big"))
    data = encode_command(cmd.Command(command_id=new_id(), device_id="d", store_plan=plan))
    runtime = DeviceRuntime(device_id="d", store=MemoryStore())
    start = time.perf_counter()
    reply = decode_reply(runtime.handle(data))
    return time.perf_counter() - start, reply.error.code or "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--plan-ops", type=int, default=1_000_000)
    args = parser.parse_args()
    for stateful in (False, True):
        with tempfile.TemporaryDirectory() as data_dir:
            p10, p50, p90 = per_command(stateful, args.runs, data_dir)
        kind = "with in-place state" if stateful else "stateless"
        print(f"(a) 10-op plan run, {kind}: p10 {p10:.3f}  p50 {p50:.3f}  p90 {p90:.3f} ms")
    with tempfile.TemporaryDirectory() as data_dir:
        growth = rss_growth(data_dir)
    print(f"(b) RSS growth after 10 x 100 MiB stored and read: {growth:.0f} MiB")
    seconds, code = refuse_big_plan(args.plan_ops)
    print(f"(c) StorePlan of {args.plan_ops} ops answered {code} in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
