"""The device runtime: decode one command, run it against the device store, encode the reply."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from consumer.policy.allocation import plan_static_bytes, static_bytes
from consumer.policy.audit import AuditEntry, AuditSink, MemoryAudit
from consumer.policy.fairness import ProducerBudgets
from consumer.policy.rules import MemoryPolicy, Policy, PolicySource
from consumer.policy.tenancy import (
    PRIVATE_TAG,
    check_tags,
    external_id,
    is_device_data,
    scoped,
    visible_tags,
)
from consumer.runtime import secagg_steps
from consumer.runtime.aliasing import storages_of, unshared
from consumer.runtime.budgets import deadline_of, is_out_of_memory
from consumer.runtime.command_values import CommandValues
from consumer.runtime.lowering import Lowering
from consumer.runtime.pointer_records import PointerRecords
from consumer.runtime.replies import (
    encode_safely,
    error_reply,
    is_plain_read,
    ok_reply,
    own_result,
    plan_info,
    result_ids_of,
    tensor_info,
)
from consumer.runtime.run_limits import RunLimits
from consumer.store.base import DeviceStore, StoredObject, StoredPlan
from consumer.store.limits import StoreLimits
from schemas import allowlist
from schemas.command_pb2 import (
    ClearObjects,
    Command,
    DeleteObjects,
    GetObject,
    GetPlan,
    MoveObject,
    Ok,
    RunOp,
    RunPlan,
    StoreObject,
    StorePlan,
    StorePointer,
)
from schemas.errors import (
    DeviceError,
    FedplanError,
    PlanExecutionError,
    PlanInputError,
    StoreFullError,
    TransportError,
    WireError,
)
from schemas.ir import SCHEMA_VERSION, PlanIR
from schemas.outputs import flatten_like, inline_flags, output_slots
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.tensor_codec import (
    FramedParts,
    framed_tensor_protos,
    inline_frames,
    tensor_from_proto,
    tensor_to_proto,
)
from schemas.value_codec import value_from_proto
from schemas.wire import decode_command_framed, encode_command, encode_reply_parts, new_id

if TYPE_CHECKING:
    from consumer.runtime.interpreter import LoadedPlan

log = logging.getLogger(__name__)

Forward = Callable[[str, bytes], None]
"""Publishes encoded command bytes to another device's queue (for ``MoveObject``)."""

_READ_ONLY = frozenset({"search", "list_objects"})
"""Commands that change nothing: their replies are not kept for redeliveries."""

LOCAL_SENDER = "local"
"""The sender of a command handed to :meth:`DeviceRuntime.handle` without one."""


