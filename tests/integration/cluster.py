"""Test helpers for a private three-node RabbitMQ cluster (scripts/cluster) and a counter plan.

The cluster runs on its own ports, epmd, cookie and data dir, never the machine's broker.
``CounterRun`` drives a plan whose state counts its executions: the k-th execution on the
device returns exactly ``2k``, so every lost, repeated or wrong execution shows in the replies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import torch

from broker_config.management import ManagementClient
from broker_config.settings import Settings
from producer.transport.amqp import AmqpTransport
from schemas.ir import Op, PlanIR, Ref
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import REPO, Replies, RunVhost

SCRIPT = REPO / "scripts" / "cluster"


def cluster_problem() -> str | None:
    """Why no private cluster can be started here, or None."""
    if shutil.which("rabbitmq-server") is None and not Path("/usr/lib/rabbitmq/bin").is_dir():
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    return None


class Cluster:
    """``scripts/cluster`` with a data dir and ports of its own (default 5691..5693)."""

    def __init__(self, root: Path, *, port: int = 5691, epmd_port: int = 4392) -> None:
        self.root = root
        self.port = port
        self.env = dict(
            os.environ,
            FPCLUSTER_DIR=str(root),
            FPCLUSTER_PORT=str(port),
            FPCLUSTER_EPMD_PORT=str(epmd_port),
        )

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [str(SCRIPT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"scripts/cluster {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout.strip()

    def start(self) -> Cluster:
        self.run("start")
        return self

    def stop(self) -> None:
        self.run("stop", timeout=120)

    def kill_node(self, n: int) -> None:
        self.run("kill-node", str(n))

    def stop_node(self, n: int) -> None:
        self.run("stop-node", str(n))

    def start_node(self, n: int) -> None:
        self.run("start-node", str(n))

    @property
    def urls(self) -> str:
        return self.run("urls")

    def management_url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.port + 10000 + n - 1}/api/"


class ClusterVhost(RunVhost):
    """A vhost of the run's own on the cluster; URLs for every node, API on node ``api_node``."""

    def __init__(self, cluster: Cluster, run_id: str, *, api_node: int = 3) -> None:
        self.name = f"fedplan-test-{run_id}"
        urls = []
        for url in Settings(broker_url=cluster.urls).broker_urls:
            parts = urlsplit(url)
            urls.append(urlunsplit(parts._replace(path="/" + quote(self.name, safe=""))))
        self.url = ";".join(urls)
        self.settings = Settings.from_env(
            broker_url=self.url,
            management_url=cluster.management_url(api_node),
            queue_type="quorum",
        )
        first = ManagementClient.from_urls(urls[0], cluster.management_url(api_node))
        self.admin = ManagementClient(
            api_url=first.api_url, user=first.user, password=first.password
        )
        self.client = first  # this vhost


def counter_plan() -> PlanIR:
    """``x -> w.add_(x) * 2`` with state ``w``: with ``w = 0, x = 1`` the k-th run gives 2k."""
    return PlanIR(
        name="counter",
        inputs=(Ref(0),),
        ops=[
            Op("Tensor.add_", (Ref(1), Ref(0)), {}, Ref(2)),
            Op("torch.mul", (Ref(2), 2.0), {}, Ref(3)),
        ],
        outputs=Ref(3),
        num_slots=4,
        state={"w": 1},
        state_values={"w": torch.zeros(1)},
    )


@dataclass
class Tally:
    """What came back for ``sent`` counter calls."""

    sent: int
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    executions: int = 0
    duplicate_replies: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.lost == self.duplicated == self.wrong == 0


class CounterRun:
    """Counter calls to one device through one transport; ``tally()`` checks every reply."""

    def __init__(self, transport: AmqpTransport, replies: Replies, device: str) -> None:
        self.transport = transport
        self.replies = replies
        self.device = device
        self.plan_id = f"counter-{new_id()[:8]}"
        self.x_id = f"one-{new_id()[:8]}"
        self.cids: list[str] = []
        self.first_reply_at: dict[str, float] = {}

    def setup(self, timeout: float = 120.0) -> None:
        """Store ``x = 1`` and the counter plan on the device (waits for both replies)."""
        self.transport.ensure_device(self.device)
        for make in (
            lambda c: cmd.store_object(c, self.device, self.x_id, torch.ones(1)),
            lambda c: cmd.store_plan(c, self.device, counter_plan(), self.plan_id),
        ):
            cid = new_id()
            self.transport.publish(self.device, make(cid), command_id=cid)
            reply = self.replies.wait(cid, timeout)
            if reply.WhichOneof("outcome") != "ok":
                raise RuntimeError(f"counter setup failed: {reply}")

    def publish(self, n: int) -> list[str]:
        """Publish ``n`` counter calls (each confirmed by the broker); returns their ids."""
        out = []
        for _ in range(n):
            cid = new_id()
            data = cmd.run_plan(cid, self.device, self.plan_id, [self.x_id], [f"r-{cid}"])
            self.transport.publish(self.device, data, command_id=cid)
            out.append(cid)
            self.cids.append(cid)
        return out

    def answered(self) -> int:
        return sum(1 for c in self.cids if self.replies.count(c))

    def wait_all(self, timeout: float) -> bool:
        """Wait until every call has a reply (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answered() == len(self.cids):
                return True
            time.sleep(0.05)
        return self.answered() == len(self.cids)

    def tally(self, timeout: float = 60.0) -> Tally:
        """Check every reply; one more call reads how often the plan ran in total."""
        t = Tally(sent=len(self.cids))
        seen: dict[int, str] = {}
        for cid in self.cids:
            got = self.replies.by_id.get(cid, [])
            if not got:
                t.lost += 1
                continue
            t.duplicate_replies += len(got) - 1
            values = {self._count(r) for r in got}
            if len(values) != 1 or None in values:
                t.wrong += 1
                t.notes.append(f"{cid}: replies {values}")
                continue
            k = values.pop()
            assert k is not None
            if k in seen:
                t.wrong += 1
                t.notes.append(f"{cid} and {seen[k]} both got count {k}")
            seen[k] = cid
        (probe,) = self.publish(1)
        self.cids.pop()
        reply = self.replies.wait(probe, timeout)
        final = self._count(reply)
        t.executions = (final - 1) if final is not None else -1
        t.duplicated = max(0, t.executions - (t.sent - t.lost))
        if final is None:
            t.notes.append(f"the probe call failed: {reply}")
        return t

    @staticmethod
    def _count(reply: object) -> int | None:
        if reply.WhichOneof("outcome") != "ok":  # type: ignore[attr-defined]
            return None
        value = tensor_from_proto(reply.ok.objects[0].value)  # type: ignore[attr-defined]
        k = float(value.item()) / 2
        return int(k) if k == int(k) and k >= 1 else None
