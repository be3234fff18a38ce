"""A multi-device worker process for integration tests: one Celery worker, several devices."""

from __future__ import annotations

import time
from pathlib import Path

from broker_config import names
from consumer.worker.cli import devices_env, worker_argv
from tests.integration.broker import RunVhost, WorkerProcess


class MultiWorkerProcess(WorkerProcess):
    """``fedplan worker --devices-dir DIR --device a --device b``: device ``d`` keeps its data
    in ``DIR/d``; one process, one broker connection, ``concurrency`` pool processes."""

    def __init__(
        self,
        devices: list[str],
        devices_dir: Path,
        vhost: RunVhost,
        env: dict[str, str] | None = None,
        *,
        app: str = "consumer",
        concurrency: int = 2,
    ) -> None:
        super().__init__(f"devices-{devices[0]}", devices_dir, vhost, env, app=app)
        self.devices = list(devices)
        self.concurrency = concurrency
        self.log_path = devices_dir.parent / f"worker-{'-'.join(devices)[:60]}.log"

    def data_dir_of(self, device: str) -> Path:
        return self.data_dir / device

    def _worker_env(self) -> dict[str, str]:
        return devices_env(self.data_dir, self.vhost.url)

    def _worker_argv(self) -> list[str]:
        for d in self.devices:
            self.data_dir_of(d).mkdir(parents=True, exist_ok=True)
        return worker_argv(self.devices, loglevel="info", concurrency=self.concurrency)

    def wait_ready(self, timeout: float = 90.0) -> MultiWorkerProcess:
        """Wait until every device queue has this worker as a consumer."""
        deadline = time.monotonic() + timeout
        waiting = set(self.devices)
        while time.monotonic() < deadline and waiting:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.devices} exited:\n{self.log_tail()}")
            for d in sorted(waiting):
                try:
                    if int(str(self.vhost.queue(names.device_queue(d)).get("consumers", 0))):
                        waiting.discard(d)
                except Exception:
                    pass
            time.sleep(0.2)
        if waiting:
            raise AssertionError(f"worker not consuming {sorted(waiting)}:\n{self.log_tail()}")
        return self
