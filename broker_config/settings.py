"""Validated, frozen fedplan broker settings; the only place that reads FEDPLAN_* variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from schemas.errors import FedplanError

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:15672/api/"
MIB = 1024 * 1024

# Environment variable -> field name. Every FEDPLAN_* variable fedplan reads is listed here.
ENV_VARS: dict[str, str] = {
    "FEDPLAN_BROKER_URL": "broker_url",
    "FEDPLAN_MANAGEMENT_URL": "management_url",
    "FEDPLAN_DATA_DIR": "data_dir",
    "FEDPLAN_DEVICES_DIR": "devices_dir",
    "FEDPLAN_PRODUCER_ID": "producer_id",
    "FEDPLAN_SOFT_TIME_LIMIT": "soft_time_limit",
    "FEDPLAN_TIME_LIMIT": "time_limit",
    "FEDPLAN_MAX_MESSAGE_SIZE": "max_message_size",
    "FEDPLAN_QUEUE_MAX_LENGTH": "queue_max_length",
    "FEDPLAN_QUEUE_TYPE": "queue_type",
    "FEDPLAN_DELIVERY_LIMIT": "delivery_limit",
    "FEDPLAN_RESULTS_QUEUE_EXPIRES": "results_queue_expires",
    "FEDPLAN_CONFIRM_TIMEOUT": "confirm_timeout",
    "FEDPLAN_RECONNECT_MAX_DELAY": "reconnect_max_delay",
    "FEDPLAN_HEARTBEAT": "heartbeat",
    "FEDPLAN_WORKER_DECLARES": "worker_declares",
    "FEDPLAN_PRODUCER_DECLARES": "producer_declares",
    "FEDPLAN_MAX_COMMAND_SIZE": "max_command_size",
    "FEDPLAN_CHUNK_TTL": "chunk_ttl",
    "FEDPLAN_MAX_PENDING_CHUNK_BYTES": "max_pending_chunk_bytes",
    "FEDPLAN_DEAD_LETTER_MAX_LENGTH": "dead_letter_max_length",
    "FEDPLAN_DEAD_LETTER_TTL": "dead_letter_ttl",
    "FEDPLAN_LOG_FILE": "log_file",
    "FEDPLAN_LOG_MAX_BYTES": "log_max_bytes",
    "FEDPLAN_LOG_BACKUPS": "log_backups",
    "FEDPLAN_MAX_REPLY_SIZE": "max_reply_size",
    "FEDPLAN_REPLY_TRANSFER_TTL": "reply_transfer_ttl",
    "FEDPLAN_UNCLAIMED_REPLY_TTL": "unclaimed_reply_ttl",
    "FEDPLAN_JOURNAL_DIR": "journal_dir",
    "FEDPLAN_TRUSTED_REPLY_USERS": "trusted_reply_users",
    "FEDPLAN_STORE_MAX_BYTES": "store_max_bytes",
    "FEDPLAN_STORE_MAX_REPLY_BYTES": "store_max_reply_bytes",
    "FEDPLAN_STORE_MAX_REPLIES": "store_max_replies",
    "FEDPLAN_STORE_REPLY_TTL": "store_reply_ttl",
    "FEDPLAN_STORE_CACHE_BYTES": "store_cache_bytes",
    "FEDPLAN_MAX_PLAN_OPS": "max_plan_ops",
    "FEDPLAN_MAX_PLAN_BYTES": "max_plan_bytes",
    "FEDPLAN_MAX_LOOP_STEPS": "max_loop_steps",
    "FEDPLAN_TORCH_THREADS": "torch_threads",
    "FEDPLAN_TASK_EVENTS": "task_events",
    "FEDPLAN_POOL_MEMORY_LIMIT": "pool_memory_limit",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Broker, worker and transport settings (seconds, bytes); build with :meth:`from_env`.

    Examples
    --------
    >>> s = Settings.from_env({"FEDPLAN_MAX_MESSAGE_SIZE": "1048576"})
    >>> s.max_message_size, s.broker_url
    (1048576, 'amqp://guest:guest@127.0.0.1:5672/')
    """

    broker_url: str = DEFAULT_BROKER_URL
    """One AMQP URL, or several separated by ``;`` (kombu's failover form) for a cluster:
    producers and workers connect to the first that answers and fail over in turn."""
    management_url: str = DEFAULT_MANAGEMENT_URL
    data_dir: Path = Path("fedplan-data")
    devices_dir: Path | None = None
    """A multi-device worker (``fedplan worker --devices-dir``): device ``<id>`` keeps its
    store, policy, audit and delivery counts in ``<devices_dir>/<id>`` (``data_dir`` unused)."""
    producer_id: str | None = None
    soft_time_limit: float = 600.0
    time_limit: float = 660.0
    max_message_size: int = 16 * MIB
    queue_max_length: int = 100_000
    queue_type: str = "classic"
    delivery_limit: int = 5
    """Deliveries of one command before it is refused: a quorum queue's x-delivery-limit, and
    on classic queues the worker's own count (an error reply, then the dead-letter queue)."""
    results_queue_expires: float = 7 * 24 * 3600.0
    confirm_timeout: float = 60.0
    reconnect_max_delay: float = 10.0
    heartbeat: int = 60
    worker_declares: bool = True
    """False for workers under a least-privilege device user: the queue exists already."""
    producer_declares: bool = True
    """False for a producer under a least-privilege producer user (``fedplan broker setup
    --producer``): it declares only its own results queue; exchanges and device queues must
    exist (a command for a device without a queue raises ``DeviceNotFound``)."""
    max_command_size: int = 1024 * MIB
    """Largest command a device assembles from chunks; bigger chunk counts are refused unread."""
    chunk_ttl: float = 3600.0
    """Seconds an incomplete chunked transfer is kept after its last chunk (then deleted)."""
    max_pending_chunk_bytes: int = 2048 * MIB
    """Bytes of incomplete transfers a device keeps on disk; chunks beyond it are refused."""
    dead_letter_max_length: int = 10_000
    """Messages the dead-letter queue keeps (the oldest are dropped first)."""
    dead_letter_ttl: float = 7 * 24 * 3600.0
    """Seconds a dead-lettered message is kept."""
    log_file: Path | None = None
    """The worker's log file, rotated at ``log_max_bytes`` (None: log to stderr only)."""
    log_max_bytes: int = 10 * MIB
    log_backups: int = 5
    max_reply_size: int = 1024 * MIB
    """Largest reply (all chunks) the producer assembles; incomplete replies hold at most
    twice this in memory, the oldest dropped first."""
    reply_transfer_ttl: float = 600.0
    """Seconds an incomplete chunked reply waits for its next chunk before it is dropped."""
    unclaimed_reply_ttl: float = 24 * 3600.0
    """Seconds a reply to a command this producer is not waiting for is kept (in the journal
    when there is one) for a later ``expect``/``recover`` to claim; then it is dropped."""
    journal_dir: Path = Path("fedplan-journal")
    """Where a producer with a fixed ``producer_id`` keeps its in-flight journal (SQLite)."""
    trusted_reply_users: str = ""
    """Comma-separated broker users, besides the producer's own, whose replies are accepted
    for any device (workers sharing one user); ``fedplan-device-<id>`` users need no entry:
    they may answer only their own device's commands. Replies from other users are dropped."""
    store_max_bytes: int = 8 * 1024 * MIB
    """Device store bound: bytes of stored tensors, plan state and cached replies together.
    A command that would go over it gets a ``STORE_FULL`` error reply and changes nothing."""
    store_max_reply_bytes: int = 1024 * MIB
    """Bytes of cached replies (kept so a redelivered command is answered, not run again);
    the oldest are dropped first. One reply larger than this is refused (``STORE_FULL``)."""
    store_max_replies: int = 10_000
    """Cached replies by count; the oldest are dropped first."""
    store_reply_ttl: float = 7 * 24 * 3600.0
    """Seconds a cached reply is kept: an unclaimed reply of a dead producer expires then
    (default: as long as an idle results queue lives, after which it could not be delivered)."""
    store_cache_bytes: int = 512 * MIB
    """Bytes of stored tensors a worker keeps in memory (least recently used are dropped and
    read from disk again; tensors that require grad stay, their autograd identity matters)."""
    max_plan_ops: int = 100_000
    """Ops in one stored plan; a larger plan is refused on receipt (``PLAN_TOO_LARGE``)."""
    max_plan_bytes: int = 256 * MIB
    """Encoded size of one stored plan with its state; larger is refused (``PLAN_TOO_LARGE``)."""
    max_loop_steps: int = 100_000
    """Steps (epochs times batches) one call of a plan's training loop may run; a call asking
    for more is refused before its first step (``LOOP_LIMIT``)."""
    torch_threads: int = 1
    """torch intra-op threads of a worker's pool process (0: torch's default, one per core).
    One by default: a machine runs several device workers, and a device's plans are small;
    every worker splitting each op over all cores made them fight for the CPUs."""
    task_events: bool = False
    """Whether workers publish Celery task events (what Flower monitors). Off by default:
    the worker's main process published three event messages per command on the critical
    path of every call (docs/performance.md); ``FEDPLAN_TASK_EVENTS=true`` for Flower."""
    pool_memory_limit: int = 0
    """Bytes of memory (``RLIMIT_DATA``) a worker's pool process may use beyond what it uses
    when it starts; a command that needs more fails with ``MEMORY_LIMIT`` and the worker
    serves on. 0: no limit but the machine's (and the policy's ``max_alloc_bytes``)."""

    def __post_init__(self) -> None:
        urls = self.broker_url.split(";")
        if any(urlsplit(u.strip()).scheme not in ("amqp", "amqps") for u in urls):
            _bad("broker_url", self.broker_url, "amqp:// or amqps:// URLs separated by ';'")
        if urlsplit(self.management_url).scheme not in ("http", "https"):
            _bad("management_url", self.management_url, "an http:// or https:// URL")
        if self.queue_type not in ("classic", "quorum"):
            _bad("queue_type", self.queue_type, "'classic' or 'quorum'")
        for name in (
            "soft_time_limit",
            "time_limit",
            "results_queue_expires",
            "confirm_timeout",
            "reconnect_max_delay",
            "chunk_ttl",
            "dead_letter_ttl",
            "reply_transfer_ttl",
            "unclaimed_reply_ttl",
            "store_reply_ttl",
        ):
            if not getattr(self, name) > 0:
                _bad(name, getattr(self, name), "a positive number of seconds")
        if self.time_limit <= self.soft_time_limit:
            _bad("time_limit", self.time_limit, "larger than soft_time_limit")
        if self.max_message_size < 4096:
            _bad("max_message_size", self.max_message_size, "at least 4096 bytes")
        if self.max_command_size < self.max_message_size:
            _bad("max_command_size", self.max_command_size, "at least max_message_size")
        if self.max_pending_chunk_bytes < self.max_command_size:
            _bad(
                "max_pending_chunk_bytes", self.max_pending_chunk_bytes, "at least max_command_size"
            )
        for name in (
            "queue_max_length",
            "delivery_limit",
            "dead_letter_max_length",
            "log_max_bytes",
            "log_backups",
        ):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "a positive integer")
        if self.max_reply_size < self.max_message_size:
            _bad("max_reply_size", self.max_reply_size, "at least max_message_size")
        for name in (
            "queue_max_length",
            "delivery_limit",
            "store_max_bytes",
            "store_max_reply_bytes",
            "store_max_replies",
            "max_plan_ops",
            "max_plan_bytes",
            "max_loop_steps",
        ):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "a positive integer")
        if self.pool_memory_limit < 0:
            _bad("pool_memory_limit", self.pool_memory_limit, "0 (no limit) or more bytes")
        if self.store_cache_bytes < 0:
            _bad("store_cache_bytes", self.store_cache_bytes, "0 (no cache) or more bytes")
        if self.torch_threads < 0:
            _bad("torch_threads", self.torch_threads, "0 (torch's default) or a thread count")
        if self.heartbeat < 0:
            _bad("heartbeat", self.heartbeat, "0 (off) or a positive number of seconds")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``FEDPLAN_*`` variables (default ``os.environ``), then ``overrides``.

        Overrides set to None are ignored, so CLI options can be passed through as they are.
        """
        env = os.environ if environ is None else environ
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for var, name in ENV_VARS.items():
            if var in env and env[var] != "":
                values[name] = _convert(name, str(types[name]), env[var])
        for name, value in overrides.items():
            if name not in types:
                raise FedplanError(f"unknown setting {name!r}; known: {', '.join(types)}")
            if value is not None:
                values[name] = value
        for name in ("data_dir", "devices_dir", "journal_dir", "log_file"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """The broker URLs to try in turn (``broker_url`` split at ``;``).

        >>> Settings(broker_url="amqp://h:5681/;amqp://h:5682/").broker_urls
        ('amqp://h:5681/', 'amqp://h:5682/')
        """
        return tuple(u.strip() for u in self.broker_url.split(";"))

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _convert(name: str, type_name: str, raw: str) -> Any:
    if type_name == "bool":
        flag = raw.strip().lower()
        if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            _bad(name, raw, "true or false")
        return flag in ("1", "true", "yes", "on")
    try:
        if "float" in type_name:
            return float(raw)
        if "int" in type_name:
            return int(raw)
    except ValueError:
        _bad(name, raw, "a number")
    return raw


def _bad(name: str, value: object, expected: str) -> None:
    var = next((k for k, v in ENV_VARS.items() if v == name), name)
    raise FedplanError(f"setting {name} ({var}) is {value!r}; it must be {expected}")
