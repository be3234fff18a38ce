"""``FederatedDataset`` and ``FederatedDataLoader``: a dataset split across devices."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, TensorDataset

from producer.remote.pointers import PointerTensor
from schemas.errors import PlanInputError

if TYPE_CHECKING:
    from producer.remote.device import Device


@dataclass(frozen=True)
class DeviceShard:
    """One device's part of a federated dataset: pointers to its examples and targets."""

    data: PointerTensor
    targets: PointerTensor
    length: int

    @property
    def location(self) -> Device:
        """The device holding this shard."""
        return self.data.location

    def __len__(self) -> int:
        return self.length


class FederatedDataset:
    """A dataset whose examples live on several devices, one shard per device.

    Build it with :func:`federate` (or ``dataset.federate((bob, alice))`` once hooked), or
    from data already on the devices: :class:`DeviceShard` objects or
    ``(data_ptr, target_ptr)`` pairs (the seeds' ``datasets`` list). The server only knows
    each shard's length.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> from torch.utils.data import TensorDataset
    >>> with fp.connect() as fleet:
    ...     bob, alice = fleet.device("bob"), fleet.device("alice")
    ...     ds = TensorDataset(torch.arange(10.0).reshape(5, 2), torch.arange(5))
    ...     fed = fp.federate(ds, (bob, alice))
    ...     [(shard.location.id, len(shard)) for shard in fed.shards]
    [('bob', 3), ('alice', 2)]
    """

    def __init__(self, shards: Sequence[DeviceShard | tuple[PointerTensor, PointerTensor]]) -> None:
        if not shards:
            raise PlanInputError("a federated dataset needs at least one device shard")
        self.shards = tuple(s if isinstance(s, DeviceShard) else _shard(*s) for s in shards)

    @property
    def workers(self) -> list[str]:
        """The ids of the devices holding the shards, in order."""
        return [shard.location.id for shard in self.shards]

    def __len__(self) -> int:
        return sum(shard.length for shard in self.shards)

    def __getitem__(self, device_id: str) -> DeviceShard:
        for shard in self.shards:
            if shard.location.id == device_id:
                return shard
        raise KeyError(f"no shard on device {device_id!r}; the shards are on {self.workers}")

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.location.id}: {s.length}" for s in self.shards)
        return f"<FederatedDataset {parts}>"


def _shard(data: PointerTensor, targets: PointerTensor) -> DeviceShard:
    """A shard from pointers to one device's examples and targets."""
    if data.location is not targets.location:
        raise PlanInputError(
            f"a shard's data is on {data.location.id!r} but its targets are on "
            f"{targets.location.id!r}; move one of them with ptr.move(device)"
        )
    if len(data) != len(targets):
        raise PlanInputError(f"{len(data)} examples but {len(targets)} targets")
    return DeviceShard(data, targets, len(data))


def _materialize(dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset's examples and targets as two stacked tensors."""
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise PlanInputError(
                f"federate needs (data, target) pairs; this TensorDataset has "
                f"{len(dataset.tensors)} tensors"
            )
        return dataset.tensors[0], dataset.tensors[1]
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not items or not all(isinstance(item, tuple | list) and len(item) == 2 for item in items):
        raise PlanInputError("federate needs a non-empty dataset of (data, target) pairs")
    data = torch.stack([torch.as_tensor(x) for x, _ in items])
    targets = torch.stack([torch.as_tensor(y) for _, y in items])
    return data, targets


def federate(dataset: Dataset[Any], devices: Sequence[Device]) -> FederatedDataset:
    """Split ``dataset`` into contiguous, near-equal shards and send one to each device.

    The dataset's items must be ``(data, target)`` pairs; a ``TensorDataset`` of two
    tensors is sent as is, any other dataset is read item by item (transforms applied).

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> from torch.utils.data import TensorDataset
    >>> with fp.connect() as fleet:
    ...     fed = fp.federate(
    ...         TensorDataset(torch.zeros(4, 3), torch.ones(4)), (fleet.device("bob"),)
    ...     )
    ...     len(fed)
    4
    """
    if not devices:
        raise PlanInputError("federate needs at least one device, e.g. (bob, alice)")
    data, targets = _materialize(dataset)
    if len(data) != len(targets):
        raise PlanInputError(f"{len(data)} examples but {len(targets)} targets")
    per_device = math.ceil(len(data) / len(devices))
    shards = []
    for i, device in enumerate(devices):
        part = slice(i * per_device, (i + 1) * per_device)
        if len(data[part]) == 0:
            continue
        shards.append(
            DeviceShard(
                device.send_tensor(data[part].contiguous()),
                device.send_tensor(targets[part].contiguous()),
                len(data[part]),
            )
        )
    for shard in shards:
        shard.data.wait()
        shard.targets.wait()
    return FederatedDataset(shards)


class FederatedDataLoader:
    """Batches of a :class:`FederatedDataset` as ``(data_ptr, target_ptr)``, device by device.

    Each batch is cut on its device (one ``index_select`` per tensor, no waiting); the
    pointers' ``.location`` tells where to send the model. Shuffling permutes indices
    within each shard on the server, which knows only the shard lengths.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> from torch.utils.data import TensorDataset
    >>> with fp.connect() as fleet:
    ...     bob, alice = fleet.device("bob"), fleet.device("alice")
    ...     ds = TensorDataset(torch.arange(8.0).reshape(4, 2), torch.arange(4))
    ...     loader = fp.FederatedDataLoader(fp.federate(ds, (bob, alice)), batch_size=2)
    ...     [(data.location.id, target.get().tolist()) for data, target in loader]
    [('bob', [0, 1]), ('alice', [2, 3])]
    """

    def __init__(
        self,
        federated_dataset: FederatedDataset,
        batch_size: int = 8,
        shuffle: bool = False,
        *,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        **ignored: Any,
    ) -> None:
        if not isinstance(federated_dataset, FederatedDataset):
            raise PlanInputError(
                "FederatedDataLoader takes a FederatedDataset: call fp.federate(dataset, "
                "devices) (or dataset.federate(devices) when hooked) first"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.federated_dataset = federated_dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.dataset = federated_dataset  # DataLoader's attribute name, for len(loader.dataset)

    def _batches(self, shard: DeviceShard) -> int:
        if self.drop_last:
            return shard.length // self.batch_size
        return math.ceil(shard.length / self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches(shard) for shard in self.federated_dataset.shards)

    def __iter__(self) -> Iterator[tuple[PointerTensor, PointerTensor]]:
        for shard in self.federated_dataset.shards:
            if self.shuffle:
                order = torch.randperm(shard.length, generator=self.generator)
            else:
                order = torch.arange(shard.length)
            for b in range(self._batches(shard)):
                index = order[b * self.batch_size : (b + 1) * self.batch_size]
                device = shard.location
                yield (
                    device.run_op("torch.index_select", (shard.data, 0, index)),
                    device.run_op("torch.index_select", (shard.targets, 0, index)),
                )


__all__ = ["DeviceShard", "FederatedDataLoader", "FederatedDataset", "federate"]
