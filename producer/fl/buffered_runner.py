"""The FedBuff event loop: keep ``concurrency`` devices training, fold every K updates.

No round barrier: each reply is one event, handled in the order it is taken from the
shared reply queue (the transports' reply collection delivers into it, as for rounds).
After every event the runner tops the in-flight set back up to ``concurrency`` by
sampling an idle device. An update trained on version ``v`` that arrives when the model is
at version ``V`` has staleness ``V - v``; it is weighted by the strategy's
:class:`~producer.fl.buffered.StalenessPolicy` or dropped beyond ``max_staleness``. A
device that fails or does not answer within ``deadline`` seconds is recorded, its slot is
refilled at once, and it is not sampled again before the next model version.

Determinism ("exact" resume): every choice the runner makes derives from the job seed and
the task counter, never from time, so the final model is a function of the **arrival
order** alone. Each processed event is appended to the arrival log (``[task number,
kind]``). A checkpoint written after a fold holds the whole state
(:class:`~producer.fl.buffered.BufferState`); a resumed run re-sends the checkpointed
in-flight assignments unchanged (same device, base version, sample-order seed) and
discards whatever the crashed process received after its last checkpoint, so each update
is folded at most once. Given the same arrival order (``replay``: the arrival log of
another run), a resumed run ends at the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import math
import queue
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from producer.fl.aggregate import Weights, delta
from producer.fl.buffered import Assignment, BufferState, FedBuff
from producer.fl.evaluation import DeviceMetrics
from producer.fl.pace import PaceSteering
from producer.fl.rounds import FitReply, FitTask, Participant
from schemas.errors import FedplanError


@dataclass(slots=True)
class VersionOutcome:
    """What produced one model version: the folded updates and the events since the last."""

    version: int
    rows: list[DeviceMetrics] = field(default_factory=list)
    late_replies: int = 0

    def _ok(self) -> list[DeviceMetrics]:
        return [r for r in self.rows if r.status == "ok"]

    @property
    def failures(self) -> int:
        return sum(r.status in ("error", "timeout") for r in self.rows)

    @property
    def stale_dropped(self) -> int:
        return sum(r.status == "stale" for r in self.rows)

    def train_loss(self) -> float:
        """Example-weighted mean local loss of the folded updates."""
        ok = self._ok()
        total = sum(r.num_examples for r in ok)
        return sum(r.loss * r.num_examples for r in ok) / total if total else float("nan")

    def mean_staleness(self) -> float:
        ok = self._ok()
        return sum(r.staleness for r in ok) / len(ok) if ok else float("nan")


OnVersion = Callable[[VersionOutcome, Weights, BufferState], None]


@dataclass(slots=True)
class BufferedRunner:
    """Runs FedBuff over participants until the model reaches a version.

    ``replay`` is an arrival log (``[task number, kind]`` pairs) to follow instead of the
    live order: replies are held until the logged one arrives and logged timeouts are
    applied without waiting. Past its end the runner continues live.

    Examples
    --------
    >>> from producer.fl.participants import EagerParticipant
    >>> from producer.fl.training import TrainingSpec, get_weights
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Linear(2, 2)
    >>> devices = [EagerParticipant(f"d{k}", net, TrainingSpec(batch_size=4), torch.randn(8, 2),
    ...                             torch.tensor([0, 1] * 4)) for k in range(3)]
    >>> runner = BufferedRunner(devices, FedBuff(buffer_size=2, concurrency=2))
    >>> _ = runner.run(get_weights(net), 3, lambda outcome, weights, state: None)
    >>> runner.state.version, len(runner.state.arrivals)
    (3, 6)
    """

    participants: Sequence[Participant]
    strategy: FedBuff
    deadline: float = 60.0
    seed: int = 0
    pace: PaceSteering | None = None
    replay: Sequence[Sequence[object]] = ()
    state: BufferState = field(default_factory=BufferState)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    late_replies: int = 0
    _replies: queue.Queue[FitReply] = field(default_factory=queue.Queue)
    _numbers: dict[str, int] = field(default_factory=dict)
    _sent: dict[int, float] = field(default_factory=dict)
    _stash: dict[int, FitReply] = field(default_factory=dict)

    def run(self, weights: Weights, until: int, on_version: OnVersion) -> Weights:
        """Fold updates until version ``until``; ``on_version`` runs after every fold."""
        st = self.state
        done = len(st.arrivals)
        if self.replay and [list(e) for e in self.replay[:done]] != st.arrivals:
            raise FedplanError(
                "the arrival log to replay does not start with the events this run already "
                "processed; replay the log of the same job"
            )
        position = done
        st.prune_bases(weights)
        for a in sorted(st.in_flight.values(), key=lambda a: a.number):
            self._send(a)  # resumed: the same assignments, again
        buffer: list[tuple[Weights, int]] = []
        outcome = VersionOutcome(st.version + 1)
        while st.version < until:
            self._fill()
            if position < len(self.replay):
                number, reply = self._replayed(self.replay[position])
                position += 1
            else:
                number, reply = self._live()
            folded = self._handle(number, reply, buffer, outcome)
            if folded is None:
                continue
            weights = self.strategy.fold(weights, buffer)
            buffer.clear()
            st.version += 1
            st.folded += self.strategy.buffer_size
            st.prune_bases(weights)
            outcome.late_replies, self.late_replies = self.late_replies, 0
            on_version(outcome, weights, st)
            outcome = VersionOutcome(st.version + 1)
        return weights

    def _limit(self) -> int:
        return min(self.strategy.concurrency or len(self.participants), len(self.participants))

    def _idle(self) -> list[int]:
        st = self.state
        busy = {a.device_index for a in st.in_flight.values()}
        allowed: Sequence[int] = range(len(self.participants))
        if self.pace is not None:
            ok = set(self.pace.eligible([p.device_id for p in self.participants])[0])
            allowed = [i for i in allowed if self.participants[i].device_id in ok]
        return [i for i in allowed if i not in busy and st.cooldown.get(i, -1) < st.version]

    def _fill(self) -> None:
        """Sample idle devices until ``concurrency`` train (deterministic in the counter)."""
        st = self.state
        waited_until = time.monotonic() + self.deadline
        while len(st.in_flight) < self._limit():
            idle = self._idle()
            if not idle and not st.in_flight and st.cooldown:
                st.cooldown.clear()  # only failed devices are left: try them again
                continue
            if not idle:
                if st.in_flight:
                    return
                if time.monotonic() > waited_until:
                    raise FedplanError(
                        f"no device could be sampled for {self.deadline:.0f}s (all offline or "
                        "backlogged); start devices or check pace steering"
                    )
                time.sleep(0.5)
                continue
            n = st.dispatched
            st.dispatched += 1
            index = random.Random(f"{self.seed}/fedbuff/{n}").choice(idle)
            a = Assignment(
                number=n,
                device_index=index,
                device_id=self.participants[index].device_id,
                version=st.version,
                seed=1000 * (n + 1) + index,
            )
            st.in_flight[n] = a
            self._send(a)

    def _send(self, a: Assignment) -> None:
        part = self.participants[a.device_index]
        task = FitTask(
            task_id=f"{self.run_id}-b{a.number}",
            device_id=part.device_id,
            device_index=a.device_index,
            server_round=a.version,
            attempt=1,
            seed=a.seed,
            instructions=self.strategy.configure_fit(a.version, self.state.bases[a.version]),
        )
        self._numbers[task.task_id] = a.number
        self._sent[a.number] = time.monotonic()
        try:
            part.start_fit(task, self._replies.put)
        except Exception as exc:  # a device that cannot even be asked: an error event
            self._replies.put(FitReply(task.task_id, part.device_id, error=_describe(exc)))

    def _take(self, timeout: float) -> tuple[int, FitReply] | None:
        """The next reply of an in-flight task (others are late), or ``None`` on timeout."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                reply = self._replies.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return None
            number = self._numbers.get(reply.task_id)
            if number is None or number not in self.state.in_flight:
                self.late_replies += 1  # a task that timed out, or another run's
                continue
            return number, reply

    def _live(self) -> tuple[int, FitReply | None]:
        """The next event in arrival order: a reply, or the first expired task (timeout)."""
        if self._stash:
            number = next(iter(self._stash))
            return number, self._stash.pop(number)
        while True:
            soonest = min(self._sent[n] for n in self.state.in_flight) + self.deadline
            got = self._take(soonest - time.monotonic())
            if got is not None:
                return got
            now = time.monotonic()
            expired = [
                n for n in sorted(self.state.in_flight) if self._sent[n] + self.deadline <= now
            ]
            if expired:
                return expired[0], None

    def _replayed(self, entry: Sequence[object]) -> tuple[int, FitReply | None]:
        """The event the arrival log names next: its reply (waited for) or its timeout."""
        number, kind = int(str(entry[0])), str(entry[1])
        if number not in self.state.in_flight:
            raise FedplanError(
                f"the arrival log names task {number}, which is not in flight in this run; "
                "replay only the log of the same job (same settings, seed and devices)"
            )
        if kind == "timeout":
            return number, None
        if number in self._stash:
            return number, self._stash.pop(number)
        while True:
            got = self._take(self._sent[number] + self.deadline - time.monotonic())
            if got is None:
                raise FedplanError(
                    f"task {number} of the arrival log did not answer in {self.deadline:.0f}s"
                )
            if got[0] == number:
                return got
            self._stash[got[0]] = got[1]

    def _handle(
        self,
        number: int,
        reply: FitReply | None,
        buffer: list[tuple[Weights, int]],
        outcome: VersionOutcome,
    ) -> bool | None:
        """Apply one event; ``True`` when the buffer is full and must be folded."""
        st = self.state
        a = st.in_flight.pop(number)
        seconds = time.monotonic() - self._sent.pop(number)
        staleness = st.version - a.version
        row = DeviceMetrics(
            outcome.version,
            a.device_id,
            "fit",
            "ok",
            seconds=seconds,
            model_version=a.version,
            staleness=staleness,
        )
        error = _problem(reply, st.bases[a.version])
        if error:
            row.status, row.error = ("timeout" if reply is None else "error"), error
            st.failures += 1
            st.cooldown[a.device_index] = st.version
        else:
            assert reply is not None and reply.result is not None
            row.num_examples = reply.result.num_examples
            row.loss = reply.result.metrics.get("loss", float("nan"))
            if self.strategy.staleness.accepts(staleness):
                buffer.append((delta(reply.result.weights, st.bases[a.version]), staleness))
            else:
                row.status, row.error = "stale", f"staleness {staleness} > max"
                st.stale_dropped += 1
        st.arrivals.append([number, row.status])
        outcome.rows.append(row)
        return True if len(buffer) >= self.strategy.buffer_size else None


def _problem(reply: FitReply | None, base: Weights) -> str:
    """Why a reply cannot be folded ('' when it can)."""
    if reply is None:
        return "no reply in time"
    if reply.result is None:
        return reply.error or "the device reported an error"
    got = reply.result.weights
    if set(got) != set(base) or any(got[k].shape != base[k].shape for k in base):
        return "the update's tensors do not match the model"
    if not all(bool(torch.isfinite(t).all()) for t in got.values()):
        return "the update holds non-finite values"
    if not (reply.result.num_examples > 0 and math.isfinite(reply.result.num_examples)):
        return f"the update claims {reply.result.num_examples} examples"
    return ""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
