"""What a device runtime does for the policy's run budgets, per command.

Mixed into :class:`~consumer.runtime.device.DeviceRuntime` next to
:class:`~consumer.runtime.tenant_rules.TenantRules`: the allocation pre-check of a plan or
op from the actual argument shapes, the per-op watch of a plan's run (bytes held, wall
time) and the typed errors they end with (:mod:`consumer.runtime.budgets`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from consumer.policy.fairness import ProducerBudgets
from consumer.policy.rules import Policy, PolicySource
from consumer.runtime.budgets import (
    AllocBudgetExceeded,
    RunBudget,
    is_out_of_memory,
    measure_op,
    measure_plan,
    nbytes,
)
from consumer.runtime.replies import encode_safely, error_reply, result_ids_of
from consumer.store.base import StoredPlan
from schemas.errors import MemoryLimitError, PolicyError, TimeLimitError
from schemas.wire import decode_command

if TYPE_CHECKING:
    from consumer.policy.audit import AuditEntry
    from consumer.runtime.interpreter import LoadedPlan, Watch

MEASURED_KEEP = 256
"""Pre-check results kept (plan, content hash, argument shapes -> bytes)."""


def _signature(value: Any) -> Any:
    """What a pre-check result depends on: tensor shapes and dtypes, other values as such."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), str(value.dtype), value.requires_grad)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("D", tuple((k, _signature(v)) for k, v in value.items()))
    return ("V", repr(value)[:200])


class RunLimits:
    """The run-budget half of a device runtime (state lives on the runtime)."""

    device_id: str
    rates: ProducerBudgets | None
    policy_source: PolicySource
    _policy: Policy
    _sender: str
    _entry: AuditEntry
    _deadline: float | None
    _measured: OrderedDict[Any, int | None]

    def _refuse_over_rate(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The refusal of a command over its sender's ``max_commands_per_minute`` or
        ``max_device_seconds_per_minute`` (unrun), or None to run it. An unreadable policy
        is left to the command's own handling."""
        if self.rates is None:
            return None
        try:
            budgets = self.policy_source.current().budgets
        except Exception:
            return None
        refusal = self.rates.refusal(
            self._sender,
            commands_per_minute=budgets.max_commands_per_minute,
            seconds_per_minute=budgets.max_device_seconds_per_minute,
            device_id=self.device_id,
        )
        if refusal is None:
            return None
        try:
            command = decode_command(data)
        except Exception:
            return None  # undecodable: the runtime answers it as such
        self._entry.command_id = command.command_id
        self._entry.kind = command.WhichOneof("body") or ""
        self._entry.outcome = refusal.code
        self._entry.rule = refusal.message.split("(rule: ", 1)[1].split(")", 1)[0]
        reply = error_reply(self.device_id, command.command_id, result_ids_of(command), refusal)
        return encode_safely(reply)

    def _charge_device_time(self, seconds: float) -> None:
        """Take a command's run time from its sender's device-time bucket."""
        if self.rates is None:
            return
        try:
            per_minute = self.policy_source.current().budgets.max_device_seconds_per_minute
        except Exception:
            return
        self.rates.charge_device_time(self._sender, seconds, per_minute)

    def _alloc_error(self, what: str, allocates: int) -> PolicyError:
        self._entry.rule = "budgets.max_alloc_bytes"
        limit = self._policy.budgets.max_alloc_bytes
        return AllocBudgetExceeded(
            f"{what} allocates {allocates} bytes; device {self.device_id!r} allows producer "
            f"{self._sender!r} at most {limit} (rule: budgets.max_alloc_bytes)",
            device_id=self.device_id,
        )

    def _time_error(self) -> TimeLimitError:
        self._entry.rule = "budgets.max_wall_seconds"
        seconds = self._policy.budgets.max_wall_seconds
        return TimeLimitError(
            f"the command ran longer than the device's time limit of {seconds:g} s and was "
            "stopped; make it smaller or ask the operator (policy budget max_wall_seconds)",
            device_id=self.device_id,
        )

    def _precheck_plan(
        self,
        stored: StoredPlan,
        loaded: LoadedPlan,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> None:
        """Refuse a run whose values would pass ``max_alloc_bytes`` on these arguments,
        before a byte is allocated (from a run on meta tensors, remembered per shapes)."""
        limit = self._policy.budgets.max_alloc_bytes
        if not limit:
            return
        key = (stored.id, stored.content_hash, _signature((args, kwargs)))
        if key in self._measured:
            self._measured.move_to_end(key)
            peak = self._measured[key]
        else:
            state = stored.ir.state_values
            peak = measure_plan(
                loaded,
                tuple(args),
                kwargs,
                state,
                AllocBudgetExceeded,
                deadline=self._deadline,
                on_time=self._time_error,
            )
            self._measured[key] = peak
            while len(self._measured) > MEASURED_KEEP:
                self._measured.popitem(last=False)
        if peak is not None and peak > limit:
            raise self._alloc_error(f"plan {stored.ir.name!r} on these inputs", peak)

    def _precheck_op(
        self, target: str, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        """Refuse an op whose result would pass ``max_alloc_bytes`` (measured on meta)."""
        limit = self._policy.budgets.max_alloc_bytes
        if not limit:
            return
        size = measure_op(fn, args, kwargs)
        if size is not None and size > limit:
            raise self._alloc_error(f"{target} on these inputs", size)

    def _watch(self, known: list[Any]) -> Watch | None:
        """The per-op watch of a plan's run, or None when no budget applies to it."""
        budgets = self._policy.budgets
        if not budgets.max_alloc_bytes and self._deadline is None:
            return None
        watch = RunBudget(
            limit=budgets.max_alloc_bytes,
            over=lambda n: self._alloc_error("the plan's values", n),
            deadline=self._deadline,
            on_time=self._time_error,
            known=known,
        )
        return watch.watch

    def _check_op_result(self, target: str, out: Any) -> None:
        """After an op: its result within ``max_alloc_bytes``, the command within its time."""
        limit = self._policy.budgets.max_alloc_bytes
        if limit and nbytes(out) > limit:
            raise self._alloc_error(target, nbytes(out))
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise self._time_error()

    def _memory_error(self, target: str, exc: BaseException) -> Exception:
        """An op's failure as the device reports it: out of memory is ``MEMORY_LIMIT``."""
        if not is_out_of_memory(exc):
            return exc if isinstance(exc, Exception) else RuntimeError(str(exc))
        return MemoryLimitError(
            f"{target} ran out of the memory device {self.device_id!r} allows a command "
            f"({type(exc).__name__}: {exc}); no result was stored. Use smaller inputs or ask "
            "the operator (FEDPLAN_POOL_MEMORY_LIMIT, budget max_alloc_bytes)",
            device_id=self.device_id,
        )


__all__ = ["RunLimits"]
