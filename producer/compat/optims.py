"""``fp.Optims``: one optimizer per device for a model that travels (PySyft's ``Optims``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch.optim import Optimizer

from producer.remote.device import Device


class Optims:
    """Per-device copies of an optimizer, so moment estimates never mix devices' data.

    Each device's optimizer updates the same parameters with the same settings but keeps
    its own state (Adam's moments live on that device while the model is there).

    Examples
    --------
    >>> import torch
    >>> from torch import nn, optim
    >>> model = nn.Linear(2, 1)
    >>> optims = Optims(["bob", "alice"], optim=optim.Adam(model.parameters(), lr=0.1))
    >>> optims.get_optim("bob") is optims.get_optim("alice")
    False
    """

    def __init__(self, workers: Iterable[Device | str], *, optim: Optimizer) -> None:
        self.optim = optim
        self.optimizers: dict[str, Optimizer] = {}
        for worker in workers:
            self.optimizers[_id_of(worker)] = _fresh_copy(optim)

    def get_optim(self, worker: Device | str) -> Optimizer:
        """The optimizer of a device (by id or handle), made on first use."""
        worker_id = _id_of(worker)
        if worker_id not in self.optimizers:
            self.optimizers[worker_id] = _fresh_copy(self.optim)
        return self.optimizers[worker_id]


def _id_of(worker: Device | str) -> str:
    return worker.id if isinstance(worker, Device) else str(worker)


def _fresh_copy(template: Optimizer) -> Optimizer:
    """An optimizer of the same class over the same parameter groups, with empty state."""
    groups = [dict(group) for group in template.param_groups]
    return type(template)(groups, **template.defaults)


__all__ = ["Optims"]
