"""A device reseeds torch from the OS before every command: no replayed or predictable noise."""

from __future__ import annotations

import os

import torch
from celery import signals

from consumer.worker.celery_app import make_app
from consumer.worker.entropy import reseed_from_os


def test_every_command_starts_from_a_seed_the_server_did_not_see() -> None:
    make_app()  # connects the handler, as a worker does
    torch.manual_seed(0)  # a state an attacker knows (or a previous plan revealed)
    known = torch.rand(8)
    torch.manual_seed(0)
    signals.task_prerun.send(sender=None, task_id="t", task=None, args=(), kwargs={})
    assert not torch.equal(torch.rand(8), known)


def test_forked_children_that_reseed_draw_different_numbers() -> None:
    torch.manual_seed(0)  # the parent's state every prefork child starts from
    draws = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a pool child: reseed as before a command, then draw
            os.close(read)
            reseed_from_os()
            os.write(write, torch.rand(4).numpy().tobytes())
            os._exit(0)
        os.close(write)
        draws.append(os.read(read, 64))
        os.close(read)
        os.waitpid(pid, 0)
    assert len(draws[0]) == 16 and draws[0] != draws[1]
