"""Two producers with one producer id: the second is refused, the first loses no reply.

Both would consume one results queue: the broker would hand each of them about half of the
replies, and a reply to the other's command is only kept as unclaimed, so the producer that
awaits it times out. The journal's lock lets one process hold a producer id at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import producer as fp
from producer.transport.journal import ProducerIdInUse
from schemas.wire import new_id
from tests.integration.broker import RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def test_a_second_producer_with_an_id_in_use_is_refused_and_takes_no_reply_of_the_first(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    producer_id = f"twin{new_id()[:10]}"
    journal = tmp_path / "journal"
    workers("alice")
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as first:
        alice = first.device("alice")
        second = None
        try:
            with pytest.raises(ProducerIdInUse, match=producer_id):
                second = fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal)
            ptrs = [fp.send(torch.tensor([float(i)]), alice) for i in range(24)]
            got = [float(p.get().item()) for p in ptrs]
        finally:
            if second is not None:
                second.close()
        assert got == [float(i) for i in range(24)]
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=journal) as again:
        assert again.recover() == {}  # closed cleanly: the id is free, nothing in flight


def test_a_second_producer_with_an_id_in_use_on_another_host_is_refused_by_the_broker(
    vhost: RunVhost, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    producer_id = f"twin{new_id()[:10]}"
    workers("alice")
    # another journal dir: as on another host, where the journal's lock cannot see it
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=tmp_path / "a") as first:
        alice = first.device("alice")
        with pytest.raises(ProducerIdInUse, match="is in use"):
            fp.connect(vhost.url, producer_id=producer_id, journal_dir=tmp_path / "b")
        ptrs = [fp.send(torch.tensor([float(i)]), alice) for i in range(12)]
        assert [float(p.get().item()) for p in ptrs] == [float(i) for i in range(12)]
    with fp.connect(vhost.url, producer_id=producer_id, journal_dir=tmp_path / "b") as after:
        assert after.recover() == {}  # the first closed: the id is free
