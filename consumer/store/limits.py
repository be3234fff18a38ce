"""The device store's bounds (bytes stored, cached replies, memory, plan size) and their rules.

What accumulates on a device, and what bounds it:

- **stored tensors and plan state**: owned by the server's pointers and plans (deleted by
  ``get()``/``delete``/``GetPlan(delete)``), never expired; together with the cached replies
  they stay under ``max_bytes``. A command that would pass it gets a ``STORE_FULL`` error
  reply and changes nothing (the device keeps serving).
- **cached replies** (one per command that changed something, so a redelivered command is
  answered instead of run twice): a reply expires ``reply_ttl`` seconds after it was stored
  (the results queue of an idle producer expires after the same time by default, so nobody
  could receive it any more); beyond ``max_replies`` or ``max_reply_bytes`` the oldest go
  first. Expired replies are dropped whenever a reply is stored and when the store opens. A
  command redelivered after its reply was dropped runs again.
- **tensors in memory**: a least-recently-used cache of at most ``cache_bytes`` (tensors that
  require grad are kept: their ``.grad`` and autograd graph live only in memory).
- **plans**: at most ``max_plan_ops`` ops (a loop body's included) and ``max_plan_bytes``
  encoded bytes, checked on receipt before the plan is decoded (``PLAN_TOO_LARGE``).
- **plan loops**: at most ``max_loop_steps`` steps per call, checked before the first step
  (``LOOP_LIMIT``); every step's slots are freed when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker_config.settings import Settings
from schemas.errors import PlanTooLargeError
from schemas.plan_codec import plan_op_count

_DEFAULTS = Settings()


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """The bounds a device store and runtime enforce; defaults are ``Settings()``'s.

    Examples
    --------
    >>> limits = StoreLimits.from_settings(Settings(store_max_replies=10))
    >>> limits.max_replies
    10
    """

    max_bytes: int = _DEFAULTS.store_max_bytes
    max_reply_bytes: int = _DEFAULTS.store_max_reply_bytes
    max_replies: int = _DEFAULTS.store_max_replies
    reply_ttl: float = _DEFAULTS.store_reply_ttl
    cache_bytes: int = _DEFAULTS.store_cache_bytes
    max_plan_ops: int = _DEFAULTS.max_plan_ops
    max_plan_bytes: int = _DEFAULTS.max_plan_bytes
    max_loop_steps: int = _DEFAULTS.max_loop_steps

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreLimits:
        """The limits configured by ``FEDPLAN_STORE_*`` / ``FEDPLAN_MAX_PLAN_*``."""
        return cls(
            max_bytes=settings.store_max_bytes,
            max_reply_bytes=settings.store_max_reply_bytes,
            max_replies=settings.store_max_replies,
            reply_ttl=settings.store_reply_ttl,
            cache_bytes=settings.store_cache_bytes,
            max_plan_ops=settings.max_plan_ops,
            max_plan_bytes=settings.max_plan_bytes,
            max_loop_steps=settings.max_loop_steps,
        )

    def check_plan(self, plan: Any, device_id: str) -> None:
        """Refuse a plan (its protobuf message) over the op count or size limit before its
        ops are decoded (``PlanTooLargeError``)."""
        ops = plan_op_count(plan)
        size = plan.ByteSize() if ops <= self.max_plan_ops else -1  # cost: a walk
        if ops > self.max_plan_ops or size > self.max_plan_bytes:
            what = f"{ops} ops" + (f" and {size} encoded bytes" if size >= 0 else "")
            raise PlanTooLargeError(
                f"plan {plan.name!r} has {what}; device {device_id!r} accepts at most "
                f"{self.max_plan_ops} ops (FEDPLAN_MAX_PLAN_OPS) and "
                f"{self.max_plan_bytes} bytes (FEDPLAN_MAX_PLAN_BYTES). Split the "
                "plan or send big state with send()",
                device_id=device_id,
                plan_id=plan.id or None,
                plan_name=plan.name or None,
            )
