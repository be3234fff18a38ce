"""FedBuff: staleness maths by hand, the event loop on eager devices, resume, silent devices."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from producer.fl.buffered import FedBuff, StalenessPolicy, fold_updates, staleness_weight
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant
from producer.fl.rounds import Deliver, FitReply, FitTask, RoundPolicy
from producer.fl.strategy import FitResult
from producer.fl.training import TrainingSpec, evaluate, get_weights, sample_order, train_eager
from schemas.errors import FedplanError

SPEC = TrainingSpec(lr=0.2, batch_size=8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _parts(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 6, generator=g) * 2
    out = []
    for k in range(n):
        y = torch.randint(0, 3, (20 + 3 * k,), generator=g)
        out.append((centers[y] + torch.randn(len(y), 6, generator=g), y))
    return out


def _eager(executor: ThreadPoolExecutor | None = None) -> list[EagerParticipant]:
    net = _net()
    return [
        EagerParticipant(f"d{k}", net, SPEC, x, y, executor=executor)
        for k, (x, y) in enumerate(_parts())
    ]


def test_the_default_staleness_weight_is_one_over_the_square_root_of_one_plus_staleness() -> None:
    assert [staleness_weight(s) for s in (0, 1, 3, 8, 15)] == [1.0, 2**-0.5, 0.5, 1 / 3, 0.25]
    assert StalenessPolicy(exponent=1.0).weight(4) == 0.2  # polynomial option: 1/(1+s)
    assert StalenessPolicy(exponent=0.0).weight(7) == 1.0
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1)
    with pytest.raises(ValueError, match="exponent"):
        StalenessPolicy(exponent=-0.5)


def test_a_fold_adds_the_staleness_weighted_mean_update_scaled_by_the_server_rate() -> None:
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    d1 = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([4.0])}  # staleness 0: weight 1
    d2 = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([-8.0])}  # staleness 3: weight 1/2
    got = FedBuff(buffer_size=2, server_lr=0.5).fold(w, [(d1, 0), (d2, 3)])
    # by hand: w + 0.5 / 2 * (1 * d1 + 0.5 * d2)
    assert got["a"].tolist() == [1.0 + 0.25 * 2.0, 2.0 + 0.25 * 2.0]
    assert got["b"].tolist() == [0.25 * (4.0 - 4.0)]
    same = fold_updates(w, [(d1, 1.0), (d2, 0.5)], server_lr=0.5, buffer_size=2)
    assert all(torch.equal(same[k], got[k]) for k in w)


def test_the_max_staleness_accepts_up_to_and_including_the_bound() -> None:
    policy = StalenessPolicy(max_staleness=1)
    assert [policy.accepts(s) for s in (0, 1, 2)] == [True, True, False]
    assert StalenessPolicy().accepts(10**6)


def test_fedbuff_with_one_device_at_a_time_and_a_buffer_of_one_is_sequential_eager_training() -> (
    None
):
    members = _eager()
    job = FederatedJob(
        participants=members, strategy="fedavg", mode="fedbuff", buffer_size=1, concurrency=1
    )
    result = job.run(get_weights(_net()), num_rounds=5)

    scratch, w = _net(), get_weights(_net())
    fits = [r for r in result.devices if r.phase == "fit"]
    assert [r.model_version for r in fits] == [0, 1, 2, 3, 4]
    assert [r.staleness for r in fits] == [0] * 5
    for number, row in zip([e[0] for e in result.arrivals], fits, strict=True):
        k = int(row.device_id[1:])
        x, y = _parts()[k]
        w, _ = train_eager(scratch, SPEC, w, x, y, sample_order(len(x), 1000 * (number + 1) + k))
    assert all(torch.allclose(result.weights[k], w[k], atol=1e-6) for k in w)


def test_updates_trained_on_an_older_version_are_recorded_with_their_staleness() -> None:
    executor = ThreadPoolExecutor(4)
    try:
        result = FederatedJob(
            participants=_eager(executor),
            strategy=FedBuff(buffer_size=2, concurrency=4),
            evaluate=lambda w: evaluate(_net(), w, *_parts(1)[0]),
        ).run(get_weights(_net()), num_rounds=6)
    finally:
        executor.shutdown()
    fits = [r for r in result.devices if r.phase == "fit" and r.status == "ok"]
    assert len(fits) == 12 and {r.round for r in fits} == set(range(1, 7))
    assert all(r.staleness == r.round - 1 - r.model_version for r in fits)
    assert max(r.staleness for r in fits) >= 1  # 4 in flight, a fold every 2: some are stale
    assert [m.round for m in result.history] == list(range(7))
    assert result.history[-1].test_loss < result.history[0].test_loss
    assert all(m.mean_staleness >= 0 for m in result.history[1:])


def test_updates_staler_than_the_bound_are_dropped_and_counted_not_folded() -> None:
    strategy = FedBuff(buffer_size=1, concurrency=3, staleness=StalenessPolicy(max_staleness=0))
    result = FederatedJob(participants=_eager(), strategy=strategy).run(
        get_weights(_net()), num_rounds=3
    )
    stale = [r for r in result.devices if r.status == "stale"]
    assert stale and all(r.staleness > 0 for r in stale)
    assert sum(m.stale_dropped for m in result.history) == len(stale)
    ok = [r for r in result.devices if r.status == "ok"]
    assert len(ok) == 3 and all(r.staleness == 0 for r in ok)


class Silent:
    """A device that takes every task and never answers."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.asked = 0

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        self.asked += 1


