"""Device handle: the server's view of one device, turning calls into commands."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
from google.protobuf.message import Message

from producer.plans.plan import NOT_BUILT_MESSAGE
from producer.plans.seams import BuiltPlan
from producer.remote.collector import PendingCommand
from producer.remote.pointers import PointerPlan, PointerTensor, pointer_of
from producer.remote.tagging import description_of, tags_of
from schemas import command_pb2 as cmd
from schemas.errors import PlanInputError, PlanNotBuiltError
from schemas.ir import DType, ObjectId, PlanIR, Value, to_ir_value
from schemas.outputs import output_slots, rebuild_like
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.plan_pb2 import ValueDict, ValueList
from schemas.tensor_codec import dtype_from_name, tensor_to_proto
from schemas.value_codec import value_to_proto
from schemas.wire import new_id

if TYPE_CHECKING:
    from producer.remote.fleet import Fleet

INLINE_LIMIT = 64 * 1024
"""Bytes: a plan output at most this big comes back in the ``RunPlan`` reply (``get()`` is free)."""


class Device:
    """A device of a fleet, by id; get one with ``fleet.device(id)``.

    Every method publishes one command to the device's queue. Methods returning pointers
    return at once; the others wait for the device's reply (``fleet.timeout`` seconds).

    A plan's tensor outputs of at most ``inline_limit`` bytes come back with the ``RunPlan``
    reply, so ``get()`` on them sends nothing (the remote copy is deleted with the next
    command). Set ``inline_limit = 0`` to fetch every output with its own ``GetObject``.
    """

    def __init__(self, id: str, fleet: Fleet) -> None:
        self.id = id
        self.fleet = fleet
        self.inline_limit = INLINE_LIMIT
        self._plans: dict[str, object] = {}  # plan id -> the op list (build) sent
        # Result pointers that may hold a value from their reply, by object id.
        self._carriers: weakref.WeakValueDictionary[str, PointerTensor] = (
            weakref.WeakValueDictionary()
        )

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for a reply from this device."""
        return self.fleet.timeout

    def __repr__(self) -> str:
        return f"<Device id:{self.id}>"

    # -- the fleet ---------------------------------------------------------------------------

    def peer(self, device_id: str) -> Device:
        """Another device of this device's fleet."""
        return self.fleet.device(device_id)

    def shares_fleet(self, other: Device) -> bool:
        """Whether ``other`` is reached through the same fleet (objects move only within one)."""
        return other.fleet is self.fleet

    def release(self, command_id: str) -> None:
        """Stop keeping a command whose reply was read findable (see ``ReplyCollector``)."""
        self.fleet.release(command_id)

    def discard(self, object_id: str) -> None:
        """Delete an object with the next command (safe from finalizers)."""
        self.fleet.discard(self.id, object_id)

    # -- objects -----------------------------------------------------------------------------

    def send_tensor(
        self,
        tensor: torch.Tensor,
        *,
        tags: Sequence[str] | None = None,
        description: str | None = None,
        owned: bool = False,
    ) -> PointerTensor:
        """Store a copy of ``tensor`` on the device; tags default to those given by ``fp.tag``.

        ``owned`` pointers delete the remote copy when they are dropped without ``get()``.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"send_tensor takes a torch.Tensor, got {type(tensor).__name__}")
        tags = tuple(tags_of(tensor) if tags is None else tags)
        description = description_of(tensor) if description is None else description
        object_id = new_id()
        msg = cmd.StoreObject(
            id=object_id,
            tensor=tensor_to_proto(tensor, framed=True),
            tags=list(tags),
            description=description,
        )
        pending = self.fleet.submit(self.id, "store_object", msg, (object_id,), tensors=[tensor])
        return PointerTensor(
            object_id,
            self,
            pending=pending,
            tags=tags,
            shape=tensor.shape,
            dtype=tensor.dtype,
            description=description,
            owned=owned,
        )

    def send_pointer(self, pointer: PointerTensor) -> PointerTensor:
        """Store on this device a pointer to ``pointer``'s object (a pointer to a pointer)."""
        if not self.shares_fleet(pointer.location):
            raise PlanInputError(
                f"pointer {pointer.id} belongs to another fleet; devices can only point at "
                "objects within one fleet"
            )
        object_id = new_id()
        pointer.location._named(pointer.id)  # the pointed-at object may be moved from now on
        info = pointer.wait()
        msg = cmd.StorePointer(
            id=object_id,
            location=info.location.id,
            remote_id=info.id,
            tags=list(info.tags),
            description=info.description,
            dtype=DType.of(info.dtype).name if info.dtype is not None else "",
            shape=list(info.known_shape or []) if info.dtype is not None else [],
        )
        pending = self._submit("store_pointer", msg, (object_id,))
        result = PointerTensor(object_id, self, pending=pending, tags=info.tags)
        result.wait()
        return result

    def search(self, *tags: str) -> list[PointerTensor]:
        """Pointers to the device's objects that carry every one of ``tags``.

        Examples
        --------
        >>> import torch
        >>> import producer as fp
        >>> with fp.connect() as fleet:
        ...     x = fp.tag(torch.tensor([-1, 2.0]), "input_data")
        ...     device_1 = fleet.device("device_1", data=(x,))
        ...     pointer_to_data = device_1.search("input_data")[0]
        ...     pointer_to_data.shape
        torch.Size([2])
        """
        reply = self._call("search", cmd.Search(tags=list(tags)))
        return [PointerTensor(info.id, self, info=info) for info in reply.ok.objects]

    def objects(self) -> dict[str, PointerTensor]:
        """Pointers to every object the device holds, by id."""
        reply = self._call("list_objects", cmd.ListObjects())
        return {info.id: PointerTensor(info.id, self, info=info) for info in reply.ok.objects}

    def clear_objects(self) -> None:
        """Delete every object held by the device (its plans stay)."""
        for object_id in list(self._carriers):
            self._named(object_id)
        self._call("clear_objects", cmd.ClearObjects())

    def delete_objects(self, ids: Iterable[str]) -> PendingCommand:
        """Delete objects by id (missing ones are ignored); does not wait."""
        ids = list(ids)
        for object_id in ids:
            self._named(object_id)
        return self._submit("delete_objects", cmd.DeleteObjects(ids=ids))

    def fetch(self, object_id: str, *, delete: bool = False, timeout: float | None = None) -> Any:
        """The value of a stored object (removing it from the device when ``delete``)."""
        if delete:
            self._named(object_id)
        msg = cmd.GetObject(id=object_id, delete=delete)
        reply, pending = self._call_pending("get_object", msg, timeout=timeout)
        info = reply.ok.objects[0]
        if info.kind == "pointer":  # a pointer to a pointer: its value is the inner pointer
            return PointerTensor(
                info.points_to_id,
                self.peer(info.points_to_device),
                tags=tuple(info.tags),
                shape=None if info.shape_withheld else torch.Size(info.shape),
                dtype=dtype_from_name(info.dtype) if info.dtype else None,
                description=info.description,
            )
        return pending.tensor(info)

    def move_object(
        self,
        object_id: str,
        destination: Device,
        *,
        timeout: float | None,
        new_id: str | None = None,
    ) -> None:
        """Have the device hand an object to ``destination`` directly (under ``new_id`` if set)."""
        if not self.shares_fleet(destination):
            raise PlanInputError(
                f"device {destination.id!r} belongs to another fleet; devices can only move "
                "objects within one fleet"
            )
        self._named(object_id)
        msg = cmd.MoveObject(
            id=object_id, destination_device=destination.id, new_id=new_id or object_id
        )
        self._call("move_object", msg, timeout=timeout)

    # -- plans -------------------------------------------------------------------------------

    def send_plan(
        self,
        plan: BuiltPlan,
        *,
        wait: bool = True,
        force: bool = False,
        signed_by: tuple[str, Any] | None = None,
    ) -> PointerPlan:
        """Store a built plan on the device (once: sending it again transfers nothing).

        A plan rebuilt since it was sent is sent again. ``wait`` blocks until the device
        accepted it, so a plan refused by the device's allow-list raises here. ``force``
        sends it again: the device then replaces its copy if the plan or its state differ
        (use it to push locally changed state; otherwise the device keeps its own state).
        ``signed_by=(name, ed25519_private_key)`` signs the plan's content hash
        (``schemas.signing``): a device whose policy trusts that key under ``name`` treats
        the plan as approved (its outputs may leave even when computed on private data).
        """
        if not plan.is_built:
            raise PlanNotBuiltError(NOT_BUILT_MESSAGE, plan_id=plan.id, plan_name=plan.name)
        pending: PendingCommand | None = None
        ops = plan.structure.ops  # the live state is read only when the plan is sent
        if force or self._plans.get(plan.id) is not ops:
            msg = cmd.StorePlan(plan=plan_to_proto(plan.ir, plan_id=plan.id))
            if signed_by is not None:
                from schemas.signing import sign_plan_hash

                msg.signer = signed_by[0]
                msg.signature = sign_plan_hash(signed_by[1], msg.plan.content_hash)
            pending = self._submit("store_plan", msg)
            self._plans[plan.id] = ops
            pending.add_done_callback(lambda f: self._forget_refused(plan.id, f))
        pointer = PointerPlan(plan, self, pending=pending)
        if wait:
            pointer.wait()
        return pointer

    def _forget_refused(self, plan_id: str, done: Future[cmd.Reply]) -> None:
        if done.exception() is not None:  # a refused plan is sent again next time
            self._plans.pop(plan_id, None)

    def holds_plan(self, plan_id: str) -> bool:
        """Whether this handle has sent the plan to the device (and it was not refused)."""
        return plan_id in self._plans

    def run_plan(
        self,
        plan: BuiltPlan,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None = None,
        *,
        return_values: bool = False,
        inline_limit: int | None = None,
    ) -> Any:
        """Run a plan held by the device; pointers come back at once in its output structure.

        ``inline_limit`` overrides the device handle's (``0``: no output in the reply unless
        ``return_values``; secure aggregation keeps updates on the device this way).
        """
        ir: PlanIR = plan.structure  # only its outputs: no need to collect the live state
        result_ids = tuple(new_id() for _ in output_slots(ir.outputs))
        msg = cmd.RunPlan(
            plan_id=plan.id,
            args=ValueList(items=[value_to_proto(self._arg(a)) for a in args]),
            kwargs=self._kwargs(kwargs or {}),
            result_ids=list(result_ids),
            return_values=return_values,
            inline_limit=max(0, int(self.inline_limit if inline_limit is None else inline_limit)),
        )
        pending = self._submit("run_plan", msg, result_ids)
        pointers = [PointerTensor(rid, self, pending=pending, owned=True) for rid in result_ids]
        for pointer in pointers:
            self._carriers[pointer.id] = pointer
        return rebuild_like(ir.outputs, lambda i: pointers[i])

    def run_op(
        self,
        target: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None = None,
        *,
        num_results: int = 1,
        return_values: bool = False,
        no_grad: bool | None = None,
    ) -> Any:
        """Run one allow-listed op on the device's objects; a pointer (or tuple) comes back.

        ``no_grad`` defaults to the caller's mode: inside ``torch.no_grad()`` the op runs
        with autograd off on the device too.
        """
        result_ids = tuple(new_id() for _ in range(num_results))
        msg = cmd.RunOp(
            target=target,
            args=ValueList(items=[value_to_proto(self._arg(a)) for a in args]),
            kwargs=self._kwargs(kwargs or {}),
            result_ids=list(result_ids),
            return_values=return_values,
            no_grad=not torch.is_grad_enabled() if no_grad is None else no_grad,
        )
        pending = self._submit("run_op", msg, result_ids)
        pointers = tuple(
            PointerTensor(rid, self, pending=pending, owned=True) for rid in result_ids
        )
        if return_values:
            for pointer in pointers:
                self._carriers[pointer.id] = pointer
        return pointers[0] if num_results == 1 else pointers

    def fetch_plan(
        self, plan_id: str, *, delete: bool = False, timeout: float | None = None
    ) -> PlanIR:
        """The plan as the device holds it, with its current state."""
        reply = self._call("get_plan", cmd.GetPlan(plan_id=plan_id, delete=delete), timeout=timeout)
        if delete:
            self._plans.pop(plan_id, None)
        ir, _ = plan_from_proto(reply.ok.plan)
        return ir

    # -- plumbing ----------------------------------------------------------------------------

    def _named(self, object_id: str) -> None:
        """A command names ``object_id``: a value its pointer got with a reply may be stale."""
        carrier = self._carriers.pop(object_id, None)
        if carrier is not None:
            carrier._drop_carried_value()

    def _submit(
        self, body: str, msg: Message, result_ids: tuple[str, ...] = ()
    ) -> PendingCommand:
        return self.fleet.submit(self.id, body, msg, result_ids)

    def _call(self, body: str, msg: Message, *, timeout: float | None = None) -> cmd.Reply:
        return self._call_pending(body, msg, timeout=timeout)[0]

    def _call_pending(
        self, body: str, msg: Message, *, timeout: float | None = None
    ) -> tuple[cmd.Reply, PendingCommand]:
        """Send and wait: the reply, and its future (which holds the decoded tensor values)."""
        pending = self._submit(body, msg)
        try:
            return pending.reply(self.timeout if timeout is None else timeout), pending
        finally:
            if pending.done():
                self.release(pending.command_id)

    def _arg(self, value: Any) -> Value:
        """A call argument as a command value: pointers become ``ObjectId`` on this device."""
        return to_ir_value(value, self._leaf)

    def _leaf(self, value: Any) -> Value:
        pointer = pointer_of(value)  # a sent module's parameter stands for its pointer
        if pointer is not None:
            value = pointer
        if isinstance(value, PointerTensor):
            if value.location is not self:
                raise PlanInputError(
                    f"pointer {value.id} is on device {value.location.id!r} but the call runs "
                    f"on device {self.id!r}; move it with ptr.move(device) first",
                    device_id=self.id,
                )
            value.raise_if_failed()  # the cause, rather than "no object" from the device
            self._named(value.id)  # the command may change it (in place, move, ...)
            return ObjectId(value.id)
        if isinstance(value, torch.Tensor):
            return value.detach()
        raise TypeError(
            f"a {type(value).__name__} cannot be sent to a device; pass pointers, tensors, "
            "numbers, strings, dtypes, slices or tuples/lists/dicts (string keys) of them"
        )

    def _kwargs(self, kwargs: Mapping[str, Any]) -> ValueDict:
        return ValueDict(
            keys=list(kwargs), values=[value_to_proto(self._arg(v)) for v in kwargs.values()]
        )