class DeviceRuntime(CommandValues, RunLimits):
    """Runs commands for one device; the same code behind embedded threads and Celery tasks.

    Parameters
    ----------
    device_id
        The id of the device this runtime serves (written into every reply).
    store
        Where tensors, plans, their state and past replies live.
    forward
        Publishes a command to another device; needed only for ``MoveObject``.
    limits
        Plan size limits checked on receipt (default: ``Settings()``'s).
    policy
        The device owner's policy (:mod:`consumer.policy.rules`; default: private data,
        every producer admitted, no plan approved).
    audit
        Where every command is recorded (:mod:`consumer.policy.audit`).
    rates
        The per-producer fairness budgets (:mod:`consumer.policy.fairness`), checked here on
        embedded devices; a Celery device's gate checks them before the runtime.

    Every command runs for its *sender* (the broker-validated AMQP ``user_id``; embedded:
    the producer's id): the objects, plans, pointer records and cached replies it names are
    the sender's own (:mod:`consumer.policy.tenancy`), and values derived from the device's
    private data never leave the device unless an approved plan computed them.

    Every command runs as one store *unit*: its state changes, stored results, in-place
    changes and cached reply commit together (``SqliteStore``: one transaction), so a
    worker killed at any point either left no trace of the command (it runs again on
    redelivery) or its reply too (the redelivery gets that reply). A command that would
    pass a store bound is rolled back and answered with ``STORE_FULL``.

    Examples
    --------
    >>> from consumer.store.memory import MemoryStore
    >>> runtime = DeviceRuntime(device_id="device_1", store=MemoryStore())
    >>> reply_bytes = runtime.handle(b"not a command")  # never raises: an error reply
    """

    def __init__(
        self,
        *,
        device_id: str,
        store: DeviceStore,
        forward: Forward | None = None,
        limits: StoreLimits | None = None,
        policy: PolicySource | None = None,
        audit: AuditSink | None = None,
        rates: ProducerBudgets | None = None,
    ) -> None:
        self.device_id = device_id
        self.rates = rates
        self.store = store
        self.limits = limits or StoreLimits()
        self.policy_source: PolicySource = policy or MemoryPolicy()
        self.audit: AuditSink = audit or MemoryAudit()
        self._forward = forward
        self._command_id = ""
        self._sender = LOCAL_SENDER
        self._policy = Policy()
        self._entry = AuditEntry(sender=LOCAL_SENDER, kind="")
        self._private_inputs = False
        self._object_frame: memoryview | None = None
        self._inputs: list[str] = []  # store keys of the command's own-object arguments
        self._arg_storages: set[int] = set()  # memory of the command's tensor arguments
        self._reply_ids: list[str] = []  # result ids of the command being run
        self._loaded: dict[str, tuple[str, LoadedPlan]] = {}
        self._records: dict[str, PointerRecords] = {}  # per sender: pointers to other devices
        self._frames: list[torch.Tensor] = []  # tensors sent raw after the current reply
        self._lowering = Lowering(lambda message, _index: WireError(message))
        self._deadline: float | None = None  # the policy's max_wall_seconds, per command
        self._measured: OrderedDict[Any, int | None] = OrderedDict()  # allocation pre-checks
        self._lock = threading.RLock()  # one command at a time: plan state is mutated in place

    # -- entry point -------------------------------------------------------------------------

    def handle(
        self,
        data: bytes | bytearray | memoryview,
        sender: str = LOCAL_SENDER,
        *,
        forwarded: bool = False,
    ) -> bytes:
        """Decode a ``Command``, run it once for ``sender``, and return the encoded ``Reply``;
        never raises (:meth:`handle_parts`, joined before the next command can run).
        """
        with self._lock:
            reply = self.handle_parts(data, sender, forwarded=forwarded)
            return reply if isinstance(reply, bytes) else bytes(reply)

    def handle_parts(
        self,
        data: bytes | bytearray | memoryview,
        sender: str = LOCAL_SENDER,
        *,
        forwarded: bool = False,
    ) -> bytes | FramedParts:
        """Decode a ``Command``, run it once for ``sender``, and return the encoded ``Reply``;
        never raises. A reply with large tensors comes as ``FramedParts`` (views of the
        stored tensors, not joined into one ``bytes``): write or publish it before the
        device runs its next command.

        ``sender`` is who sent the command as the transport vouches for it (the AMQP
        ``user_id`` the broker validated; never a value from the body). A command id seen
        before from the same sender returns the reply stored the first time, so a
        redelivered command does not run twice. A ``forwarded`` command (another device's
        move, for ``sender``) is not refused by the fairness budgets.
        """
        with self._lock:
            self._sender = sender or LOCAL_SENDER
            self._entry = AuditEntry(sender=self._sender, kind="")
            self._reply_ids = []
            started = time.monotonic()
            try:
                reply: bytes | FramedParts | None = (
                    None if forwarded else self._refuse_over_rate(data)
                )
                if reply is None:
                    reply = self._handle(data)
                    self._charge_device_time(time.monotonic() - started)
            except BaseException:
                self._record_audit()
                raise
            finally:
                self._object_frame = None  # a cached reply never read it: free the buffer
            return self._audited(reply)

    def cached_reply(self, command_id: str, sender: str = LOCAL_SENDER) -> bytes | None:
        """The stored reply of ``sender``'s command ``command_id``, if it ran to the end."""
        return self.store.get_reply(scoped(sender or LOCAL_SENDER, command_id))

    def _decode(self, data: bytes | bytearray | memoryview) -> Command:
        """Parse a command; a ``StoreObject``'s framed tensor is kept as a view of ``data``.

        That tensor is then decoded straight from the received buffer (no copy into the
        protobuf ``bytes`` field and out again: zero copies when ``data`` is the writable
        buffer chunks were assembled into, one otherwise). Frames of any other command are
        inlined, so every other handler sees inline tensors only.
        """
        command, frames = decode_command_framed(data)
        self._object_frame = None
        if not frames:
            return command
        protos = framed_tensor_protos(command)
        if (
            command.WhichOneof("body") == "store_object"
            and len(protos) == len(frames) == 1
            and protos[0] is command.store_object.tensor
        ):
            self._object_frame = frames[0]
        else:
            inline_frames(command, frames)
        return command

    def _handle(self, data: bytes | bytearray | memoryview) -> bytes | FramedParts:
        try:
            command = self._decode(data)
        except Exception as exc:
            self._entry.outcome = WireError.code
            return encode_safely(error_reply(self.device_id, "", [], exc, WireError))
        command_id = command.command_id
        self._entry.command_id = command_id
        self._entry.kind = command.WhichOneof("body") or ""
        try:
            cached = self.cached_reply(command_id, self._sender) if command_id else None
        except Exception:  # a broken reply cache must not stop the command
            log.exception("reading the reply cache of %s failed", command_id)
            cached = None
        body = command.WhichOneof("body") or ""
        result_ids = self._reply_ids = result_ids_of(command)
        if cached is not None:
            return self._replayed(cached)
        remember = bool(command_id) and body not in _READ_ONLY and not is_plain_read(command)
        try:
            self.store.begin()
            if remember:  # again, under the unit's write lock: another process may have run
                cached = self.cached_reply(command_id, self._sender)  # run it meanwhile
                if cached is not None:
                    self.store.rollback()
                    return self._replayed(cached)
            data_out = self._run_once(command, body, result_ids, remember)
            self.store.commit()
        except Exception as exc:  # the store failed: nothing of the command is kept
            log.exception("command %s could not be committed", command_id)
            try:
                self.store.rollback()
            except Exception:
                log.exception("rolling back command %s failed", command_id)
            return encode_safely(error_reply(self.device_id, command_id, result_ids, exc))
        except BaseException:
            self.store.rollback()
            raise
        return data_out

    def _run_once(
        self, command: Command, body: str, result_ids: list[str], remember: bool
    ) -> bytes | FramedParts:
        """Run the command in the open unit; its reply is stored in the same unit."""
        command_id = command.command_id
        try:
            frames: list[torch.Tensor] = []
            ok = self._dispatch(body, command, frames)
            ok_out = ok_reply(self.device_id, command_id, result_ids, ok)
            data_out: bytes | FramedParts = encode_reply_parts(ok_out, frames)
            if remember:
                self.store.put_reply(scoped(self._sender, command_id), result_ids, data_out)
            return data_out
        except StoreFullError as exc:  # a bound: the command leaves its error reply only
            self.store.rollback()
            self.store.begin()
            data_out = encode_safely(error_reply(self.device_id, command_id, result_ids, exc))
            self._note_refusal(exc)
        except Exception as exc:
            data_out = encode_safely(error_reply(self.device_id, command_id, result_ids, exc))
            self._note_refusal(exc)
        self._frames = []  # nothing of an error reply's command left the device
        if remember:
            self.store.put_reply(scoped(self._sender, command_id), result_ids, data_out)
        return data_out

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, body: str, command: Command, frames: list[torch.Tensor]) -> Ok:
        if command.device_id and command.device_id != self.device_id:
            raise DeviceError(
                f"command for device {command.device_id!r} reached device {self.device_id!r}; "
                "check the queue routing"
            )
        handler = _HANDLERS.get(body)
        if handler is None:
            raise WireError(f"command has no known body ({body or 'empty'}); upgrade the device")
        self._frames = frames
        self._command_id = command.command_id
        self._policy = self.policy_source.current()
        self._policy.check_admits(self._sender, self.device_id)
        self._deadline = deadline_of(self._policy.budgets.max_wall_seconds)
        self._private_inputs = False
        self._inputs = []
        self._arg_storages = set()
        if command.delete_first:  # deletes batched by the server ride with the next command
            self._delete_objects(DeleteObjects(ids=command.delete_first))
        return handler(self, command)

    def _store_object(self, msg: StoreObject) -> Ok:
        check_tags(msg.tags)
        frame, self._object_frame = self._object_frame, None
        tensor = tensor_from_proto(msg.tensor, frame)
        key = self._key(msg.id)
        self._check_stored_budget(tensor.numel() * tensor.element_size(), key)
        obj = StoredObject(key, tensor, tuple(msg.tags), msg.description)
        self.store.put_object(obj)
        self._pointers.pop(msg.id)  # the value a pointer record named has arrived
        return Ok(objects=[self._info(obj)])

    def _store_pointer(self, msg: StorePointer) -> Ok:
        check_tags(msg.tags)
        if self.store.has_object(self._key(msg.id)):
            self.store.delete_object(self._key(msg.id))
        self._pointers.put(msg)
        return Ok(objects=[PointerRecords.info(msg)])

    def _store_plan(self, msg: StorePlan) -> Ok:
        self.limits.check_plan(msg.plan, self.device_id)
        self._check_plan_budget(msg.plan)
        ir, plan_id = plan_from_proto(msg.plan)
        content_hash = msg.plan.content_hash
        self._entry.plan_hash = content_hash
        key = self._key(plan_id)
        signed = self._signature_tag(msg, plan_id)
        if self.store.has_plan(key):
            held = self.store.get_plan(key)
            if not content_hash or held.content_hash == content_hash:
                if signed and signed not in held.tags:
                    held.tags = (*held.tags, signed)
                    self.store.put_plan(held)
                return Ok(objects=[plan_info(plan_id, held.ir.name)])
        self._check_alloc_budget(f"plan {ir.name!r}", plan_static_bytes(ir))
        loaded = self._load(ir, plan_id)  # checks every op against the allow-list
        self.store.put_plan(StoredPlan(key, ir, content_hash, (signed,) if signed else ()))
        self._loaded[key] = (content_hash, loaded)
        return Ok(objects=[plan_info(plan_id, ir.name)])

    def _run_plan(self, msg: RunPlan) -> Ok:
        stored = self._plan(msg.plan_id)
        self._entry.plan_hash = stored.content_hash
        leaves = output_slots(stored.ir.outputs)
        if len(msg.result_ids) != len(leaves):
            raise PlanInputError(
                f"plan {stored.ir.name!r} has {len(leaves)} outputs but the command named "
                f"{len(msg.result_ids)} result ids; call it through a PointerPlan",
                plan_id=msg.plan_id,
                plan_name=stored.ir.name,
            )
        loaded = self._loaded_plan(stored)
        args = [self._resolve(value_from_proto(v)) for v in msg.args.items]
        kwargs = self._resolve_kwargs(msg.kwargs)
        approved = self._approved(stored)
        private = (self._private_inputs or PRIVATE_TAG in stored.tags) and not approved
        if private and msg.return_values:
            self._refuse_plan(stored, msg.plan_id, "its outputs as values in the reply")
        self._precheck_plan(stored, loaded, args, kwargs)
        known = [args, kwargs, stored.ir.state_values, stored.ir.constants]
        try:
            out = loaded.run(tuple(args), kwargs, stored.ir.state_values, watch=self._watch(known))
        except FedplanError as exc:
            exc.plan_id = exc.plan_id or msg.plan_id
            exc.plan_name = exc.plan_name or stored.ir.name
            raise
        finally:
            self.store.save_plan_state(stored)
            if private:  # also when the run failed midway: its state may hold private data
                self._taint_plan(stored, msg.plan_id)
        state = {id(t) for t in stored.ir.state_values.values()}
        results = [
            own_result(v, state) if isinstance(v, torch.Tensor) else v
            for v in flatten_like(stored.ir.outputs, out)
        ]
        plan_memory = storages_of([*stored.ir.state_values.values(), *stored.ir.constants.values()])
        results = unshared(results, plan_memory)  # a view of the plan's state is copied
        inline = inline_flags(
            results,
            msg.inline_limit,
            [args, kwargs, stored.ir.state_values, stored.ir.constants],
        )
        with_values = [(msg.return_values or flag) and not private for flag in inline]
        if private and any(not isinstance(v, torch.Tensor) for v in results):
            self._refuse_plan(stored, msg.plan_id, "a Python value in the reply")
        if approved and self._private_inputs:
            self._entry.rule = "approved-plan"
        return Ok(objects=self._store_results(msg.result_ids, results, with_values, private))

    def _run_op(self, msg: RunOp) -> Ok:
        fn = allowlist.resolve(msg.target)
        args = [self._resolve(value_from_proto(v)) for v in msg.args.items]
        kwargs = self._resolve_kwargs(msg.kwargs)
        private = self._private_inputs
        self._check_alloc_budget(msg.target, static_bytes(msg.target, args, kwargs))
        self._precheck_op(msg.target, fn, args, kwargs)
        if private and msg.return_values:
            raise self._private_error(msg.target, "returned as a value by an op")
        try:
            with torch.set_grad_enabled(not msg.no_grad):
                out = fn(*args, **kwargs)
            self._check_op_result(msg.target, out)
        except FedplanError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self._memory_error(msg.target, exc) from exc
            raise PlanExecutionError(
                f"{msg.target} failed on device {self.device_id!r}: {type(exc).__name__}: {exc}",
                device_id=self.device_id,
            ) from exc
        finally:
            if private:  # an in-place op may have written private data into its arguments
                self._taint_arguments()
        several = isinstance(out, tuple | list) and any(isinstance(v, torch.Tensor) for v in out)
        results = list(out) if several else [out]  # None and Python values are one value
        if msg.result_ids and len(results) != len(msg.result_ids):
            raise PlanInputError(
                f"{msg.target} returned {len(results)} values but the command named "
                f"{len(msg.result_ids)} result ids; pass num_results={len(results)}",
                device_id=self.device_id,
            )
        if private and any(not isinstance(v, torch.Tensor | None) for v in results):
            raise self._private_error(msg.target, "returned as a Python value by an op")
        with_values = [msg.return_values] * len(results)
        return Ok(objects=self._store_results(msg.result_ids, results, with_values, private))

    def _get_object(self, msg: GetObject) -> Ok:
        record = self._pointers.pop(msg.id) if msg.delete else self._pointers.get(msg.id)
        if record is not None:
            return Ok(objects=[PointerRecords.info(record)])
        obj = self._lookup(msg.id)
        self._check_may_leave(obj, msg.id, "get()")
        info = self._tensor_info(obj, with_value=True)
        if msg.delete and not is_device_data(obj.id):  # device data is never deleted
            self.store.delete_object(obj.id)
        return Ok(objects=[info])

    def _delete_objects(self, msg: DeleteObjects) -> Ok:
        for object_id in msg.ids:
            self._pointers.pop(object_id)
            key = self._key(object_id)
            if self.store.has_object(key):
                self.store.delete_object(key)
        return Ok()

    def _clear_objects(self, msg: ClearObjects) -> Ok:
        for obj in self.store.list_objects():  # the sender's objects only
            if not is_device_data(obj.id) and obj.id.startswith(self._key("")):
                self.store.delete_object(obj.id)
        self._pointers.clear()
        return Ok()

    def _get_plan(self, msg: GetPlan) -> Ok:
        stored = self._plan(msg.plan_id)
        self._entry.plan_hash = stored.content_hash
        if PRIVATE_TAG in stored.tags and not self._approved(stored):
            self._refuse_plan(stored, msg.plan_id, "its state (trained on private data)")
        proto = plan_to_proto(stored.ir, plan_id=msg.plan_id)
        if msg.delete:
            self.store.delete_plan(stored.id)
            self._loaded.pop(stored.id, None)
        return Ok(objects=[plan_info(msg.plan_id, stored.ir.name)], plan=proto)

    def _move_object(self, msg: MoveObject) -> Ok:
        if self._forward is None:
            raise TransportError(
                f"device {self.device_id!r} cannot publish to other devices; move the object "
                "through the server with get() and send()"
            )
        moved_id = msg.new_id or msg.id
        record = self._pointers.get(msg.id)
        if record is not None:  # moving a pointer moves the record, not the value
            moved_record = StorePointer()
            moved_record.CopyFrom(record)
            moved_record.id = moved_id
            command = Command(
                schema_version=SCHEMA_VERSION,
                command_id=self._forwarded_id(),
                device_id=msg.destination_device,
                store_pointer=moved_record,
            )
            self._forward(msg.destination_device, encode_command(command))
            self._pointers.pop(msg.id)
            return Ok(objects=[PointerRecords.info(moved_record)])
        obj = self._lookup(msg.id)
        self._check_may_leave(obj, msg.id, "move()")
        tags = visible_tags(obj.tags)
        command = Command(
            schema_version=SCHEMA_VERSION,
            command_id=self._forwarded_id(),
            device_id=msg.destination_device,
            store_object=StoreObject(
                id=moved_id,
                tensor=tensor_to_proto(obj.tensor, framed=True),
                tags=tags,
                description=obj.description,
            ),
        )
        self._forward(msg.destination_device, encode_command(command, [obj.tensor]))
        self._entry.bytes_out += obj.tensor.numel() * obj.tensor.element_size()
        if not is_device_data(obj.id):  # device data is copied, never removed
            self.store.delete_object(obj.id)
        moved = StoredObject(moved_id, obj.tensor, tuple(tags), obj.description)
        return Ok(objects=[tensor_info(moved)])

    # -- helpers -----------------------------------------------------------------------------

    def _forwarded_id(self) -> str:
        """The id of the command a move forwards: the same when the move runs again after
        a crash, so the destination answers the repeat from its reply cache."""
        return f"{self._command_id}.moved" if self._command_id else new_id()

    def _load(self, ir: PlanIR, plan_id: str) -> LoadedPlan:
        from consumer.runtime.interpreter import (
            LoadedPlan,  # the interpreter pulls in all of torch's ops
        )

        return LoadedPlan(
            ir,
            plan_id=plan_id,
            device_id=self.device_id,
            max_loop_steps=self.limits.max_loop_steps,
        )

    def _loaded_plan(self, stored: StoredPlan) -> LoadedPlan:
        cached = self._loaded.get(stored.id)
        if cached is not None and cached[0] == stored.content_hash:
            return cached[1]
        loaded = self._load(stored.ir, external_id(stored.id))
        self._loaded[stored.id] = (stored.content_hash, loaded)
        return loaded


_HANDLERS: dict[str, Callable[[DeviceRuntime, Command], Ok]] = {
    "store_object": lambda runtime, command: runtime._store_object(command.store_object),
    "store_plan": lambda runtime, command: runtime._store_plan(command.store_plan),
    "run_plan": lambda runtime, command: runtime._run_plan(command.run_plan),
    "run_op": lambda runtime, command: runtime._run_op(command.run_op),
    "get_object": lambda runtime, command: runtime._get_object(command.get_object),
    "delete_objects": lambda runtime, command: runtime._delete_objects(command.delete_objects),
    "search": lambda runtime, command: runtime._search(command.search),
    "list_objects": lambda runtime, command: runtime._list_objects(command.list_objects),
    "clear_objects": lambda runtime, command: runtime._clear_objects(command.clear_objects),
    "get_plan": lambda runtime, command: runtime._get_plan(command.get_plan),
    "move_object": lambda runtime, command: runtime._move_object(command.move_object),
    "store_pointer": lambda runtime, command: runtime._store_pointer(command.store_pointer),
    **secagg_steps.HANDLERS,
}
"""Each command body to its handler, which takes that body's message type."""

__all__ = ["DeviceRuntime", "Forward"]
