"""Helpers for tests against a real RabbitMQ: a vhost per run, worker processes, replies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

from broker_config import names
from broker_config.management import ManagementClient
from broker_config.settings import Settings
from consumer.worker.cli import worker_argv, worker_env
from producer.transport.amqp import AmqpTransport
from schemas.command_pb2 import Reply
from schemas.wire import decode_reply

REPO = Path(__file__).resolve().parents[2]


class RunVhost:
    """A vhost of its own for one test run: names never collide on a shared broker."""

    def __init__(self, run_id: str) -> None:
        self.name = f"fedplan-test-{run_id}"
        base = Settings.from_env()
        self.admin = ManagementClient.from_settings(base)
        parts = urlsplit(base.broker_url)
        self.url = urlunsplit(parts._replace(path="/" + quote(self.name, safe="")))
        self.settings = base.replace(broker_url=self.url)
        self.client = ManagementClient(
            api_url=self.admin.api_url,
            user=self.admin.user,
            password=self.admin.password,
            vhost=self.name,
        )

    def create(self) -> RunVhost:
        q = self.admin.q
        self.admin.request("PUT", f"vhosts/{q(self.name)}", {})
        self.admin.request(
            "PUT",
            f"permissions/{q(self.name)}/{q(self.admin.user)}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        return self

    def delete(self) -> None:
        self.admin.request("DELETE", f"vhosts/{self.admin.q(self.name)}")

    def queue(self, name: str) -> dict[str, object]:
        return dict(self.client.request("GET", f"queues/{self.client.vq()}/{self.client.q(name)}"))

    def wait_queue(self, name: str, *, timeout: float = 30.0, **expect: int) -> dict[str, object]:
        """Poll the management API until the queue's counters equal ``expect``."""
        deadline = time.monotonic() + timeout
        info: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                info = self.queue(name)
            except Exception:
                info = {}
            if info and all(info.get(k) == v for k, v in expect.items()):
                return info
            time.sleep(0.2)
        raise AssertionError(f"queue {name} never reached {expect}; last seen {info}")

    def close_connections(self, connection_name: str) -> int:
        """Close (from the broker side) the connections of this vhost with that name."""
        closed = 0
        for c in self.admin.request("GET", f"vhosts/{self.admin.q(self.name)}/connections"):
            props = c.get("client_properties") or {}
            if props.get("connection_name") == connection_name:
                self.admin.request("DELETE", f"connections/{self.admin.q(c['name'])}")
                closed += 1
        return closed


class WorkerProcess:
    """A stock ``celery -A consumer worker`` serving one device, in its own process group."""

    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        vhost: RunVhost,
        env: dict[str, str] | None = None,
        *,
        app: str = "consumer",
        repo: Path = REPO,
    ) -> None:
        self.device_id = device_id
        self.app = app
        self.repo = repo  # the checkout whose code the worker runs (benchmarks: another one)
        self.env = dict(env or {})
        self.data_dir = data_dir
        self.vhost = vhost
        self.log_path = data_dir.parent / f"worker-{device_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _worker_env(self) -> dict[str, str]:
        """The environment of the worker before this test's own variables."""
        return worker_env(self.device_id, self.data_dir, self.vhost.url)

    def _worker_argv(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return worker_argv(self.device_id, loglevel="info")

    def start(self, *, extra_env: dict[str, str] | None = None) -> Self:
        env = self._worker_env()
        env.update(self.env)
        env.update(extra_env or {})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.repo), env.get("PYTHONPATH")]))
        argv = self._worker_argv()
        argv[argv.index("-A") + 1] = self.app
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=self.repo,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Wait until the worker consumes its queue (or fail with its log)."""
        deadline = time.monotonic() + timeout
        queue = names.device_queue(self.device_id)
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.device_id} exited:\n{self.log_tail()}")
            try:
                if int(str(self.vhost.queue(queue).get("consumers", 0))) > 0:
                    return self
            except Exception:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker {self.device_id} not ready:\n{self.log_tail()}")

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the worker's log mentions ``text`` (e.g. a task id it received)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise AssertionError(f"worker {self.device_id} never logged {text!r}:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


class Replies:
    """Collects decoded replies by command id (what a transport's ``on_reply`` feeds)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.by_id: dict[str, list[Reply]] = defaultdict(list)

    def on_reply(self, data: bytes, *, sender: str | None = None) -> None:
        reply = decode_reply(data)
        if sender is not None:
            assert sender == reply.device_id, (sender, reply.device_id)
        with self._cond:
            self.by_id[reply.command_id].append(reply)
            self._cond.notify_all()

    def wait(self, command_id: str, timeout: float = 60.0) -> Reply:
        with self._cond:
            if not self._cond.wait_for(lambda: self.by_id.get(command_id), timeout):
                raise TimeoutError(f"no reply for command {command_id} within {timeout}s")
            return self.by_id[command_id][0]

    def count(self, command_id: str) -> int:
        with self._cond:
            return len(self.by_id.get(command_id, []))


def producer_transport(
    vhost: RunVhost, producer: tuple[str, str, str], replies: Replies
) -> AmqpTransport:
    """A transport of the ``producer`` fixture's user (it trusts the session's worker replies)."""
    pid, _user, url = producer
    settings = vhost.settings.replace(
        broker_url=url,
        producer_id=pid,
        producer_declares=False,
        trusted_reply_users=vhost.admin.user,  # the worker answers as the session's user
    )
    return AmqpTransport(on_reply=replies.on_reply, settings=settings)
