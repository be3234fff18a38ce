"""The device's secure-aggregation commands: the four SecAgg+ steps and the round's end.

Each handler loads the sender's round state from the device store, runs one pure step of
:mod:`consumer.secagg.client`, stores the new state and answers with the step's message in
``Ok.secagg``. The state write and the reply are one store unit (the runtime's), so the
state is persisted before the reply leaves, and a redelivered command gets the same reply.

The state lives under a store key no command can name (``@secagg:`` + the sender's scoped
round id): a producer can neither read, overwrite nor delete it except through these steps,
and another producer cannot reach it at all. It is deleted by ``SecAggEnd``, and any state
older than :data:`STATE_TTL` seconds (or beyond :data:`MAX_OPEN_ROUNDS` per producer, the
oldest first) is deleted when a new round starts.

The mask step is the only way a private value (one computed from the device's private data,
e.g. the training plan's update) leaves the device without an approved plan: clipped,
quantized, noised and masked, so the server learns it only inside a sum of at least
``min_survivors`` devices. The audit log records it under the rule ``secure-aggregation``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from consumer.policy.tenancy import PRIVATE_TAG, is_device_data, scoped
from consumer.secagg import client
from consumer.secagg.client import ClientState
from consumer.secagg.errors import SecAggError, SecAggProtocolError
from consumer.secagg.messages import KeyAdvert, RoundConfig
from consumer.secagg.state_codec import state_from_bytes, state_to_bytes
from consumer.secagg.wire_codec import (
    config_from_proto,
    mask_request_from_proto,
    reply_to_proto,
    share_request_from_proto,
    unmask_request_from_proto,
)
from consumer.store.base import StoredObject
from schemas.command_pb2 import Command, Ok
from schemas.errors import ObjectNotFound, PolicyError

if TYPE_CHECKING:
    from consumer.runtime.device import DeviceRuntime

STATE_TAG = "fedplan:secagg-state"
"""Reserved tag of a stored round state (never visible to producers)."""
STATE_TTL = 24 * 3600.0
"""Seconds a round's state is kept without a ``SecAggEnd`` (then deleted)."""
MAX_OPEN_ROUNDS = 16
"""Round states one producer may hold on a device; starting another drops the oldest."""
MIN_SURVIVORS = 2
"""The smallest sum a device releases a private value into (a sum of one is the value)."""
RELEASE_RULE = "secure-aggregation"
"""The audit rule of a private value released masked into a secure sum."""


def state_key(sender: str, round_id: str) -> str:
    """The store key of ``sender``'s round state (no producer id maps to it)."""
    return f"@secagg:{scoped(sender, round_id)}"


def _load(runtime: DeviceRuntime, round_id: str) -> ClientState:
    key = state_key(runtime.sender, round_id)
    try:
        obj = runtime.store.get_object(key)
    except ObjectNotFound:
        raise SecAggProtocolError(
            f"device {runtime.device_id!r} has no secure-aggregation round {round_id!r} of "
            f"producer {runtime.sender!r} (never started, ended or expired)",
            device_id=runtime.device_id,
        ) from None
    return state_from_bytes(obj.tensor.numpy().tobytes())


def _save(runtime: DeviceRuntime, state: ClientState, started: float) -> None:
    raw = np.frombuffer(state_to_bytes(state), dtype=np.uint8).copy()
    key = state_key(runtime.sender, state.config.round_id)
    runtime.store.put_object(
        StoredObject(key, torch.from_numpy(raw), (PRIVATE_TAG, STATE_TAG), repr(started))
    )


def _started(runtime: DeviceRuntime, round_id: str) -> float:
    obj = runtime.store.get_object(state_key(runtime.sender, round_id))
    try:
        return float(obj.description)
    except ValueError:
        return 0.0


def _expire(runtime: DeviceRuntime, now: float) -> None:
    """Delete expired states (every producer's) and the sender's oldest beyond the cap."""
    mine = state_key(runtime.sender, "")
    open_rounds: list[tuple[float, str]] = []
    for obj in runtime.store.search([STATE_TAG]):
        try:
            started = float(obj.description)
        except ValueError:
            started = 0.0
        if now - started > STATE_TTL:
            runtime.store.delete_object(obj.id)
        elif obj.id.startswith(mine):
            open_rounds.append((started, obj.id))
    open_rounds.sort()
    for _, key in open_rounds[: max(0, len(open_rounds) - MAX_OPEN_ROUNDS + 1)]:
        runtime.store.delete_object(key)


def _check_release(runtime: DeviceRuntime, config: RoundConfig) -> None:
    """The device's rule for releasing a value into a sum: at least two inputs in it."""
    if config.min_survivors < MIN_SURVIVORS or config.threshold < 1:
        runtime._entry.rule = RELEASE_RULE
        raise PolicyError(
            f"a secure sum of at least {config.min_survivors} device(s) would reveal a single "
            f"value; device {runtime.device_id!r} releases values only into sums of at least "
            f"{MIN_SURVIVORS} (rule: {RELEASE_RULE})",
            device_id=runtime.device_id,
        )


