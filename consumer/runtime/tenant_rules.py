"""What a device runtime does for tenancy and its owner's policy, per command.

Mixed into :class:`~consumer.runtime.device.DeviceRuntime`: the sender's namespace of ids
(:mod:`consumer.policy.tenancy`), the lookups that find only the sender's objects and the
device's own data, and the private-data rules (:mod:`consumer.policy.rules`) with the
taint marks that follow values derived from private data.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from consumer.policy.audit import AuditEntry, AuditSink
from consumer.policy.rules import PendingPlan, Policy, PolicySource
from consumer.policy.tenancy import (
    PRIVATE_TAG,
    external_id,
    is_device_data,
    scoped,
    visible_tags,
)
from consumer.runtime.aliasing import storage_of
from consumer.runtime.pointer_records import PointerRecords
from consumer.runtime.replies import encode_safely, error_reply, tensor_info
from consumer.store.base import DeviceStore, StoredObject, StoredPlan
from schemas.command_pb2 import ListObjects, ObjectInfo, Ok, Search
from schemas.errors import AuditUnavailable, FedplanError, ObjectNotFound, PolicyError
from schemas.plan_codec import plan_op_count
from schemas.signing import verify_plan_hash
from schemas.tensor_codec import FramedParts
from schemas.wire import decode_reply_framed

log = logging.getLogger(__name__)

SIGNED_PREFIX = "fedplan:signed:"
"""Reserved plan tag + a public key: the plan was stored with a valid signature by that key
(it counts as approved while the policy trusts the key)."""


class TenantRules:
    """The tenancy and policy half of a device runtime (state lives on the runtime)."""

    device_id: str
    store: DeviceStore
    policy_source: PolicySource
    _policy: Policy
    _sender: str
    _entry: AuditEntry
    _records: dict[str, PointerRecords]
    _inputs: list[str]
    _arg_storages: set[int]
    _reply_ids: list[str]
    _frames: list[torch.Tensor]
    audit: AuditSink

    @property
    def _pointers(self) -> PointerRecords:
        """The sender's pointer records."""
        records = self._records.get(self._sender)
        if records is None:
            records = self._records[self._sender] = PointerRecords()
        return records

    def _key(self, object_id: str) -> str:
        """The store key of the sender's id (see :mod:`consumer.policy.tenancy`)."""
        return scoped(self._sender, object_id)

    def _visible(self, key: str) -> bool:
        """Whether the sender may see a stored key: its own objects and the device's data."""
        return is_device_data(key) or key.startswith(self._key(""))

    def _not_found(self, object_id: str) -> ObjectNotFound:
        return ObjectNotFound(
            f"no object {object_id!r} on device {self.device_id!r}; it may have been fetched "
            "with get() or deleted already",
            device_id=self.device_id,
        )

    def _plan(self, plan_id: str) -> StoredPlan:
        """The sender's plan ``plan_id`` (another producer's is not found)."""
        try:
            return self.store.get_plan(self._key(plan_id))
        except ObjectNotFound:
            raise ObjectNotFound(
                f"no plan {plan_id!r} on device {self.device_id!r}; send it first",
                device_id=self.device_id,
                plan_id=plan_id,
            ) from None

    @property
    def sender(self) -> str:
        """Who sent the command being run (for forwarded commands)."""
        return self._sender

    def _lookup(self, object_id: str) -> StoredObject:
        """The sender's object ``object_id``, or the device's own data of that id; another
        producer's object is not found, with the same error as a missing one."""
        self._entry.objects.append(object_id)
        for key in (self._key(object_id), object_id):
            if key == object_id and not is_device_data(key):
                break
            try:
                return self.store.get_object(key)
            except ObjectNotFound:
                continue
        raise self._not_found(object_id)

    def _is_private(self, obj: StoredObject) -> bool:
        if is_device_data(obj.id):
            return not self._policy.is_public(obj.tags)
        return PRIVATE_TAG in obj.tags

    def _check_may_leave(self, obj: StoredObject, object_id: str, how: str) -> None:
        if self._is_private(obj):
            raise self._private_error(object_id, f"read with {how}")
        if is_device_data(obj.id):
            self._entry.rule = "public-tags"
        else:
            self._entry.rule = self._entry.rule or "own-data"

    def _private_error(self, what: str, how: str) -> PolicyError:
        self._entry.rule = "private-data"
        return PolicyError(
            f"{what!r} is (or is derived from) private data of device {self.device_id!r} and "
            f"cannot be {how} by producer {self._sender!r} (rule: private-data; only the "
            "outputs of a plan the operator approved leave the device)",
            device_id=self.device_id,
        )

    def _refuse_plan(self, stored: StoredPlan, plan_id: str, what: str) -> None:
        self._note_pending(stored)
        self._entry.rule = "unapproved-plan"
        raise PolicyError(
            f"plan {stored.ir.name!r} (hash {stored.content_hash[:16]}) computed on private "
            f"data of device {self.device_id!r}; producer {self._sender!r} cannot have {what} "
            "(rule: unapproved-plan; the operator approves it with `fedplan device approve "
            f"{stored.content_hash}`)",
            device_id=self.device_id,
            plan_id=plan_id,
            plan_name=stored.ir.name,
        )

    def _note_pending(self, stored: StoredPlan) -> None:
        if not stored.content_hash or self._approved(stored):
            return
        listing = "\n".join(f"{i:4d}  {op.target}" for i, op in enumerate(stored.ir.ops[:500]))
        pending = PendingPlan(
            content_hash=stored.content_hash,
            name=stored.ir.name,
            producer=self._sender,
            listing=listing,
            seen=time.time(),
        )
        try:
            self.policy_source.note_pending(pending)
        except Exception:
            log.exception("recording a pending plan failed")

    def _approved(self, stored: StoredPlan) -> bool:
        """Whether the plan's outputs may leave: its hash is approved, or it was stored with
        a valid signature by a key the policy (still) trusts."""
        if self._policy.approves(stored.content_hash):
            return True
        trusted = {key for _, key in self._policy.trusted_keys}
        return any(t[len(SIGNED_PREFIX) :] in trusted for t in stored.tags)

    def _signature_tag(self, msg: Any, plan_id: str) -> str | None:
        """Check a ``StorePlan``'s signature: ``None`` when unsigned, the reserved tag that
        marks the plan signed when valid; ``PolicyError`` when it does not verify."""
        if not msg.signature and not msg.signer:
            return None
        key = self._policy.trusted_key(msg.signer)
        if key is None or not verify_plan_hash(key, msg.plan.content_hash, msg.signature):
            self._entry.rule = "trusted-keys"
            raise PolicyError(
                f"plan {msg.plan.name!r} from producer {self._sender!r} carries a signature "
                f"by {msg.signer!r} that device {self.device_id!r} does not trust or that does "
                "not verify (rule: trusted-keys); send it unsigned or have the operator trust "
                "the key (`fedplan device policy --trust NAME=KEY`)",
                device_id=self.device_id,
                plan_id=plan_id,
                plan_name=msg.plan.name,
            )
        return f"{SIGNED_PREFIX}{key}"

    def _taint_plan(self, stored: StoredPlan, plan_id: str) -> None:
        """Mark the plan's state as derived from private data (kept with the plan)."""
        self._note_pending(stored)
        if PRIVATE_TAG not in stored.tags:
            stored.tags = (*stored.tags, PRIVATE_TAG)
            self.store.put_plan(stored)
        self._taint_arguments()

    def _taint_arguments(self) -> None:
        """Mark the sender's objects passed to this command private (they may be changed
        in place by an op or plan that read private data), and the sender's objects that
        share memory with them (views: :mod:`consumer.runtime.aliasing`)."""
        for key in dict.fromkeys(self._inputs):
            if not is_device_data(key) and self.store.has_object(key):
                self._taint(self.store.get_object(key))
        storages = self._arg_storages - {0}
        if not storages:
            return
        prefix = self._key("")
        for obj in self.store.resident_objects():  # only tensors in memory share memory
            if obj.id.startswith(prefix) and storage_of(obj.tensor) in storages:
                self._taint(obj)

    def _taint(self, obj: StoredObject) -> None:
        if PRIVATE_TAG not in obj.tags:
            tainted = (*obj.tags, PRIVATE_TAG)
            self.store.put_object(StoredObject(obj.id, obj.tensor, tainted, obj.description))

    def _check_plan_budget(self, plan: Any) -> None:
        """Refuse a plan over the policy's op count or size budget (before decoding it)."""
        budgets = self._policy.budgets
        ops = plan_op_count(plan)
        if budgets.max_plan_ops and ops > budgets.max_plan_ops:
            raise self._over_budget(f"plan {plan.name!r} has {ops} ops", "max_plan_ops")
        if budgets.max_plan_bytes and plan.ByteSize() > budgets.max_plan_bytes:
            what = f"plan {plan.name!r} has {plan.ByteSize()} encoded bytes"
            raise self._over_budget(what, "max_plan_bytes")

    def _check_alloc_budget(self, what: str, allocates: int) -> None:
        """Refuse a plan or op whose literal-size allocations pass ``max_alloc_bytes``."""
        limit = self._policy.budgets.max_alloc_bytes
        if limit and allocates > limit:
            raise self._over_budget(f"{what} allocates {allocates} bytes", "max_alloc_bytes")

    def _over_budget(self, what: str, budget: str) -> PolicyError:
        self._entry.rule = f"budgets.{budget}"
        limit = getattr(self._policy.budgets, budget)
        return PolicyError(
            f"{what}; device {self.device_id!r} allows producer {self._sender!r} at most "
            f"{limit} (rule: budgets.{budget})",
            device_id=self.device_id,
        )

    def _check_stored_budget(self, adding: int, key: str) -> None:
        limit = self._policy.budgets.max_stored_bytes
        if not limit:
            return
        prefix = self._key("")
        held = sum(
            o.tensor.numel() * o.tensor.element_size()
            for o in self.store.list_objects()
            if o.id.startswith(prefix) and o.id != key
        )
        if held + adding > limit:
            raise PolicyError(
                f"producer {self._sender!r} would hold {held + adding} bytes on device "
                f"{self.device_id!r}; its budget is {limit} (rule: budgets.max_stored_bytes)",
                device_id=self.device_id,
            )

    def _search(self, msg: Search) -> Ok:
        tags = list(msg.tags)
        found = [o for o in self.store.search(tags) if self._visible(o.id)]
        infos = [self._search_info(o, tags) for o in found]
        records = self._pointers.search(tags)
        return Ok(objects=[*(i for i in infos if i), *map(PointerRecords.info, records)])

    def _list_objects(self, msg: ListObjects) -> Ok:
        records = self._pointers.search([])
        infos = [self._search_info(o, []) for o in self.store.list_objects() if self._visible(o.id)]
        return Ok(objects=[*(i for i in infos if i), *map(PointerRecords.info, records)])

    def _search_info(self, obj: StoredObject, tags: list[str]) -> ObjectInfo | None:
        """What ``search``/``objects()`` show the sender of a stored object it may see.

        Its own objects and public device data: their metadata. Private device data: only
        when named by a tag (``search``; it is not listed), as a pointer with its id, shape
        and dtype (what a plan on it is built for) and only the tags the sender named: no
        description, no other tags.
        """
        if not is_device_data(obj.id) or not self._is_private(obj):
            return self._info(obj)
        if not tags:
            return None
        info = self._info(obj)
        info.description = ""
        del info.tags[:]
        info.tags.extend(t for t in visible_tags(obj.tags) if t in tags)
        return info

    def _info(self, obj: StoredObject) -> ObjectInfo:
        """Metadata as the sender sees it: its own id, no reserved tags."""
        info = tensor_info(obj)
        info.id = external_id(obj.id)
        del info.tags[:]
        info.tags.extend(visible_tags(obj.tags))
        if PRIVATE_TAG in obj.tags and not is_device_data(obj.id):
            # derived from private data: a shape can depend on the values (arange(count))
            del info.shape[:]
            info.shape_withheld = True
        return info

    def _audited(self, reply: bytes | FramedParts) -> bytes | FramedParts:
        """The reply once its audit row is written; nothing leaves without it: when the
        log cannot be written the reply is withheld (it stays cached for a resend)."""
        if self._record_audit():
            return reply
        refusal = AuditUnavailable(
            f"device {self.device_id!r} could not write its audit log, so the reply of "
            f"command {self._entry.command_id!r} was withheld; the command ran and its "
            "reply is kept: send it again with the same command id once the operator "
            "has fixed the audit log (full disk, locked or unwritable file)",
            device_id=self.device_id,
        )
        cid, reply_ids = self._entry.command_id, self._reply_ids
        return encode_safely(error_reply(self.device_id, cid, reply_ids, refusal))

    def _replayed(self, cached: bytes) -> bytes:
        """A cached reply sent again: audited with the tensor bytes it carries."""
        self._entry.rule = "cached-reply"
        try:
            _reply, frames = decode_reply_framed(cached)
            self._entry.bytes_out += sum(len(f) for f in frames)
        except Exception:
            self._entry.bytes_out += len(cached)  # an upper bound
        return cached

    def _record_audit(self) -> bool:
        """Append the command's audit row; False when the log could not be written (the
        caller then withholds the reply)."""
        entry = self._entry
        entry.bytes_out += sum(t.numel() * t.element_size() for t in self._frames)
        self._frames = []
        try:
            self.audit.record(entry)
        except Exception:
            log.exception("writing the audit log failed; the reply is withheld")
            return False
        return True

    def _note_refusal(self, exc: Exception) -> None:
        code = exc.code if isinstance(exc, FedplanError) else "INTERNAL"
        self._entry.outcome = code
        if isinstance(exc, PolicyError):
            self._entry.rule = self._entry.rule or "refused"


__all__ = ["TenantRules"]
