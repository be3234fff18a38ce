"""The FedAvg task on fedplan: one traced training plan per device, embedded or RabbitMQ."""

from __future__ import annotations

import argparse
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import torch
from fedavg_task import (
    BATCH,
    LR,
    N_CLIENTS,
    ROUNDS,
    Net,
    Timeline,
    central_eval,
    emit,
    initial_model,
    load_task,
    task_threads,
    warm_up_sgd,
)


class Vhost:
    """A RabbitMQ vhost of this run's own (deleted at the end) through the management API."""

    def __init__(self) -> None:
        from broker_config.management import ManagementClient
        from broker_config.settings import Settings

        self.name = f"fedplan-bench-{secrets.token_hex(4)}"
        base = Settings.from_env()
        self.admin = ManagementClient.from_settings(base)
        parts = urlsplit(base.broker_url)
        self.url = urlunsplit(parts._replace(path="/" + quote(self.name, safe="")))

    def __enter__(self) -> Vhost:
        q = self.admin.q
        self.admin.request("PUT", f"vhosts/{q(self.name)}", {})
        self.admin.request(
            "PUT",
            f"permissions/{q(self.name)}/{q(self.admin.user)}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.admin.request("DELETE", f"vhosts/{self.admin.q(self.name)}")


def run(transport: str) -> dict[str, object]:
    import producer as fp
    from producer.fl.demo import DeviceData, Workers, spawn_workers
    from producer.fl.job import FederatedJob
    from producer.fl.participants import PlanParticipant
    from producer.fl.rounds import RoundPolicy
    from producer.fl.strategy import FedAvg
    from producer.fl.training import TrainingSpec, build_training_plan

    tl = Timeline(f"fedplan {transport}")
    x_train, y_train, x_test, y_test, parts = load_task()
    net = initial_model()
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    threads = task_threads()
    warm_up_sgd()
    spec = TrainingSpec(lr=LR, batch_size=BATCH, epochs=1)
    shares = []
    for k in range(N_CLIENTS):
        idx = torch.from_numpy(parts[k])
        empty = torch.zeros(0)
        shares.append(DeviceData(f"client-{k}", x_train[idx], y_train[idx], empty, empty))
    workers = Workers()
    plan = build_training_plan(net, spec)  # one loop plan serves every device
    vhost: Vhost | None = None
    tmp = Path(tempfile.mkdtemp(prefix="fedplan-bench-"))
    if transport == "rabbitmq":
        from schemas.plan_codec import plan_content_hash

        # Devices are private by default: approve the training plan by hash, as
        # `fedplan demo` does.
        approved = [plan_content_hash(plan.ir)]
        vhost = Vhost().__enter__()
        workers = spawn_workers(shares, tmp, vhost.url, approved)
        fleet = fp.connect(vhost.url, timeout=120.0)
    else:
        fleet = fp.connect()
    executor = ThreadPoolExecutor(2 * N_CLIENTS)
    evaluator = Net()
    try:

        def plan_for(n: int) -> object:
            return plan

        participants = []
        for share in shares:
            if transport == "rabbitmq":
                device = fleet.device(share.device_id)
            else:
                device = fleet.device(share.device_id, data=share.tagged()[:2])
            participants.append(PlanParticipant(device, plan_for, executor=executor))

        def evaluate(w: dict[str, torch.Tensor]) -> tuple[float, float]:
            acc, loss = central_eval(evaluator, w, x_test, y_test)
            tl.mark(acc, loss)
            return loss, acc

        job = FederatedJob(
            participants=participants,
            strategy=FedAvg(),
            evaluate=evaluate,
            policy=RoundPolicy(deadline=120.0, quorum=1.0),
        )
        job.run(weights, ROUNDS)
    finally:
        executor.shutdown(wait=False)
        fleet.close()
        workers.stop()
        if vhost is not None:
            vhost.__exit__()
    tl.notes = "8 Celery worker processes (prefork -c 1)" if transport == "rabbitmq" else ""
    tl.notes += f"; torch intra-op threads {threads}".lstrip("; ")
    return tl.report()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=("embedded", "rabbitmq"), default="embedded")
    emit(run(parser.parse_args().transport))


if __name__ == "__main__":
    main()
