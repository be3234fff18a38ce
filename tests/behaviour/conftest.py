"""The ``fleet`` fixture, parametrized over transports: every behaviour test runs on each.

To add a transport, add a :class:`TransportCase` to ``TRANSPORTS`` (and a marker if it needs
outside services). ``device_id`` maps a test's device name to the id used on that transport
(unique per run when devices persist, e.g. RabbitMQ queues).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

import producer as fp


@dataclass(frozen=True)
class TransportCase:
    """How to reach devices over one transport."""

    connect: Callable[[], fp.Fleet]
    device_id: Callable[[str], str] = lambda name: name
    after_test: Callable[[], None] = lambda: None
    marks: tuple[pytest.MarkDecorator, ...] = field(default_factory=tuple)


def _connect_rabbitmq() -> fp.Fleet:
    from tests.integration.fleet import connect_rabbitmq  # real Celery workers per device

    return connect_rabbitmq()


def _trim_rabbitmq_workers() -> None:
    from tests.integration.fleet import trim_workers

    trim_workers()


TRANSPORTS: dict[str, TransportCase] = {
    "embedded": TransportCase(connect=lambda: fp.connect(timeout=60)),
    "rabbitmq": TransportCase(
        connect=_connect_rabbitmq,
        after_test=_trim_rabbitmq_workers,
        marks=(pytest.mark.rabbitmq,),
    ),
}


@pytest.fixture(params=[pytest.param(name, marks=case.marks) for name, case in TRANSPORTS.items()])
def transport_case(request: pytest.FixtureRequest) -> TransportCase:
    return TRANSPORTS[request.param]


@pytest.fixture
def fleet(transport_case: TransportCase) -> Iterator[fp.Fleet]:
    """A fleet over each transport in ``TRANSPORTS``, closed after the test."""
    fleet = transport_case.connect()
    try:
        yield fleet
    finally:
        fleet.close()
        transport_case.after_test()


DeviceFactory = Callable[..., fp.Device]


@pytest.fixture
def device(fleet: fp.Fleet, transport_case: TransportCase) -> DeviceFactory:
    """``device(name, data=())``: a device of the fleet, emptied first, holding ``data``."""

    def make(name: str, data: Iterable[torch.Tensor] = ()) -> fp.Device:
        handle = fleet.device(transport_case.device_id(name))
        handle.clear_objects()
        for tensor in data:
            handle.send_tensor(tensor).wait()
        return handle

    return make
