"""``fedplan status`` against a real broker: the summary line, filters and backlog sorting."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
import torch

from broker_config import names
from producer.cli.main import main
from producer.transport.amqp import AmqpTransport
from schemas.wire import new_id
from tests.integration import commands as cmd
from tests.integration.broker import Replies, RunVhost, WorkerProcess

pytestmark = pytest.mark.rabbitmq


def test_status_of_a_small_real_fleet_summarises_filters_and_sorts_by_backlog(
    vhost: RunVhost,
    workers: Callable[..., WorkerProcess],
    transport: AmqpTransport,
    replies: Replies,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tag = secrets.token_hex(3)
    up, idle, busy = f"up-{tag}", f"idle-{tag}", f"busy-{tag}"
    workers(up)
    for d in (up, idle, busy):
        transport.ensure_device(d)
    for n, device in ((1, idle), (3, busy)):  # no worker: the commands wait in the queue
        for _ in range(n):
            cid = new_id()
            transport.publish(
                device, cmd.store_object(cid, device, "x", torch.ones(1)), command_id=cid
            )
    cid = new_id()
    transport.publish(up, cmd.store_object(cid, up, "x", torch.ones(1)), command_id=cid)
    assert replies.wait(cid, 120).WhichOneof("outcome") == "ok"
    vhost.wait_queue(names.device_queue(busy), messages_ready=3, timeout=60)
    vhost.wait_queue(names.device_queue(idle), messages_ready=1, timeout=60)
    api = vhost.client.api_url
    argv = ["status", "--url", vhost.url, "--api", api, "--device", f"*-{tag}"]
    assert main([*argv, "--sort", "backlog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 devices: 1 online, 2 offline; backlog 4 commands on 2 devices")
    assert [line.split()[0] for line in lines[2:]] == [busy, idle, up]
    assert main([*argv, "--offline", "--backlogged", "--limit", "1", "--sort", "backlog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == [busy, "offline", "3"]
    assert lines[3] == "... 1 more devices match (--limit 0 shows all)"
    assert main([*argv, "--online"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == [up]