def advertise(runtime: DeviceRuntime, command: Command) -> Ok:
    """Step 1: start the round (fresh keys, self-mask seed); reply with the public keys."""
    config = config_from_proto(command.secagg_advertise.config)
    _check_release(runtime, config)
    key = state_key(runtime.sender, config.round_id)
    if runtime.store.has_object(key):  # a second advertise must not re-key the round
        held = _load(runtime, config.round_id)
        if held.config != config or held.stage != "advertised":
            raise SecAggProtocolError(
                f"round {config.round_id!r} was started already on device "
                f"{runtime.device_id!r}; a round is never re-keyed",
                device_id=runtime.device_id,
            )
        state, advert = held, _advert_of(held)
    else:
        now = time.time()
        _expire(runtime, now)
        state, advert = client.advertise_keys(config, runtime.device_id)
        _save(runtime, state, now)
    return Ok(secagg=reply_to_proto(advert))


def share(runtime: DeviceRuntime, command: Command) -> Ok:
    """Step 2: encrypted Shamir shares of the mask key and self-mask seed, per neighbour."""
    request = share_request_from_proto(command.secagg_share)
    state = _load(runtime, request.round_id)
    started = _started(runtime, request.round_id)
    state, message = client.share_keys(state, request)
    _save(runtime, state, started)
    return Ok(secagg=reply_to_proto(message))


def mask(runtime: DeviceRuntime, command: Command) -> Ok:
    """Step 3: clip, quantize, noise and mask the producer's stored value ``input_id``."""
    msg = command.secagg_mask
    request, input_id, weight = mask_request_from_proto(msg)
    state = _load(runtime, request.round_id)
    started = _started(runtime, request.round_id)
    if state.stage == "masked":  # a repeated request: the same reply, nothing read again
        state, message = client.mask_input(state, request, np.zeros(0), weight=weight)
        return Ok(secagg=reply_to_proto(message))
    obj = runtime._lookup(input_id)
    if is_device_data(obj.id):
        raise PolicyError(
            f"{input_id!r} is device data; secure aggregation sums values a plan computed "
            f"(rule: {RELEASE_RULE})",
            device_id=runtime.device_id,
        )
    values = obj.tensor.detach().double().reshape(-1)
    if not torch.isfinite(values).all():
        raise SecAggError("the value to aggregate has NaN or infinity", device_id=runtime.device_id)
    values = _clip(values, msg.clip_norm)
    if runtime._is_private(obj):
        runtime._entry.rule = RELEASE_RULE  # a private value leaves, masked, into a sum
    else:
        runtime._entry.rule = runtime._entry.rule or "own-data"
    state, message = client.mask_input(state, request, values.numpy(), weight=weight)
    _save(runtime, state, started)
    runtime._entry.bytes_out += len(message.vector)
    return Ok(secagg=reply_to_proto(message))


def _clip(values: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """L2 clipping to ``clip_norm`` (0: none), as DP-FedAvg clips each device's update."""
    if clip_norm < 0 or not np.isfinite(clip_norm):
        raise SecAggProtocolError(f"clip_norm must be finite and >= 0, not {clip_norm}")
    if clip_norm == 0:
        return values
    norm = float(torch.linalg.vector_norm(values))
    return values * min(1.0, clip_norm / norm) if norm > 0 else values


def unmask(runtime: DeviceRuntime, command: Command) -> Ok:
    """Step 4: shares of survivors' self-mask seeds and dropped neighbours' mask keys."""
    request = unmask_request_from_proto(command.secagg_unmask)
    state = _load(runtime, request.round_id)
    started = _started(runtime, request.round_id)
    state, message = client.unmask(state, request)
    _save(runtime, state, started)
    return Ok(secagg=reply_to_proto(message))


def end(runtime: DeviceRuntime, command: Command) -> Ok:
    """The round is over: delete its state and the producer's aggregated value (idempotent)."""
    msg = command.secagg_end
    key = state_key(runtime.sender, msg.round_id)
    if runtime.store.has_object(key):
        runtime.store.delete_object(key)
    if msg.input_id:
        own = runtime._key(msg.input_id)
        if runtime.store.has_object(own):
            runtime.store.delete_object(own)
    return Ok()


def _advert_of(state: ClientState) -> KeyAdvert:
    from consumer.secagg import crypto

    cfg = state.config
    return KeyAdvert(
        cfg.round_id,
        state.device_id,
        state.cipher_keys.public,
        state.mask_keys.public,
        crypto.seed_commitment(cfg.round_id, state.device_id, state.self_seed),
    )


HANDLERS: dict[str, Callable[[DeviceRuntime, Command], Ok]] = {
    "secagg_advertise": advertise,
    "secagg_share": share,
    "secagg_mask": mask,
    "secagg_unmask": unmask,
    "secagg_end": end,
}
"""The secure-aggregation command bodies and their handlers."""

__all__ = ["HANDLERS", "MAX_OPEN_ROUNDS", "RELEASE_RULE", "STATE_TAG", "STATE_TTL", "state_key"]
