"""The Celery app of a device worker: ``celery -A consumer worker -Q fedplan.device.<id>``."""

from __future__ import annotations

from celery import Celery
from celery.app.amqp import AMQP, Queues
from celery.worker.consumer import Consumer
from kombu import Exchange, Queue

from broker_config import names, topology
from broker_config.envelope import CONTENT_TYPE
from broker_config.settings import Settings
from consumer.worker.serialization import register_content_type


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
    prefetch 1, soft/hard time limits, requeue when the pool process dies, task events on,
    and only the fedplan protobuf content type accepted (pickle or JSON task messages are
    rejected to the dead-letter queue). The prefork pool runs commands in a child process so
    the main process keeps answering broker heartbeats during long plans.

    Examples
    --------
    >>> app = make_app(Settings())
    >>> app.conf.task_acks_late, app.conf.worker_prefetch_multiplier
    (True, 1)
    """
    s = settings or Settings.from_env()
    register_content_type()
    _DeviceQueues.settings = s
    app = Celery("fedplan", broker=s.broker_url, set_as_current=False, amqp=_DeviceAMQP)
    app.conf.update(
        accept_content=[CONTENT_TYPE],
        result_accept_content=[CONTENT_TYPE],
        task_serializer="json",  # only Celery control messages (Flower); commands are raw
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        task_soft_time_limit=s.soft_time_limit,
        task_time_limit=s.time_limit,
        worker_send_task_events=True,
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
    app.autodiscover_tasks(["consumer.worker"], related_name="tasks", force=True)
    return app


app = make_app()
celery = app
