"""The Celery request of a device task: an error reply at the hard time limit, bounded timers.

Runs in the worker's main process. When Celery's hard time limit kills the pool process,
the command still gets its typed ``TIME_LIMIT`` error reply (the producer's call ends with
it, not with its own timeout) and, with ``task_acks_on_failure_or_timeout`` off, the message
goes to the dead-letter queue instead of being acked without a trace. Every finished
command (acked or rejected) tells the gate, which charges its run time to its sender
(:mod:`consumer.policy.fairness`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import TimeLimitExceeded
from celery.worker.request import Request
from kombu.asynchronous import get_event_loop

from broker_config.settings import Settings
from consumer.worker.devices import DEVICE_HEADER
from consumer.worker.gate import GatedConsumer
from consumer.worker.limits import purge_cancelled_timers
from consumer.worker.publishing import send_error
from schemas.errors import TimeLimitError

log = logging.getLogger(__name__)


def _delivery_tag(request: Request) -> Any:
    message = getattr(request, "_message", None)
    return getattr(message, "delivery_tag", None)


def _purge(request: Request | None = None) -> None:
    try:
        gate = GatedConsumer.gate
        if gate is not None and request is not None:
            # this command's own run time, for its sender's fairness budget
            gate.finished(_delivery_tag(request))
    except Exception:  # bookkeeping only
        log.debug("charging the command's device time failed", exc_info=True)
    try:
        hub = get_event_loop()
        if hub is not None:
            purge_cancelled_timers(hub.timer)
    except Exception:  # bookkeeping only
        log.debug("purging cancelled timers failed", exc_info=True)


def _device_of(request: Request) -> str | None:
    """The device the gate named for this delivery (from the queue it came from)."""
    headers = getattr(request, "_request_dict", None) or {}
    device = headers.get(DEVICE_HEADER) if isinstance(headers, dict) else None
    return device if isinstance(device, str) and device else None


class DeviceRequest(Request):
    """Celery's request, plus a typed error reply when the hard time limit strikes."""

    def _fedplan_settings(self) -> Settings:
        s = getattr(self.task.app.conf, "fedplan_settings", None)
        return s if isinstance(s, Settings) else Settings.from_env()

    def _answer_hard_limit(self, timeout: Any) -> None:
        """Once per request: the TIME_LIMIT reply, then a reject to the dead-letter queue.

        Celery reports a hard time limit twice (``on_failure`` with ``TimeLimitExceeded``,
        then ``on_timeout``) and, depending on its version, requeues the message there: it
        would hit the same limit again, so it is dead-lettered here first. Celery's own
        ack/reject after this one is a no-op (the request is acknowledged).
        """
        if getattr(self, "_fedplan_answered", False):
            return
        self._fedplan_answered = True
        try:
            device = _device_of(self)
            exc = TimeLimitError(
                f"the command hit the device's hard time limit of {timeout} s; its process "
                "was killed and the command went to the dead-letter queue",
                device_id=device or None,
            )
            send_error(
                self._fedplan_settings(),
                device or "",
                exc,
                reply_to=self.reply_to,
                command_id=str(self.correlation_id or self.id),
            )
        except Exception:
            log.exception("answering a timed-out command failed")
        if self.task.acks_late:
            self.reject(requeue=False)

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        """A pool process started the command: its run time counts from here (the gate
        charges each command its own start to end, however many run at once)."""
        try:
            gate = GatedConsumer.gate
            if gate is not None:
                gate.started(_delivery_tag(self), time_accepted)
        except Exception:  # bookkeeping only
            log.debug("recording the command's start failed", exc_info=True)
        super().on_accepted(pid, time_accepted)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Answer the command with ``TIME_LIMIT`` (hard limit), then let Celery go on."""
        if not soft:
            self._answer_hard_limit(f"{timeout:g}")
        super().on_timeout(soft, timeout)
        _purge(None if soft else self)  # a soft limit: the command still runs to its end

    # Celery's optimised request class overrides on_success without calling up, but every
    # finished task is acked or rejected: the cancelled time-limit timer goes there.
    def acknowledge(self) -> None:
        try:
            super().acknowledge()
        finally:
            _purge(self)

    def reject(self, requeue: bool = False) -> None:
        try:
            super().reject(requeue=requeue)
        finally:
            _purge(self)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else "?"
            self._answer_hard_limit(f"{limit:g}" if isinstance(limit, float | int) else limit)
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            _purge(self)
