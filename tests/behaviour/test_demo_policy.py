"""The main job under the default policy, on both transports: the demo's devices hold their
shares as private data, approve the training plan by hash, and only model updates leave;
a ``get()`` of the training data by the demo's own producer is refused."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import producer as fp
from consumer.policy.rules import PolicyFile
from consumer.store.sqlite import SqliteStore
from producer.cli.main import build_parser
from producer.fl.demo import (
    install_share,
    make_job,
    participants,
    plan_hashes,
    prepare,
    training_plans,
)
from producer.fl.progress import ProgressBar
from producer.fl.training import get_weights
from producer.transport.local import LocalTransport
from schemas.errors import PolicyError


def test_the_demo_trains_on_private_data_and_its_training_data_cannot_be_fetched(
    fleet: fp.Fleet, tmp_path: Path
) -> None:
    args = build_parser().parse_args(
        ["demo", "--devices", "2", "--rounds", "2", "--epochs", "1", "--out", str(tmp_path)]
    )
    setup = prepare(args)
    run = secrets.token_hex(3)
    for share in setup.shares:
        share.device_id = f"{share.device_id}-{run}"  # devices of this test only
    plans = training_plans(setup)
    embedded = isinstance(fleet.transport, LocalTransport)
    if not embedded:  # the operators of the Celery devices: data and approval in data dirs
        from tests.integration.fleet import data_dir

        for share in setup.shares:
            fleet.device(share.device_id)  # starts its worker
            install_share(SqliteStore(data_dir(share.device_id)), share)
            PolicyFile(data_dir(share.device_id)).update(approve=plan_hashes(plans))
    executor = ThreadPoolExecutor(4)
    try:
        members = participants(args, setup, fleet, executor, spawned=not embedded, plans=plans)
        with ProgressBar(args.rounds) as bar:
            result = make_job(args, setup, members, bar).run(get_weights(setup.model), 2)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    assert [m.round for m in result.history] == [0, 1, 2]
    assert result.history[-1].test_accuracy > result.history[0].test_accuracy
    for member in members:  # the demo's own producer still cannot take the data
        with pytest.raises(PolicyError) as refused:
            member.x.get()
        assert "private-data" in str(refused.value)
        with pytest.raises(PolicyError):
            (member.x * 1).get()
