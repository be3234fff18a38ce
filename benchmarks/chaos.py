"""Chaos suite: real faults against real processes; counts lost, duplicated and wrong calls.

Every scenario drives a plan whose state counts its executions (the k-th run on the device
returns exactly 2k, see tests/integration/cluster.py), through the RabbitMQ transport, to a
stock Celery worker, on a three-node cluster of its own (scripts/cluster on ports 5701..5703:
never the machine's broker). Scenarios:

- ``worker-kill``: SIGKILL the device's worker (main and pool process) at random points,
  ``--kills`` times, with calls always in flight; a new worker takes over its data dir.
- ``broker-restart``: ``--calls`` calls in flight, the node every client is connected to is
  stopped and started again.
- ``node-loss``: ``--calls`` calls in flight, that node is SIGKILLed and stays down until
  every call is answered (then it is restarted).
- ``producer-kill``: a producer process publishing ``--calls`` calls is SIGKILLed half-way;
  a new ``fp.connect(url, producer_id=...)`` with the same id gets the calls its journal
  says are in flight through ``fleet.recover()``.

Goal: 0 lost / 0 duplicated / 0 wrong. A duplicated execution is a run of the plan beyond one
per call (the device state shows it); a reply delivered twice for one call is not one.

    .venv/bin/python benchmarks/chaos.py                      # all scenarios, 100 kills
    .venv/bin/python benchmarks/chaos.py --scenario worker-kill --kills 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from producer.transport.amqp import AmqpTransport  # noqa: E402
from tests.integration.broker import Replies, WorkerProcess  # noqa: E402
from tests.integration.cluster import Cluster, ClusterVhost, CounterRun, Tally  # noqa: E402

SCENARIOS = ("worker-kill", "broker-restart", "node-loss", "producer-kill")
QUORUM_ENV = {"FEDPLAN_QUEUE_TYPE": "quorum"}


class TimedReplies(Replies):
    """Replies with the time each one arrived (for recovery times)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_reply(self, data: bytes, *, sender: str | None = None) -> None:
        self.times.append(time.monotonic())
        super().on_reply(data, sender=sender)

    def first_after(self, t: float, timeout: float = 300.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [x for x in list(self.times) if x > t]
            if later:
                return min(later) - t
            time.sleep(0.02)
        return None


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (from /proc), in MiB."""
    total = 0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@dataclass
class Result:
    """One scenario's outcome (printed as a table row)."""

    scenario: str
    tally: Tally | None = None
    recoveries: list[float] = field(default_factory=list)
    producer_rss: tuple[float, float] = (0.0, 0.0)
    worker_rss: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        t = self.tally
        counts = f"{t.sent:>6} {t.lost:>5} {t.duplicated:>5} {t.wrong:>5}" if t else " n/a" * 4
        rec = (
            f"{statistics.median(self.recoveries):6.2f} {max(self.recoveries):6.2f}"
            if self.recoveries
            else "     -      -"
        )
        grow = (
            f"{self.producer_rss[1] - self.producer_rss[0]:+7.1f} "
            f"{self.worker_rss[1] - self.worker_rss[0]:+7.1f}"
        )
        return f"{self.scenario:<15} {counts} {rec} {grow} {self.seconds:7.1f}"


HEADER = (
    f"{'scenario':<15} {'calls':>6} {'lost':>5} {'dup':>5} {'wrong':>5} "
    f"{'rec50':>6} {'recmax':>6} {'prodMiB':>7} {'wrkMiB':>7} {'secs':>7}"
)


class Bench:
    """The cluster, a vhost per scenario, workers and transports (all stopped at the end)."""

    def __init__(self, cluster: Cluster, root: Path) -> None:
        self.cluster = cluster
        self.root = root
        self.workers: list[WorkerProcess] = []

    def vhost(self) -> ClusterVhost:
        return ClusterVhost(self.cluster, secrets.token_hex(4)).create()  # type: ignore[return-value]

    def worker(self, vhost: ClusterVhost, device: str) -> WorkerProcess:
        w = WorkerProcess(device, self.root / vhost.name / device, vhost, QUORUM_ENV)
        self.workers.append(w)
        return w.start().wait_ready(120)

    def transport(self, vhost: ClusterVhost, replies: Replies, pid: str = "") -> AmqpTransport:
        s = vhost.settings.replace(producer_id=pid or f"chaos{secrets.token_hex(4)}")
        return AmqpTransport(on_reply=replies.on_reply, settings=s)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


def _recoveries(faults: list[float], replies: list[float]) -> list[float]:
    out = []
    for i, t in enumerate(faults):
        end = faults[i + 1] if i + 1 < len(faults) else float("inf")
        later = [x for x in replies if t < x < end]
        if later:
            out.append(min(later) - t)
    return out


def _largest_gap(since: float, replies: list[float]) -> float:
    """The longest time without a reply from ``since`` on (the outage a fault caused)."""
    times = [since, *sorted(x for x in replies if x > since)]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def keep_in_flight(run: CounterRun, low: int, batch: int) -> None:
    if len(run.cids) - run.answered() < low:
        run.publish(batch)


def worker_kill(bench: Bench, args: argparse.Namespace) -> Result:
    res = Result("worker-kill")
    vh = bench.vhost()
    replies = TimedReplies()
    transport = bench.transport(vh, replies)
    rng = random.Random(args.seed)
    try:
        worker = bench.worker(vh, "wk")
        run = CounterRun(transport, replies, "wk")
        run.setup()
        res.producer_rss = (rss_mib(os.getpid()), 0.0)
        run.publish(min(args.calls, 200))
        kills: list[float] = []
        for i in range(args.kills):
            keep_in_flight(run, 40, 100)
            # a random point of its life: booting, idle, mid-command, publishing a reply
            time.sleep(rng.uniform(0.0, args.kill_window))
            kills.append(time.monotonic())
            worker.kill()
            worker.start()
            if (i + 1) % 10 == 0:
                print(f"  worker-kill: {i + 1}/{args.kills} kills, {run.answered()} answered")
        worker.wait_ready(120)
        res.recoveries = _recoveries(kills, replies.times)
        res.notes.append(
            f"recovery = kill to the next reply (new worker boot included), for the "
            f"{len(res.recoveries)} kills followed by a reply before the next kill"
        )
        if not run.wait_all(300):
            res.notes.append("some calls unanswered after 300 s")
        res.tally = run.tally()
        res.producer_rss = (res.producer_rss[0], rss_mib(os.getpid()))
    finally:
        transport.close()
        vh.delete()
    return res


def _node_fault(bench: Bench, args: argparse.Namespace, name: str, kill: bool) -> Result:
    res = Result(name)
    vh = bench.vhost()
    replies = TimedReplies()
    transport = bench.transport(vh, replies)
    try:
        worker = bench.worker(vh, "nd")
        run = CounterRun(transport, replies, "nd")
        run.setup()
        assert worker.proc is not None
        res.producer_rss = (rss_mib(os.getpid()), 0.0)
        res.worker_rss = (rss_mib(worker.proc.pid), 0.0)
        run.publish(args.calls)  # all in flight
        deadline = time.monotonic() + 120
        while run.answered() < min(100, args.calls // 4) and time.monotonic() < deadline:
            time.sleep(0.02)
        before = run.answered()
        t_fault = time.monotonic()
        if kill:
            bench.cluster.kill_node(1)
        else:
            bench.cluster.stop_node(1)
            bench.cluster.start_node(1)
        res.notes.append(f"{before} of {args.calls} answered at the fault")
        if not run.wait_all(600):
            res.notes.append("some calls unanswered after 600 s")
        res.recoveries = [_largest_gap(t_fault, replies.times)]
        if kill:
            bench.cluster.start_node(1)
        res.tally = run.tally()
        res.producer_rss = (res.producer_rss[0], rss_mib(os.getpid()))
        res.worker_rss = (res.worker_rss[0], rss_mib(worker.proc.pid))
    finally:
        transport.close()
        vh.delete()
    return res


def broker_restart(bench: Bench, args: argparse.Namespace) -> Result:
    return _node_fault(bench, args, "broker-restart", kill=False)


def node_loss(bench: Bench, args: argparse.Namespace) -> Result:
    return _node_fault(bench, args, "node-loss", kill=True)


def producer_kill(bench: Bench, args: argparse.Namespace) -> Result:
    """A producer (``fp.connect(url, producer_id=...)``) SIGKILLed half-way through
    ``--calls`` calls; a successor with the same id gets the rest through ``fleet.recover()``.
    """
    import producer as fp
    from schemas.command_pb2 import Reply

    res = Result("producer-kill")
    vh = bench.vhost()
    setup_replies = TimedReplies()
    setup_transport = bench.transport(vh, setup_replies)
    sent_file = bench.root / f"sent-{secrets.token_hex(3)}.txt"
    got_file = Path(str(sent_file) + ".replies")
    journal_dir = bench.root / f"journal-{secrets.token_hex(3)}"
    pid = f"chaosp{secrets.token_hex(4)}"
    try:
        bench.worker(vh, "pk")
        run = CounterRun(setup_transport, setup_replies, "pk")
        run.setup()
        spec = {
            "url": vh.url,
            "pid": pid,
            "device": "pk",
            "plan": run.plan_id,
            "x": run.x_id,
            "calls": args.calls,
            "sent": str(sent_file),
            "journal_dir": str(journal_dir),
        }
        child = subprocess.Popen(
            [sys.executable, __file__, "--child-producer", json.dumps(spec)],
            env=dict(os.environ, **QUORUM_ENV),
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            if sent_file.exists() and len(sent_file.read_text().split()) >= args.calls // 2:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        t_kill = time.monotonic()
        confirmed = sent_file.read_text().split()
        # What the killed producer's futures received before the kill: its own to keep.
        replies = TimedReplies()
        for line in got_file.read_text().splitlines() if got_file.exists() else []:
            cid, _, hexdata = line.partition(" ")
            if hexdata:
                replies.by_id[cid].append(Reply.FromString(bytes.fromhex(hexdata)))
        got_before = set(replies.by_id)
        with fp.connect(
            vh.url, producer_id=pid, journal_dir=journal_dir, timeout=120, queue_type="quorum"
        ) as successor:
            recovered = successor.recover()
            never_published = 0
            errors: list[str] = []
            for cid, pending in recovered.items():
                try:
                    reply = pending.result(120)
                except TimeoutError:
                    if cid not in confirmed:
                        never_published += 1  # journaled, killed before the publish
                    continue
                except fp.FedplanError as exc:
                    errors.append(f"{cid}: {exc}")  # tally() counts it as lost (no count)
                    continue
                replies.by_id[cid].append(reply)
                replies.times.append(time.monotonic())
            if replies.times:
                res.recoveries.append(min(replies.times) - t_kill)
        run.replies, run.cids = replies, sorted(set(confirmed) | set(recovered))
        run.cids = [c for c in run.cids if c in replies.by_id or c in confirmed]
        probe = bench.transport(vh, replies)  # tally()'s last call reads the run count
        try:
            run.transport = probe
            res.tally = run.tally()
        finally:
            probe.close()
        res.notes.extend(
            [
                f"fleet.recover(): killed after {len(confirmed)} confirmed calls; "
                f"{len(got_before)} replies reached its futures before the kill, "
                f"{len(recovered)} commands recovered from its journal "
                f"({never_published} journaled but never published, {len(errors)} error "
                "replies)",
                *errors[:5],
            ]
        )
    finally:
        setup_transport.close()
        vh.delete()
    return res


def child_producer(spec_json: str) -> None:
    """The producer that gets SIGKILLed: counter calls through a fleet with a journal."""
    import producer as fp
    from schemas.command_pb2 import RunPlan
    from schemas.ir import ObjectId
    from schemas.plan_pb2 import ValueList
    from schemas.value_codec import value_to_proto
    from schemas.wire import new_id

    spec = json.loads(spec_json)
    got = open(spec["sent"] + ".replies", "a", buffering=1)  # noqa: SIM115
    lock = threading.Lock()

    def note(pending: Any) -> None:
        if pending.exception() is None:
            with lock:
                got.write(f"{pending.command_id} {pending.result().SerializeToString().hex()}\n")

    fleet = fp.connect(spec["url"], producer_id=spec["pid"], journal_dir=spec["journal_dir"])
    args = ValueList(items=[value_to_proto(ObjectId(spec["x"]))])
    with open(spec["sent"], "a", buffering=1) as sent:
        for _ in range(spec["calls"]):
            rid = f"r-{new_id()}"
            msg = RunPlan(plan_id=spec["plan"], args=args, result_ids=[rid], return_values=True)
            pending = fleet.submit(spec["device"], "run_plan", msg, (rid,))
            pending.add_done_callback(note)
            sent.write(pending.command_id + "\n")
    fleet.close()


RUNNERS: dict[str, Callable[[Bench, argparse.Namespace], Result]] = {
    "worker-kill": worker_kill,
    "broker-restart": broker_restart,
    "node-loss": node_loss,
    "producer-kill": producer_kill,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    p.add_argument("--kills", type=int, default=100, help="worker SIGKILLs (worker-kill)")
    p.add_argument("--calls", type=int, default=1000, help="calls in flight per node fault")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kill-window", type=float, default=8.0, help="a kill comes 0..N s after the last"
    )
    p.add_argument("--port", type=int, default=5701, help="the cluster's first AMQP port")
    p.add_argument("--child-producer", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_producer:
        child_producer(args.child_producer)
        return 0
    root = Path(tempfile.mkdtemp(prefix="fedplan-chaos-"))
    cluster = Cluster(root / "cluster", port=args.port, epmd_port=4393)
    print(f"chaos: starting a 3-node cluster on {args.port}..{args.port + 2}", flush=True)
    started = time.monotonic()
    cluster.start()
    print(f"chaos: cluster up in {time.monotonic() - started:.0f}s", flush=True)
    bench = Bench(cluster, root)
    results: list[Result] = []
    try:
        names = SCENARIOS if args.scenario == "all" else (args.scenario,)
        for name in names:
            print(f"chaos: {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                r = RUNNERS[name](bench, args)
            except Exception as exc:  # a scenario that breaks is reported, the rest go on
                r = Result(name, notes=[f"FAILED: {exc!r}"])
            r.seconds = time.monotonic() - t0
            results.append(r)
            print(HEADER + "\n" + r.row(), flush=True)
    finally:
        bench.stop()
        cluster.stop()
    print("\n" + HEADER)
    for r in results:
        print(r.row())
    for r in results:
        for note in r.notes + (r.tally.notes[:5] if r.tally else []):
            print(f"  {r.scenario}: {note}")
    clean = all(r.tally is not None and r.tally.clean for r in results)
    print(f"\nchaos: {'0/0/0 in every scenario' if clean else 'NOT clean: see above'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
