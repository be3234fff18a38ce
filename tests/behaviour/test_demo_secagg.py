"""`fedplan demo --secagg --dp-epsilon 8` on both transports: the devices hold their shares as
private data and do not approve the update plan, so an update leaves a device only masked,
inside the secure sum; every round's ε is in the metrics and stays within the budget."""

from __future__ import annotations

import csv
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
from producer.fl.progress import ProgressBar, write_metrics
from producer.fl.training import flatten, get_weights
from producer.transport.local import LocalTransport
from schemas.errors import PolicyError

pytestmark = pytest.mark.timeout(900)  # RabbitMQ rounds take minutes on a loaded machine


@pytest.mark.parametrize("clipping", [[], ["--adaptive-clip", "0.5"]], ids=["fixed", "adaptive"])
def test_the_secure_private_demo_trains_within_its_epsilon_budget_on_private_data(
    fleet: fp.Fleet, tmp_path: Path, clipping: list[str]
) -> None:
    args = build_parser().parse_args([
        "demo", "--devices", "3", "--rounds", "2", "--epochs", "1", "--secagg",
        "--dp-epsilon", "8", "--dp-clip", "0.5", "--deadline", "120", "--out", str(tmp_path),
        *clipping,
    ])
    setup = prepare(args)
    run = secrets.token_hex(3)
    for share in setup.shares:
        share.device_id = f"{share.device_id}-{run}"
    plans = training_plans(setup, device_eval=args.device_eval)
    embedded = isinstance(fleet.transport, LocalTransport)
    approved = plan_hashes(plans, secure=True)
    assert len(approved) < len(plans)  # the update plans are not approved
    if not embedded:
        from tests.integration.fleet import data_dir

        for share in setup.shares:
            fleet.device(share.device_id)
            install_share(SqliteStore(data_dir(share.device_id)), share)
            PolicyFile(data_dir(share.device_id)).update(approve=approved)
    executor = ThreadPoolExecutor(4)
    try:
        members = participants(args, setup, fleet, executor, spawned=not embedded, plans=plans)
        with ProgressBar(args.rounds) as bar:
            job = make_job(args, setup, members, bar)
            start = get_weights(setup.model)
            result = job.run(start, args.rounds)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    assert [m.round for m in result.history] == [0, 1, 2]
    assert [m.participants for m in result.history[1:]] == [3, 3]
    fits = [r for r in result.devices if r.phase == "fit"]
    assert sorted({r.device_id for r in fits}) == sorted(m.device_id for m in members)
    assert {r.status for r in fits} == {"ok"}
    epsilons = [m.epsilon for m in result.history[1:]]
    assert 0 < epsilons[0] < epsilons[1] <= 8.0
    assert job.accountant is not None
    assert epsilons == [job.accountant.epsilon_after(r) for r in (1, 2)]
    assert not (flatten(result.weights) == flatten(start)).all()
    clip_norms = [o.results[0].metrics.get("clip_norm") for o in result.outcomes]
    if clipping:  # the clip norm moved after round 1, from a noised secure count
        assert clip_norms[0] == 0.5 and clip_norms[1] not in (None, 0.5)
    else:
        assert clip_norms == [None, None]
    write_metrics(result.history, tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["epsilon"]) == pytest.approx(epsilons[-1])
    if embedded:
        audit = fleet.transport.runtime(members[0].device_id).audit.entries()
        assert "secure-aggregation" in {e.rule for e in audit if e.kind == "secagg_mask"}
    for member in members:
        with pytest.raises(PolicyError):
            member.x.get()
