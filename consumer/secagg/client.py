"""The device's side of a secure-aggregation round: four pure steps on plain data.

Each step takes the device's :class:`ClientState` and the server's message and returns the
new state and the reply; the state holds this round's secrets (two X25519 private keys and
the self-mask seed) and must stay on the device. A step called out of order, a message of
another round, or a request to reveal both the self-mask seed share and the key share of one
peer is refused with a typed error; repeating the same request gives the same reply.

Examples
--------
>>> import numpy as np
>>> from consumer.secagg.quantize import QuantizationParams
>>> q = QuantizationParams(clip=1.0, num_clients=3)
>>> cfg = RoundConfig.create("r1", ["a", "b", "c"], length=2, quantization=q, threshold=2)
>>> state, advert = advertise_keys(cfg, "a")
>>> state.stage, advert.device_id
('advertised', 'a')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from consumer.secagg import crypto, shamir
from consumer.secagg.errors import (
    SecAggIntegrityError,
    SecAggProtocolError,
    SecAggThresholdError,
)
from consumer.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    MaskInputRequest,
    RoundConfig,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from consumer.secagg.noise import discrete_gaussian, skellam
from consumer.secagg.quantize import pack_vector, quantize

MASK_PURPOSE = b"mask"
CIPHER_PURPOSE = b"cipher"
SELF_LABEL = b"self"
PAIR_LABEL = b"pair"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientState:
    """One device's private state in one round (secrets: keep it on the device)."""

    config: RoundConfig
    device_id: str
    stage: str
    cipher_keys: crypto.KeyPair
    mask_keys: crypto.KeyPair
    self_seed: bytes
    adverts: Mapping[str, KeyAdvert] = field(default_factory=dict, hash=False)
    held_shares: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict, hash=False)
    pair_keys: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict, hash=False)
    """Per advertising neighbour: (share encryption key, pairwise mask seed), agreed once in
    the share step so the mask step needs no key agreement."""
    masked: MaskedInput | None = None
    revealed_seed_of: frozenset[str] = frozenset()
    revealed_key_of: frozenset[str] = frozenset()


def advertise_keys(config: RoundConfig, device_id: str) -> tuple[ClientState, KeyAdvert]:
    """Step 1: fresh key pairs and self-mask seed; the public keys go to the server."""
    if device_id not in config.devices:
        raise SecAggProtocolError("this device is not in the round", device_id=device_id)
    state = ClientState(
        config=config,
        device_id=device_id,
        stage="advertised",
        cipher_keys=crypto.KeyPair.generate(),
        mask_keys=crypto.KeyPair.generate(),
        self_seed=os.urandom(shamir.SECRET_BYTES),
    )
    advert = KeyAdvert(
        config.round_id,
        device_id,
        state.cipher_keys.public,
        state.mask_keys.public,
        crypto.seed_commitment(config.round_id, device_id, state.self_seed),
    )
    return state, advert


