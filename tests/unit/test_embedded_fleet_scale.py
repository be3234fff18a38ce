"""1,000 embedded devices in one process: one FedAvg round on 100 sampled devices.

The devices share one executor (no thread each); the round's global weights equal those of
the same round run by plain-PyTorch participants on the same rows.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import producer as fp
from consumer.store.base import StoredObject
from producer.fl.data import iid_partition, load_digits
from producer.fl.job import FederatedJob
from producer.fl.participants import EagerParticipant, PlanParticipant
from producer.fl.rounds import RoundPolicy
from producer.fl.training import TrainingSpec, build_training_plan, get_weights
from producer.transport.local import LocalTransport
from schemas.plan_codec import plan_content_hash

DEVICES = 1000
SAMPLED = 100


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_a_thousand_embedded_devices_run_a_fedavg_round_like_plain_pytorch() -> None:
    ds = load_digits()
    parts = iid_partition(len(ds.x_train), DEVICES, seed=0)
    spec = TrainingSpec(lr=0.1, batch_size=32, epochs=1)
    net = _net()
    w0 = get_weights(net)
    plans: dict[int, object] = {}

    def plan_for(n: int) -> object:
        if n not in plans:
            plans[n] = build_training_plan(net, spec, n)
        return plans[n]

    policy = RoundPolicy(fraction=SAMPLED / DEVICES, quorum=1.0, deadline=600.0)
    eager = [
        EagerParticipant(f"d{k}", _net(), spec, ds.x_train[p], ds.y_train[p])
        for k, p in enumerate(parts)
    ]
    expected = FederatedJob(participants=eager, strategy="fedavg", policy=policy, seed=3).run(w0, 1)
    with fp.connect() as fleet, ThreadPoolExecutor(SAMPLED) as executor:
        transport = fleet.transport
        assert isinstance(transport, LocalTransport)
        members = []
        for k, p in enumerate(parts):
            device = fleet.device(f"d{k}")
            runtime = transport.runtime(device.id)
            for i, (rows, kind) in enumerate(((ds.x_train[p], "x"), (ds.y_train[p], "y"))):
                runtime.store.put_object(StoredObject(f"d{k}-{i}", rows.clone(), ("train", kind)))
            plan = plan_for(len(p))
            runtime.policy_source.approve(plan_content_hash(plan.ir))  # type: ignore[attr-defined]
            members.append(PlanParticipant(device, plan_for, executor=executor, timeout=600.0))
        started = time.monotonic()
        got = FederatedJob(participants=members, strategy="fedavg", policy=policy, seed=3).run(
            w0, 1
        )
        seconds = time.monotonic() - started
        device_threads = [t for t in threading.enumerate() if t.name.startswith("fedplan-devices")]
        assert len(device_threads) <= 8, "a thread per device"
    assert got.history[-1].participants == SAMPLED and got.history[-1].failures == 0
    assert sorted(d.device_id for d in got.devices) == sorted(d.device_id for d in expected.devices)
    for name, value in expected.weights.items():
        assert torch.allclose(got.weights[name], value, atol=1e-5), name
    assert not torch.equal(got.weights["0.weight"], w0["0.weight"])
    print(f"1,000 embedded devices: one round on {SAMPLED} sampled in {seconds:.2f} s")