class Slow(EagerParticipant):
    """An eager device that takes 0.1 s per task."""

    def _fit(self, task: FitTask) -> FitReply:
        time.sleep(0.1)
        return super()._fit(task)


def test_a_device_that_never_answers_times_out_and_the_others_keep_folding() -> None:
    executor = ThreadPoolExecutor(4)
    silent = Silent("mute")
    net = _net()
    slow = [Slow(f"d{k}", net, SPEC, x, y, executor=executor) for k, (x, y) in enumerate(_parts(3))]
    try:
        result = FederatedJob(
            participants=[silent, *slow],
            strategy=FedBuff(buffer_size=2, concurrency=4),
            policy=RoundPolicy(deadline=0.5),
        ).run(get_weights(net), num_rounds=12)
    finally:
        executor.shutdown()
    assert result.history[-1].round == 12  # 24 updates of 0.1 s, 3 at a time: > 0.5 s
    mute = [r for r in result.devices if r.device_id == "mute"]
    assert silent.asked >= 1 and mute and all(r.status == "timeout" for r in mute)
    assert len(mute) == silent.asked or len(mute) == silent.asked - 1  # the last may be open
    assert sum(m.failures for m in result.history) >= len(mute)


class Hostile:
    """Answers every task with weights holding a NaN and a claim of many examples."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        w = {k: torch.full_like(v, float("nan")) for k, v in task.instructions.weights.items()}
        deliver(FitReply(task.task_id, self.device_id, FitResult(self.device_id, w, 10**9)))


def test_a_non_finite_update_is_an_error_and_never_reaches_the_model() -> None:
    result = FederatedJob(
        participants=[Hostile("bad"), *_eager()[:2]], strategy=FedBuff(buffer_size=2)
    ).run(get_weights(_net()), num_rounds=4)
    assert all(torch.isfinite(t).all() for t in result.weights.values())
    bad = [r for r in result.devices if r.device_id == "bad"]
    assert bad and all(r.status == "error" and "non-finite" in r.error for r in bad)


class Crash(BaseException):
    """The producer dying (not an error a device could cause)."""


class CrashAfter:
    """Delivers normally, then raises (a producer crash) on its ``after``-th task."""

    def __init__(self, inner: EagerParticipant, counter: list[int], after: int) -> None:
        self.inner, self.counter, self.after = inner, counter, after
        self.device_id = inner.device_id

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        self.counter[0] += 1
        if self.counter[0] == self.after:
            raise Crash
        self.inner.start_fit(task, deliver)


def test_a_run_crashed_between_checkpoints_and_resumed_on_the_same_arrivals_is_exact(
    tmp_path: Path,
) -> None:
    executor = ThreadPoolExecutor(4)
    try:  # live: real asynchrony decides the arrival order
        full = FederatedJob(
            participants=_eager(executor), strategy=FedBuff(buffer_size=3, concurrency=3)
        ).run(get_weights(_net()), num_rounds=6)
    finally:
        executor.shutdown()
    numbers = [e[0] for e in full.arrivals]
    assert len(numbers) == len(set(numbers)) == 18

    counter = [0]
    crashing = [CrashAfter(p, counter, 11) for p in _eager()]
    job = FederatedJob(
        participants=crashing,
        strategy=FedBuff(buffer_size=3, concurrency=3),
        checkpoint_dir=tmp_path,
        arrival_log=full.arrivals,
    )
    with pytest.raises(Crash):  # mid-way between the checkpoints of versions 2 and 3
        job.run(get_weights(_net()), num_rounds=6)
    resumed = FederatedJob(
        participants=_eager(),
        strategy=FedBuff(buffer_size=3, concurrency=3),
        checkpoint_dir=tmp_path,
        arrival_log=full.arrivals,
    ).run(get_weights(_net()), num_rounds=6, resume=True)

    assert 0 < resumed.resumed_from < 6
    assert resumed.arrivals == full.arrivals  # every update folded once, none twice
    assert all(torch.equal(resumed.weights[k], full.weights[k]) for k in full.weights)
    assert [m.round for m in resumed.history] == list(range(7))


def test_a_replay_of_another_jobs_arrival_log_is_refused() -> None:
    log = [[999, "ok"]]
    job = FederatedJob(participants=_eager(), strategy=FedBuff(buffer_size=1), arrival_log=log)
    with pytest.raises(FedplanError, match="not in flight"):
        job.run(get_weights(_net()), num_rounds=1)


def test_fedbuff_mode_refuses_a_strategy_that_cannot_run_asynchronously() -> None:
    with pytest.raises(FedplanError, match="asynchronously"):
        FederatedJob(participants=[], strategy="fedadam", mode="fedbuff")
    job = FederatedJob(participants=[], strategy="fedbuff", strategy_options={"buffer_size": 4})
    assert job.mode == "fedbuff" and isinstance(job.strategy, FedBuff)
    assert job.strategy.buffer_size == 4
    by_fields = FederatedJob(
        participants=[],
        strategy="fedbuff",
        buffer_size=3,
        concurrency=5,
        staleness=StalenessPolicy(exponent=1.0, max_staleness=2),
    ).strategy
    assert isinstance(by_fields, FedBuff)
    assert (by_fields.buffer_size, by_fields.concurrency) == (3, 5)
    assert by_fields.staleness == StalenessPolicy(exponent=1.0, max_staleness=2)


def test_deliveries_from_many_threads_at_once_are_each_folded_once() -> None:
    executor = ThreadPoolExecutor(8)
    barrier = threading.Barrier(4, timeout=30)

    class Together(EagerParticipant):
        def _fit(self, task: FitTask) -> FitReply:
            if task.server_round == 0:
                barrier.wait()  # the first four answer at the same moment
            return super()._fit(task)

    net = _net()
    members = [
        Together(f"d{k}", net, SPEC, x, y, executor=executor) for k, (x, y) in enumerate(_parts())
    ]
    try:
        result = FederatedJob(participants=members, strategy=FedBuff(buffer_size=2)).run(
            get_weights(net), num_rounds=4
        )
    finally:
        executor.shutdown()
    numbers = [e[0] for e in result.arrivals]
    assert len(numbers) == len(set(numbers))
    assert sum(r.status == "ok" for r in result.devices) == 8


def test_a_checkpointed_state_restores_each_versions_weights_in_the_models_order(
    tmp_path: Path,
) -> None:
    from producer.fl.buffered import Assignment, BufferState
    from producer.fl.checkpoint import Checkpoint, load_latest, save_checkpoint

    old = {"z.weight": torch.ones(2), "a.bias": torch.zeros(1)}  # not in sorted order
    new = {"z.weight": torch.full((2,), 2.0), "a.bias": torch.ones(1)}
    st = BufferState(version=3, dispatched=9)
    st.in_flight[7] = Assignment(7, 1, "d1", 2, 8001)
    st.bases[2] = old
    st.prune_bases(new)
    save_checkpoint(tmp_path, Checkpoint(3, new, st.tensors(), {"fedbuff": st.to_metadata()}))
    ck = load_latest(tmp_path)
    assert ck is not None
    back = BufferState.restore(ck.metadata["fedbuff"], ck.strategy_state, list(ck.weights))
    assert list(back.bases[2]) == ["z.weight", "a.bias"]
    assert all(torch.equal(back.bases[2][k], old[k]) for k in old)
    assert back.in_flight == st.in_flight and back.dispatched == 9 and 3 not in back.bases


def test_pace_steering_keeps_an_offline_device_out_of_fedbuff_sampling() -> None:
    from producer.fl.pace import DeviceLoad, PaceSteering, StaticProbe

    members = _eager()
    loads = {p.device_id: DeviceLoad(p.device_id, 0, 1) for p in members}
    loads["d2"] = DeviceLoad("d2", 0, 0)  # no consumer: offline
    job = FederatedJob(
        participants=members,
        strategy=FedBuff(buffer_size=2, concurrency=2),
        pace=PaceSteering(StaticProbe(loads)),
    )
    result = job.run(get_weights(_net()), num_rounds=4)
    asked = {r.device_id for r in result.devices}
    assert asked == {"d0", "d1", "d3"}
