"""How a command's arguments become tensors and its results become stored objects.

Mixed into :class:`~consumer.runtime.device.DeviceRuntime` on top of
:class:`~consumer.runtime.tenant_rules.TenantRules`: every ``ObjectId`` in an argument is
looked up under the sender's tenancy (marking the command as reading private data where it
does), and results are stored under the sender's keys, tagged private when derived from
private data, within the output and stored-bytes budgets.
"""

from __future__ import annotations

from typing import Any

import torch

from consumer.policy.tenancy import PRIVATE_TAG, is_device_data
from consumer.runtime.aliasing import storage_of
from consumer.runtime.lowering import Lowering, get
from consumer.runtime.pointer_records import PointerRecords
from consumer.runtime.tenant_rules import TenantRules
from consumer.store.base import StoredObject
from schemas.command_pb2 import ObjectInfo
from schemas.errors import ObjectNotFound, PolicyError, WireError
from schemas.ir import ObjectId, Ref, Slice, SymExpr, Value
from schemas.plan_pb2 import ValueDict
from schemas.tensor_codec import tensor_to_proto
from schemas.tree import tree_map
from schemas.value_codec import value_from_proto, value_to_proto


class CommandValues(TenantRules):
    """Arguments in, results out, for the command being handled (state on the runtime)."""

    _pointers: PointerRecords
    _lowering: Lowering
    _frames: list[torch.Tensor]
    _private_inputs: bool
    _arg_storages: set[int]

    def _resolve(self, value: Value) -> Any:
        """A command argument as a Python value, every ``ObjectId`` replaced by its tensor."""
        return get(self._lowering.value(self._fill(value), "a command argument"), [])

    def _fill(self, value: Value) -> Value:
        filled: Value = tree_map(self._fill_leaf, value)
        return filled

    def _fill_leaf(self, value: Value) -> Value:
        if isinstance(value, ObjectId):
            record = self._pointers.get(value.id)
            if record is not None:
                raise ObjectNotFound(
                    f"object {value.id!r} on device {self.device_id!r} is a pointer to "
                    f"{record.location}:{record.remote_id}, not a tensor; get() the pointer, "
                    "or bring the value here with remote_get()",
                    device_id=self.device_id,
                )
            obj = self._lookup(value.id)
            if self._is_private(obj):
                self._private_inputs = True
            self._inputs.append(obj.id)
            # the device's own data is used, never changed: ops and plans get a copy
            tensor = obj.tensor.clone() if is_device_data(obj.id) else obj.tensor
            self._arg_storages.add(storage_of(tensor))
            return tensor
        if isinstance(value, Ref | SymExpr):
            raise WireError("a command argument names a plan slot; send objects by id instead")
        if isinstance(value, Slice):
            parts = (value.start, value.stop, value.step)
            return Slice(*(self._fill_leaf(part) for part in parts))
        return value

    def _resolve_kwargs(self, kwargs: ValueDict) -> dict[str, Any]:
        return {
            k: self._resolve(value_from_proto(v))
            for k, v in zip(kwargs.keys, kwargs.values, strict=True)
        }

    def _store_results(
        self, result_ids: Any, results: list[Any], with_values: list[bool], private: bool
    ) -> list[ObjectInfo]:
        budget = self._policy.budgets.max_output_bytes
        size = sum(v.numel() * v.element_size() for v in results if isinstance(v, torch.Tensor))
        if budget and size > budget:
            raise PolicyError(
                f"the command's results are {size} bytes; device {self.device_id!r} lets "
                f"producer {self._sender!r} store at most {budget} per command (rule: "
                "budgets.max_output_bytes)",
                device_id=self.device_id,
            )
        self._check_stored_budget(size, "")
        tags = (PRIVATE_TAG,) if private else ()
        infos: list[ObjectInfo] = []
        for result_id, value, with_value in zip(result_ids, results, with_values, strict=False):
            if isinstance(value, torch.Tensor):
                obj = StoredObject(self._key(result_id), value, tags)
                self.store.put_object(obj)
                infos.append(self._tensor_info(obj, with_value=with_value))
            else:  # a Python value (loss.item()): it travels in the reply, nothing is stored
                infos.append(
                    ObjectInfo(
                        id=result_id,
                        kind="value",
                        python_value=value_to_proto(value),
                        has_value=True,
                    )
                )
        return infos

    def _tensor_info(self, obj: StoredObject, *, with_value: bool) -> ObjectInfo:
        info = self._info(obj)
        if with_value:  # the bytes follow the reply as a raw frame
            info.value.CopyFrom(tensor_to_proto(obj.tensor, framed=True))
            info.has_value = True
            self._frames.append(obj.tensor)
        return info