def share_keys(state: ClientState, request: ShareKeysRequest) -> tuple[ClientState, ShareKeys]:
    """Step 2: t-of-k shares of the mask private key and the self-mask seed, one pair per
    advertising neighbour, each encrypted (ChaCha20-Poly1305) under the pairwise key."""
    _expect(state, "advertised", request.round_id)
    cfg, me = state.config, state.device_id
    adverts = {a.device_id: a for a in request.adverts}
    if len(adverts) != len(request.adverts) or not set(adverts) <= set(cfg.neighbours[me]):
        raise SecAggProtocolError("the adverts are not of distinct neighbours", device_id=me)
    if any(a.round_id != cfg.round_id for a in adverts.values()):
        raise SecAggProtocolError("an advert belongs to another round", device_id=me)
    keys = [state.cipher_keys.public, state.mask_keys.public]
    keys += [k for a in adverts.values() for k in (a.cipher_public, a.mask_public)]
    if len(set(keys)) != len(keys):
        raise SecAggIntegrityError("two adverts reuse a public key", device_id=me)
    if len(adverts) < cfg.threshold:
        raise SecAggThresholdError(
            f"{len(adverts)} neighbours advertised, {cfg.threshold} needed to share",
            device_id=me,
        )
    points = {peer: cfg.share_point(peer) for peer in adverts}
    t = cfg.threshold
    key_shares = shamir.split(state.mask_keys.private, threshold=t, xs=points.values())
    seed_shares = shamir.split(state.self_seed, threshold=t, xs=points.values())
    cipher_keys = crypto.agree_all(
        state.cipher_keys.private, {p: a.cipher_public for p, a in adverts.items()},
        purpose=CIPHER_PURPOSE, round_id=cfg.round_id, me=me)
    mask_seeds = mask_seeds_with(cfg, state.mask_keys.private, me,
                                 {p: a.mask_public for p, a in adverts.items()})
    ciphertexts = {}
    for peer in sorted(adverts):
        plain = key_shares[points[peer]] + seed_shares[points[peer]]
        ciphertexts[peer] = crypto.encrypt(cipher_keys[peer], plain,
                                           associated=_aad(cfg, me, peer))
    pair_keys = {p: (cipher_keys[p], mask_seeds[p]) for p in adverts}
    new = dataclasses.replace(state, stage="shared", adverts=adverts, pair_keys=pair_keys)
    return new, ShareKeys(cfg.round_id, me, ciphertexts)


def mask_input(
    state: ClientState,
    request: MaskInputRequest,
    values: Any,
    *,
    weight: int,
    rounding_seed: bytes | None = None,
    noise_seed: bytes | None = None,
) -> tuple[ClientState, MaskedInput]:
    """Step 3: quantize ``weight * values`` (+ noise), add the self mask and the pairwise
    masks of every neighbour that shared, mod 2^b. ``values``: a tensor or array of
    ``config.length`` floats, the private output of the training plan."""
    if state.stage == "masked" and state.masked is not None:
        if request.round_id != state.config.round_id or set(request.ciphertexts) != set(
            state.held_shares
        ):
            raise SecAggProtocolError("a second, different mask request", device_id=state.device_id)
        return state, state.masked
    _expect(state, "shared", request.round_id)
    cfg, me = state.config, state.device_id
    if not set(request.ciphertexts) <= set(state.adverts):
        raise SecAggProtocolError("a ciphertext from a device that did not advertise",
                                  device_id=me)
    if len(request.ciphertexts) < cfg.threshold:
        # with fewer pairwise masks, revealing the self-mask seed could expose the input
        raise SecAggThresholdError(
            f"{len(request.ciphertexts)} neighbours shared, {cfg.threshold} needed to mask",
            device_id=me,
        )
    held = {}
    for peer, ciphertext in request.ciphertexts.items():
        key = state.pair_keys[peer][0]
        plain = crypto.decrypt(key, ciphertext, associated=_aad(cfg, peer, me))
        if len(plain) != 2 * shamir.SHARE_BYTES:
            raise SecAggIntegrityError(f"the shares from {peer} are malformed", device_id=me)
        key_share, seed_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
        for share in (key_share, seed_share):
            if shamir.decode(share)[1] != cfg.share_point(me):
                raise SecAggIntegrityError(f"{peer} sent a share for another point", device_id=me)
        held[peer] = (key_share, seed_share)
    flat = _as_float_vector(values)
    if flat.size != cfg.length:
        raise SecAggProtocolError(f"{flat.size} values, the round aggregates {cfg.length}",
                                  device_id=me)
    params = cfg.quantization
    noise = None
    if cfg.noise_sigma > 0:
        sampler = discrete_gaussian if cfg.noise_kind == "discrete_gaussian" else skellam
        noise = sampler(cfg.noise_sigma, cfg.length, seed=noise_seed, bound=params.noise_bound)
    vector = quantize(flat, weight=weight, params=params, seed=rounding_seed, noise=noise)
    bits = params.modulus_bits
    vector = vector + crypto.expand_mask(
        state.self_seed, length=vector.size, modulus_bits=bits, label=SELF_LABEL
    )
    for peer in sorted(held):  # uint64 wraps: the sum is right mod 2^b
        mask = pair_mask(cfg, state.pair_keys[peer][1])
        if me < peer:
            vector += mask
        else:
            vector -= mask
    vector &= np.uint64(crypto.modulus_mask(bits))
    message = MaskedInput(cfg.round_id, me, pack_vector(vector, bits))
    new = dataclasses.replace(state, stage="masked", held_shares=held, masked=message)
    return new, message


