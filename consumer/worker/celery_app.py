"""The Celery app of a device worker: ``celery -A consumer worker -Q fedplan.device.<id>``."""

from __future__ import annotations

import logging
import logging.handlers
from typing import Any

from celery import Celery, signals
from celery.app.amqp import AMQP, Queues
from celery.worker.consumer import Consumer
from kombu import Exchange, Queue

from broker_config import names, topology
from broker_config.envelope import CONTENT_TYPE
from broker_config.settings import Settings
from consumer.worker import frames
from consumer.worker.chunks import collect_expired
from consumer.worker.devices import data_dirs
from consumer.worker.entropy import reseed_from_os
from consumer.worker.gate import Gate, GatedConsumer
from consumer.worker.memory import limit_pool_process
from consumer.worker.serialization import register_content_type

log = logging.getLogger(__name__)


class _DeviceQueues(Queues):
    """Queues named on ``-Q`` are declared with fedplan's arguments and binding.

    A stock worker would otherwise declare ``fedplan.device.<id>`` with Celery's defaults,
    which RabbitMQ refuses (PRECONDITION_FAILED) when ``fedplan broker setup`` or the producer
    declared it first with dead-lettering and a length limit.
    """

    settings: Settings = Settings()

    def new_missing(self, name: str) -> Queue:
        device = names.device_from_queue(name)
        if device is None:
            return super().new_missing(name)
        spec = topology.device_queue(device, self.settings)
        return Queue(
            spec.name,
            Exchange(spec.exchange, type="direct", durable=True),
            spec.routing_key,
            queue_arguments=spec.arguments,
            durable=True,
            no_declare=not self.settings.worker_declares,
        )


class _DeviceAMQP(AMQP):
    queues_cls = _DeviceQueues
    Consumer = GatedConsumer  # what TaskConsumer builds: the gate sees every delivery first


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Worker start (main process): rotate the log file, drop expired chunked transfers."""
    s = GatedConsumer.gate.settings if GatedConsumer.gate is not None else Settings.from_env()
    if s.log_file is not None:
        s.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            s.log_file, maxBytes=s.log_max_bytes, backupCount=s.log_backups
        )
        handler.setFormatter(
            logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
        )
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    for data_dir in data_dirs(s):  # every device this worker serves
        try:
            collect_expired(s.replace(data_dir=data_dir))
        except Exception:
            log.exception("collecting expired chunked transfers in %s failed", data_dir)


def _on_process_init(**_: Any) -> None:
    """A pool process starts: its memory limit (:mod:`consumer.worker.memory`)."""
    s = GatedConsumer.gate.settings if GatedConsumer.gate is not None else Settings.from_env()
    try:
        limit_pool_process(s.pool_memory_limit)
    except (OSError, ValueError):
        log.exception("setting the pool process's memory limit failed")


class DeviceConsumer(Consumer):
    """Celery's consumer without native delayed delivery (fedplan sends no eta/countdown).

    On quorum queues that step declares 28 ``celery_delayed_*`` quorum queues, and on every
    reconnect it retries each failover URL for about 9 s, so a worker whose first cluster
    node is down would come back that much later.
    """

    class Blueprint(Consumer.Blueprint):
        default_steps = [
            s for s in Consumer.Blueprint.default_steps if not s.endswith(":DelayedDelivery")
        ]


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for fedplan devices.

    Late acks (a command is acked only after its reply was confirmed by the broker),
    prefetch 1, requeue when the pool process dies, task events only with
    ``settings.task_events`` (for Flower), and every delivery
    checked by the gate (:mod:`consumer.worker.gate`) before Celery reads it: only the
    fedplan envelope is served, anything else is refused to the dead-letter queue. The soft
    time limit is enforced in the pool process (:mod:`consumer.worker.limits`); Celery
    keeps only the hard limit, and a failed or timed-out task is dead-lettered, not acked.
    The prefork pool runs commands in a child process so the main process keeps answering
    broker heartbeats during long plans; ``FEDPLAN_POOL_MEMORY_LIMIT`` caps its memory
    (:mod:`consumer.worker.memory`).

    Examples
    --------
    >>> app = make_app(Settings())
    >>> app.conf.task_acks_late, app.conf.worker_prefetch_multiplier
    (True, 1)
    """
    s = settings or Settings.from_env()
    register_content_type()
    frames.install()  # py-amqp must not raise on a hostile delivery before the gate sees it
    _DeviceQueues.settings = s
    GatedConsumer.gate = Gate(s)
    app = Celery("fedplan", broker=s.broker_url, set_as_current=False, amqp=_DeviceAMQP)
    app.conf.update(
        accept_content=[CONTENT_TYPE],
        result_accept_content=[CONTENT_TYPE],
        task_serializer="json",  # only Celery control messages (Flower); commands are raw
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        task_soft_time_limit=None,  # enforced in the pool process: no timer per task
        task_time_limit=s.time_limit,
        worker_send_task_events=s.task_events,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        task_create_missing_queues=True,
        broker_heartbeat=s.heartbeat,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_consumer="consumer.worker.celery_app:DeviceConsumer",
    )
    app.conf.fedplan_settings = s
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="fedplan-worker-init")
    signals.worker_process_init.connect(
        _on_process_init, weak=False, dispatch_uid="fedplan-process-init"
    )
    # fresh randomness per command: a forked child must not replay its parent's draws
    signals.task_prerun.connect(reseed_from_os, weak=False, dispatch_uid="fedplan-reseed")
    app.autodiscover_tasks(["consumer.worker"], related_name="tasks", force=True)
    return app


app = make_app()
celery = app
