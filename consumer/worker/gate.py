"""The gate in front of Celery: every delivery of a device queue is checked first.

Celery and kombu act on a message's properties and headers before any fedplan code runs:
they decompress (``compression``), decode content types of their own, look up the task
named in ``task`` (Celery's built-ins too), schedule ``eta``/``countdown``, expire
``expires`` and take ``timelimit`` from the sender. The gate sits in the kombu consumer
Celery reads its device queue with (:class:`GatedConsumer`), sees the raw AMQP message
before all of that, and either

- admits it: the headers Celery sees are rebuilt from the validated fedplan envelope only
  (no eta, expiry, time limits or retries from the sender: the device's settings apply),
  plus the delivery count the gate recorded (``fedplan_deliveries``); or
- refuses it: a typed ``MESSAGE_REFUSED`` error reply where a reply address is known
  (``reply_to`` + ``correlation_id``), then a reject to the dead-letter queue; or
- refuses a well-formed command whose sender is over the policy's
  ``max_commands_per_minute`` or ``max_device_seconds_per_minute``
  (:mod:`consumer.policy.fairness`): a typed ``POLICY_REFUSED`` reply, and the message is
  acked unrun (it is not a bad message).

The gate never raises into Celery: a failure inside it refuses the message.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kombu import Consumer

from broker_config import names
from broker_config.envelope import (
    CHUNK_HEADER,
    CHUNKS_HEADER,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    TRANSFER_HEADER,
)
from broker_config.settings import Settings
from consumer.policy.audit import AuditEntry, AuditLog
from consumer.policy.fairness import ProducerBudgets
from consumer.policy.rules import Budgets, PolicyFile
from consumer.worker.chunks import MIN_CHUNK_BYTES, max_chunks, spool_chunk
from consumer.worker.delivery_attempts import DeliveryAttempts, quorum_deliveries
from consumer.worker.devices import (
    DEVICE_HEADER,
    SENDER_HEADER,
    device_of,
    device_settings,
    queue_of,
)
from consumer.worker.frames import UNDECODABLE
from consumer.worker.publishing import send_error
from schemas.errors import FedplanError, MessageRefused, PlanExecutionError

log = logging.getLogger(__name__)

DELIVERIES_HEADER = "fedplan_deliveries"
"""Set by the gate only (a sender's value is dropped): how often this message was delivered."""

ON_BEHALF_HEADER = "fedplan_on_behalf"
"""A device forwarding a ``MoveObject`` names the producer it acts for; the gate honours it
only from a device user (``fedplan-device-<id>``), so a producer cannot claim another's name."""

MAX_HEADER_BYTES = 16 * 1024
"""Bound on the headers of one message (names, strings and nesting together)."""

MAX_REFUSED_HARD = 2
"""Deliveries beyond ``delivery_limit + MAX_REFUSED_HARD`` are refused by the gate itself,
without the pool process ever seeing the message again."""

MAX_UNSETTLED = 65536
"""Admitted commands whose run time is not charged yet (the queues' prefetch windows bound
them); past this many the oldest is forgotten uncharged."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
_USER = re.compile(r"^[A-Za-z0-9_.@:-][A-Za-z0-9_.@:+=-]{0,199}$")
_DEVICE_USER = re.compile(rf"^{re.escape(names.PREFIX)}-device-[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REPLY_TO = re.compile(r"^fedplan\.results\.[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TEXT = 1024  # argsrepr, kwargsrepr, origin

# Celery headers that must be absent or hold exactly what fedplan's envelope sends.
_NULL_HEADERS = ("eta", "countdown", "expires", "shadow", "group", "group_index", "meth")
_PASSED_TEXT = ("argsrepr", "kwargsrepr", "origin")


@dataclass
class Verdict:
    """What the gate decided about one message."""

    refusal: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    reply_to: str | None = None
    command_id: str | None = None
    chunked: bool = False


@dataclass(slots=True)
class _Admitted:
    """An admitted command until it is settled: whose it is and when it began."""

    device: str | None
    sender: str
    admitted: float
    charged: float | None = None  # its run time is charged up to here (None: not started)


class _TooBig(Exception):
    pass


def header_size(value: Any, limit: int = MAX_HEADER_BYTES) -> int:
    """An upper estimate of the encoded size of a header value; raises past ``limit``.

    Examples
    --------
    >>> header_size({"id": "abc", "n": [1, 2]})
    36
    """
    total, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > 8:
            raise _TooBig("nested too deep")
        if isinstance(item, dict):
            total += 4
            for k, v in item.items():
                total += len(str(k)) + 1
                stack.append((v, depth + 1))
        elif isinstance(item, list | tuple):
            total += 4
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str | bytes | bytearray):
            total += len(item) + 4
        else:
            total += 8
        if total > limit:
            raise _TooBig(f"headers larger than {limit} bytes")
    return total


def _text(headers: dict[str, Any], key: str, limit: int = _TEXT) -> str | None:
    value = headers.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise _Refuse(f"header {key!r} must be a string of at most {limit} characters")
    return value


class _Refuse(Exception):
    pass


def _int(headers: dict[str, Any], key: str) -> int:
    value = headers.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Refuse(f"header {key!r} must be an integer, not {type(value).__name__}")
    return value


def _chunk_headers(headers: dict[str, Any], settings: Settings) -> dict[str, Any]:
    present = [k for k in (TRANSFER_HEADER, CHUNK_HEADER, CHUNKS_HEADER) if k in headers]
    if not present:
        return {}
    if len(present) != 3:
        raise _Refuse(f"chunk headers {present} without the other ones")
    transfer = headers[TRANSFER_HEADER]
    if not isinstance(transfer, str) or not _ID.match(transfer):
        raise _Refuse(f"header {TRANSFER_HEADER!r} must be an id string")
    count, index = _int(headers, CHUNKS_HEADER), _int(headers, CHUNK_HEADER)
    most = max_chunks(settings)
    if not 1 <= count <= most:
        raise _Refuse(
            f"a transfer of {count} chunks: the device takes 1 to {most} (chunks of at least "
            f"{MIN_CHUNK_BYTES} bytes, max_command_size {settings.max_command_size})"
        )
    if not 0 <= index < count:
        raise _Refuse(f"chunk {index} of a transfer of {count}")
    return {TRANSFER_HEADER: transfer, CHUNK_HEADER: index, CHUNKS_HEADER: count}


def _timelimit_is_default(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, list | tuple) and len(value) == 2 and all(v is None for v in value)


def inspect(properties: Any, body: Any, settings: Settings) -> Verdict:
    """Check one raw message; the :class:`Verdict` holds the clean headers or the refusal.

    Pure (no I/O) and total: it never raises.

    Examples
    --------
    >>> from broker_config.envelope import task_headers
    >>> props = {"content_type": CONTENT_TYPE, "content_encoding": CONTENT_ENCODING,
    ...          "application_headers": task_headers("c1"), "correlation_id": "c1",
    ...          "user_id": "producer-1"}
    >>> inspect(props, b"x", Settings()).refusal is None
    True
    >>> props["application_headers"]["eta"] = "2099-01-01T00:00:00"
    >>> inspect(props, b"x", Settings()).refusal
    "header 'eta' is not honoured: it must be absent or null"
    """
    verdict = Verdict()
    try:
        _inspect(properties, body, settings, verdict)
    except _Refuse as why:
        verdict.refusal = str(why)
    except _TooBig as why:
        verdict.refusal = str(why)
    except Exception as exc:  # the gate must not raise: refuse what it cannot judge
        verdict.refusal = f"the gate could not check this message ({type(exc).__name__})"
    return verdict


def _inspect(properties: Any, body: Any, settings: Settings, verdict: Verdict) -> None:
    if not isinstance(properties, dict):
        raise _Refuse("message without properties")
    correlation_id = properties.get("correlation_id")
    if isinstance(correlation_id, str) and _ID.match(correlation_id):
        verdict.command_id = correlation_id
    reply_to = properties.get("reply_to")
    if reply_to is not None:
        if not isinstance(reply_to, str) or not _REPLY_TO.match(reply_to):
            raise _Refuse("reply_to is not a fedplan results routing key")
        verdict.reply_to = reply_to
    headers = properties.get("application_headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise _Refuse("headers must be a table")
    header_size(headers)
    if UNDECODABLE in headers:  # set by consumer.worker.frames (a sender setting it is refused)
        task_id = headers.get("id")
        if verdict.command_id is None and isinstance(task_id, str) and _ID.match(task_id):
            verdict.command_id = task_id
        raise _Refuse(f"undecodable message: {str(headers[UNDECODABLE])[:200]}")
    content_type = properties.get("content_type")
    if content_type != CONTENT_TYPE:
        raise _Refuse(f"content type {str(content_type)[:64]!r}: only {CONTENT_TYPE} is served")
    if properties.get("content_encoding") != CONTENT_ENCODING:
        raise _Refuse(f"content encoding must be {CONTENT_ENCODING!r}")
    if headers.get("compression") is not None:
        raise _Refuse("compressed messages are not accepted")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not _ID.match(task_id):
        raise _Refuse("header 'id' must be an id string")
    verdict.message_id = task_id
    if verdict.command_id is None:
        verdict.command_id = task_id
    if headers.get("task") != names.TASK_NAME:
        raise _Refuse(f"header 'task' must be {names.TASK_NAME!r}; no other task is served")
    if headers.get("lang", "py") != "py":
        raise _Refuse("header 'lang' must be 'py'")
    for key in _NULL_HEADERS:
        if headers.get(key) is not None:
            raise _Refuse(f"header {key!r} is not honoured: it must be absent or null")
    if headers.get("retries") not in (None, 0) or isinstance(headers.get("retries"), bool):
        raise _Refuse("header 'retries' is not honoured: it must be absent or 0")
    if not _timelimit_is_default(headers.get("timelimit")):
        raise _Refuse("header 'timelimit' is not honoured: the device's limits apply")
    if not isinstance(body, bytes | bytearray | memoryview) or len(body) == 0:
        raise _Refuse("the body must be non-empty bytes")
    if len(body) > settings.max_message_size:
        raise _Refuse(f"a body of {len(body)} bytes; the device takes {settings.max_message_size}")
    clean: dict[str, Any] = {
        "lang": "py",
        "task": names.TASK_NAME,
        "id": task_id,
        "root_id": _text(headers, "root_id", 200) or task_id,
        "parent_id": _text(headers, "parent_id", 200),
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "ignore_result": True,
    }
    for key in _PASSED_TEXT:
        clean[key] = _text(headers, key)
    clean[SENDER_HEADER] = _sender(properties, headers)
    chunks = _chunk_headers(headers, settings)
    verdict.chunked = bool(chunks)
    clean.update(chunks)
    verdict.headers = clean


def _sender(properties: dict[str, Any], headers: dict[str, Any]) -> str:
    """Who the command runs for: the broker-validated ``user_id`` (or, for a device
    forwarding a move, the producer it names)."""
    user = properties.get("user_id")
    if not isinstance(user, str) or not _USER.match(user):
        raise _Refuse(
            "a command must carry its sender as the AMQP user_id property (the broker checks "
            "it is the connection's user); fedplan's producer sets it"
        )
    behalf = headers.get(ON_BEHALF_HEADER)
    if behalf is None:
        return user
    if not _DEVICE_USER.match(user):
        raise _Refuse(f"header {ON_BEHALF_HEADER!r} is honoured from device users only")
    if not isinstance(behalf, str) or not _USER.match(behalf):
        raise _Refuse(f"header {ON_BEHALF_HEADER!r} must name a user")
    return behalf


class Gate:
    """The gate of one worker: settings, the delivery counter and what to do with a verdict."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._attempts: dict[str, DeliveryAttempts] = {}  # per device data dir
        self._policies: dict[str, PolicyFile] = {}
        self._audits: dict[str, AuditLog] = {}
        self.fairness = ProducerBudgets()  # a one-device worker's; see _rates
        self._device_rates: dict[str, ProducerBudgets] = {}
        self._unsettled: OrderedDict[Any, _Admitted] = OrderedDict()  # by delivery tag

    def _data_dir(self, device: str | None) -> str:
        s = device_settings(self.settings, device) if device else self.settings
        return str(s.data_dir)

    def _budgets(self, device: str | None) -> Budgets:
        key = self._data_dir(device)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = PolicyFile(Path(key))
        try:
            return policy.current().budgets
        except Exception:  # an unreadable policy refuses nothing here (the runtime does)
            return Budgets()

    def _rates(self, device: str | None) -> ProducerBudgets:
        """The fairness buckets of ``device``: each device of a multi-device worker has its
        own, as it has its own policy."""
        if self.settings.devices_dir is None or not device:
            return self.fairness
        rates = self._device_rates.get(device)
        if rates is None:
            rates = self._device_rates[device] = ProducerBudgets()
        return rates

    def started(self, tag: Any, when: float | None = None) -> None:
        """A pool process accepted the command of delivery ``tag`` (``when``: its monotonic
        clock, the same on every process of the machine): its run time counts from here."""
        entry = self._unsettled.get(tag)
        if entry is not None and entry.charged is None:
            entry.charged = max(entry.admitted, time.monotonic() if when is None else when)

    def finished(self, tag: Any, now: float | None = None) -> None:
        """The command of delivery ``tag`` was settled (acked or rejected): charge the rest
        of its own run time, from when a pool process accepted it (else from its admission)
        to now, to its sender's ``max_device_seconds_per_minute`` bucket on its device.

        Commands run side by side (``--concurrency`` > 1) are each charged their own time,
        and a command's time so far is charged whenever another delivery is admitted (its
        reply may be out before its message is settled); a second settle charges nothing.

        Examples
        --------
        >>> gate = Gate(Settings())
        >>> gate.finished(12345)  # not admitted by this gate: nothing to charge
        """
        entry = self._unsettled.pop(tag, None)
        if entry is None:
            return
        if entry.charged is None:  # never seen starting: from its admission
            entry.charged = entry.admitted
        self._charge(entry, time.monotonic() if now is None else now)

    def _charge(self, entry: _Admitted, now: float) -> None:
        if entry.charged is None or now <= entry.charged:
            return
        seconds, entry.charged = now - entry.charged, now
        per_minute = self._budgets(entry.device).max_device_seconds_per_minute
        self._rates(entry.device).charge_device_time(entry.sender, seconds, per_minute)

    def _charge_running(self, now: float) -> None:
        """Charge every running command its time so far (before a new delivery is judged)."""
        for entry in self._unsettled.values():
            self._charge(entry, now)

    def _admitted(self, raw: Any, device: str | None, sender: str, now: float) -> None:
        tag = getattr(raw, "delivery_tag", None)
        if tag is None:
            return
        self._unsettled[tag] = _Admitted(device, sender, now)
        while len(self._unsettled) > MAX_UNSETTLED:
            self._unsettled.popitem(last=False)

    def over_budget(
        self, verdict: Verdict, deliveries: int, device: str | None, user: Any = None
    ) -> FedplanError | None:
        """The refusal of a command whose sender is over its ``max_commands_per_minute`` or
        ``max_device_seconds_per_minute`` (:mod:`consumer.policy.fairness`); a redelivery
        and the later chunks of a transfer are not refused (and count no command), nor what
        a device forwards for a producer (``user``: the AMQP ``user_id``)."""
        sender = verdict.headers.get(SENDER_HEADER)
        if deliveries > 1 or verdict.headers.get(CHUNK_HEADER, 0) != 0 or not sender:
            return None
        if _DEVICE_USER.match(str(user or "")):
            return None  # a device forwarding a move: the rest of a command already admitted
        budgets = self._budgets(device)
        return self._rates(device).refusal(
            sender,
            commands_per_minute=budgets.max_commands_per_minute,
            seconds_per_minute=budgets.max_device_seconds_per_minute,
            device_id=device or "",
        )

    @property
    def device_id(self) -> str:
        return os.environ.get("FEDPLAN_DEVICE_ID", "")

    def deliveries(
        self, verdict: Verdict, redelivered: bool, headers: Any, device: str | None = None
    ) -> int:
        """Count this delivery durably (redeliveries only) before anything else is done,
        in the data dir of the device whose queue it came from."""
        n = 1
        if redelivered and verdict.message_id:
            s = self._settings_of(device)
            attempts = self._attempts.get(str(s.data_dir))
            if attempts is None:
                attempts = self._attempts[str(s.data_dir)] = DeliveryAttempts(s.data_dir)
            n = attempts.record_redelivery(verdict.message_id)
        return max(n, quorum_deliveries(headers))

    def _settings_of(self, device: str | None) -> Settings:
        """The settings (data dir) of the device a delivery is for."""
        return device_settings(self.settings, device) if device else self.settings

    def admit(self, raw: Any, queue: str | None = None) -> bool:
        """Check a raw py-amqp message from ``queue`` (the queue the broker delivered it
        from): True to hand it on to Celery, else it was refused."""
        now = time.monotonic()
        self._charge_running(now)
        properties = getattr(raw, "properties", None)
        verdict = inspect(properties, getattr(raw, "body", None), self.settings)
        device: str | None = None
        try:
            device = device_of(queue)
        except FedplanError as exc:
            if verdict.refusal is None:
                verdict.refusal = exc.message
        if verdict.refusal is None:
            try:
                info = getattr(raw, "delivery_info", None) or {}
                original = properties.get("application_headers") if properties else None
                n = self.deliveries(verdict, bool(info.get("redelivered")), original, device)
            except Exception as exc:
                log.exception("counting a delivery failed")
                verdict.refusal = f"the delivery could not be counted ({type(exc).__name__})"
            else:
                limit = self.settings.delivery_limit
                if n > limit + MAX_REFUSED_HARD:
                    return self._refuse(raw, verdict, device, _crashed(verdict, n))
                user = properties.get("user_id") if isinstance(properties, dict) else None
                over = self.over_budget(verdict, n, device, user)
                if over is not None:
                    return self._refuse(raw, verdict, device, over, dead_letter=False)
                verdict.headers[DELIVERIES_HEADER] = n
                verdict.headers[DEVICE_HEADER] = device
                if isinstance(properties, dict):  # always, once admitted
                    properties["application_headers"] = verdict.headers
                    try:  # a chunk is stored here, not pickled through the pool's pipe
                        if spool_chunk(self._settings_of(device), verdict.headers, raw.body):
                            raw.channel.basic_ack(raw.delivery_tag)
                            return False  # more chunks to come; the pool sees the last one
                    except FedplanError as exc:
                        return self._refuse(raw, verdict, device, exc)
                    self._admitted(raw, device, verdict.headers[SENDER_HEADER], now)
                    return True
        return self._refuse(raw, verdict, device, MessageRefused(verdict.refusal or ""))

    def _record(self, raw: Any, verdict: Verdict, device: str | None, exc: FedplanError) -> None:
        """Every refusal is in the device's audit log, the gate's too (best effort: the
        message is refused either way, and nothing of the device leaves with it)."""
        try:
            key = self._data_dir(device)
            audit = self._audits.get(key)
            if audit is None:
                audit = self._audits[key] = AuditLog(Path(key))
            entry = AuditEntry(
                sender=_audited_sender(raw),
                kind="gate",
                outcome=exc.code,
                rule=_refusal_rule(exc),
                command_id=verdict.command_id or "",
            )
            audit.record(entry)
        except Exception:
            log.exception("recording a refused message in the audit log failed")

    def _refuse(
        self,
        raw: Any,
        verdict: Verdict,
        device: str | None,
        exc: FedplanError,
        *,
        dead_letter: bool = True,
    ) -> bool:
        """Answer the message with ``exc`` and drop it: to the dead-letter queue (a bad
        message), or acked (a well-formed command refused by a rate budget)."""
        log.log(
            logging.ERROR if dead_letter else logging.INFO,
            "refused message %s (command %s)%s: %s [%s]",
            verdict.message_id,
            verdict.command_id,
            " to the dead-letter queue" if dead_letter else "",
            exc.message,
            exc.code,
        )
        exc.device_id = device or None
        self._record(raw, verdict, device, exc)
        send_error(
            self.settings,
            device or "",
            exc,
            reply_to=verdict.reply_to,
            command_id=verdict.command_id,
        )
        try:
            if dead_letter:
                raw.channel.basic_reject(raw.delivery_tag, requeue=False)
            else:
                raw.channel.basic_ack(raw.delivery_tag)
        except Exception:
            log.exception("dropping a refused message failed; it will come back")
        return False


def _refusal_rule(exc: FedplanError) -> str:
    """The rule a refusal names (``budgets.max_commands_per_minute``), else ``gate``."""
    if "(rule: " in exc.message:
        return exc.message.split("(rule: ", 1)[1].split(")", 1)[0]
    return "gate"


def _audited_sender(raw: Any) -> str:
    """The sender of a refused message for the audit log: its ``user_id`` (the broker
    checked it when set), or ``-`` without one."""
    properties = getattr(raw, "properties", None)
    user = properties.get("user_id") if isinstance(properties, dict) else None
    return user[:200] if isinstance(user, str) and user else "-"


def _crashed(verdict: Verdict, n: int) -> FedplanError:
    return PlanExecutionError(
        f"command {verdict.command_id} was delivered {n} times and its worker died every "
        "time; it was not run again and went to the dead-letter queue"
    )


class GatedConsumer(Consumer):
    """The kombu consumer of a device worker's task queues: the gate runs first.

    Celery builds it through ``app.amqp.TaskConsumer``; :data:`gate` is set by ``make_app``.
    """

    gate: ClassVar[Gate | None] = None

    def _receive_callback(self, message: Any) -> Any:
        gate = type(self).gate
        if gate is not None and hasattr(message, "properties"):
            try:
                queue = queue_of(self, getattr(message, "delivery_info", None))
                admitted = gate.admit(message, queue)
            except Exception:  # never into Celery
                log.exception("the gate failed; rejecting the message")
                admitted = False
                try:
                    message.channel.basic_reject(message.delivery_tag, requeue=False)
                except Exception:
                    log.exception("rejecting the message failed; it will come back")
            if not admitted:
                return None
        return super()._receive_callback(message)
