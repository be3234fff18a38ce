"""fedplan: trace PyTorch code into plans and run them on devices (``import producer as fp``).

Examples
--------
>>> import torch
>>> import producer as fp
>>> @fp.func2plan(args_shape=[(-1, 2)])
... def double_abs(x):
...     return torch.abs(x + x)
>>> double_abs(torch.tensor([[1.0, -2.0]]))
tensor([[2., 4.]])
"""

from schemas.errors import (
    BrokerUnavailable,
    DeviceError,
    DeviceNotFound,
    FedplanError,
    ObjectNotFound,
    OpNotAllowedError,
    PlanBuildError,
    PlanExecutionError,
    PlanGuardError,
    PlanInputError,
    PlanNotBuiltError,
    PlanShapeError,
    SchemaVersionError,
    TransportError,
    WireError,
)

__all__ = [
    "BrokerUnavailable",
    "DeviceError",
    "DeviceNotFound",
    "FedplanError",
    "ObjectNotFound",
    "OpNotAllowedError",
    "PlanBuildError",
    "PlanExecutionError",
    "PlanGuardError",
    "PlanInputError",
    "PlanNotBuiltError",
    "PlanShapeError",
    "SchemaVersionError",
    "TransportError",
    "WireError",
]

# Public API added by each module below (keep one import block per module).

# devices, pointers and the fleet (producer/remote/fleet.py, device.py, pointers.py, ...)
from producer.compat.hook import hook
from producer.compat.sending import send
from producer.remote.device import Device
from producer.remote.fleet import Fleet, connect
from producer.remote.pointers import PointerPlan, PointerTensor
from producer.remote.tagging import describe, tag, tags_of

__all__ += [
    "Device",
    "Fleet",
    "PointerPlan",
    "PointerTensor",
    "connect",
    "describe",
    "hook",
    "send",
    "tag",
    "tags_of",
]

# modules on devices, federated datasets (producer/compat/remote_module.py, federated_data.py)
from producer.compat.federated_data import FederatedDataLoader, FederatedDataset, federate  # noqa: E402
from producer.compat.optims import Optims  # noqa: E402
from producer.compat.remote_module import copy_module, get_module, move_module  # noqa: E402

__all__ += [
    "FederatedDataLoader",
    "FederatedDataset",
    "Optims",
    "copy_module",
    "federate",
    "get_module",
    "move_module",
]

# plans (producer/plans/plan.py, decorators.py, capture.py)
from producer.plans.capture import trace  # noqa: E402
from producer.plans.decorators import func2plan, method2plan  # noqa: E402
from producer.plans.plan import Plan, State  # noqa: E402

__all__ += ["Plan", "State", "func2plan", "method2plan", "trace"]

# the training loop inside a plan (producer/plans/loop.py)
from producer.plans.loop import LoopPlan  # noqa: E402

__all__ += ["LoopPlan"]