def unmask(state: ClientState, request: UnmaskRequest) -> tuple[ClientState, UnmaskResponse]:
    """Step 4: for each neighbour that shared, its self-mask seed share if it survived, else
    its mask-key share; never both for one peer, across any number of requests."""
    if state.stage not in ("masked", "unmasked"):
        raise SecAggProtocolError(f"unmask in stage {state.stage!r}", device_id=state.device_id)
    cfg, me = state.config, state.device_id
    if request.round_id != cfg.round_id:
        raise SecAggProtocolError("an unmask request of another round", device_id=me)
    survivors = set(request.survivors)
    if me not in survivors or not survivors <= set(cfg.devices):
        raise SecAggProtocolError("the survivor list is not of this round", device_id=me)
    if len(survivors) < cfg.min_survivors:
        raise SecAggThresholdError(
            f"{len(survivors)} survivors, at least {cfg.min_survivors} are needed to unmask",
            device_id=me,
        )
    seed_of = {p for p in state.held_shares if p in survivors}
    key_of = set(state.held_shares) - seed_of
    both = (seed_of & state.revealed_key_of) | (key_of & state.revealed_seed_of)
    if both:
        raise SecAggProtocolError(
            f"refusing to reveal both shares of {sorted(both)}: the server changed who survived",
            device_id=me,
        )
    response = UnmaskResponse(
        cfg.round_id,
        me,
        seed_shares={p: state.held_shares[p][1] for p in sorted(seed_of)},
        key_shares={p: state.held_shares[p][0] for p in sorted(key_of)},
    )
    new = dataclasses.replace(
        state,
        stage="unmasked",
        revealed_seed_of=state.revealed_seed_of | seed_of,
        revealed_key_of=state.revealed_key_of | key_of,
    )
    return new, response


def mask_seeds_with(
    config: RoundConfig, private: bytes, me: str, peers: Mapping[str, bytes]
) -> dict[str, bytes]:
    """The pairwise mask seeds of ``me`` (mask private key ``private``) with each peer (id ->
    mask public key). The server recomputes them from a dropped device's rebuilt key."""
    return crypto.agree_all(private, peers, purpose=MASK_PURPOSE, round_id=config.round_id,
                            me=me)


def pair_mask(config: RoundConfig, seed: bytes) -> np.ndarray:
    """The mask two devices share (uint64 mod 2^b) from their seed; the smaller id adds
    it, the other subtracts it."""
    return crypto.expand_mask(seed, length=config.length + 1,
                              modulus_bits=config.quantization.modulus_bits, label=PAIR_LABEL)


def _aad(config: RoundConfig, sender: str, recipient: str) -> bytes:
    return crypto.encode_parts(config.round_id.encode(), sender.encode(), recipient.encode())


def _expect(state: ClientState, stage: str, round_id: str) -> None:
    if state.stage != stage:
        raise SecAggProtocolError(f"expected stage {stage!r}, the device is in {state.stage!r}",
                                  device_id=state.device_id)
    if round_id != state.config.round_id:
        raise SecAggProtocolError("a request of another round", device_id=state.device_id)


def _as_float_vector(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise SecAggProtocolError(f"the values to aggregate are not numbers: {exc}") from None
