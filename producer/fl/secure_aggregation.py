"""The server's side of a secure-aggregation round (SecAgg+), as a state machine on messages.

The server never sees a device's input: it routes keys and encrypted shares, sums masked
vectors, and removes the masks with secrets rebuilt from ``threshold`` shares — self-mask
seeds of the devices that sent a masked input (the survivors), mask private keys of the
devices that shared but did not send one. A device counts as dropped at the first stage it
misses; a malformed message is recorded in :attr:`SecureAggregationRound.rejected` and its
sender treated as dropped. Too few devices or shares at any stage raise
:class:`SecAggThresholdError` *before* anything is reconstructed, and the round stays failed:
no partial unmasking. No transport here: a later session routes the messages as commands.

Examples
--------
>>> import numpy as np
>>> from consumer.secagg import QuantizationParams, RoundConfig
>>> from consumer.secagg import advertise_keys, share_keys, mask_input, unmask
>>> ids = ["a", "b", "c", "d"]
>>> cfg = RoundConfig.create("r1", ids, length=2,
...                          quantization=QuantizationParams(clip=1.0, num_clients=4,
...                                                          max_weight=5))
>>> server = SecureAggregationRound(cfg)
>>> states, adverts = zip(*(advertise_keys(cfg, d) for d in ids))
>>> requests = server.collect_adverts(adverts)
>>> states, shares = zip(*(share_keys(s, requests[s.device_id]) for s in states))
>>> requests = server.collect_shares(shares)
>>> x = {d: np.array([0.5, -0.25]) * (i + 1) / 4 for i, d in enumerate(ids)}
>>> states, masked = zip(*(mask_input(s, requests[s.device_id], x[s.device_id], weight=2)
...                        for s in states))
>>> requests = server.collect_masked_inputs(masked)
>>> result = server.collect_unmask_responses([unmask(s, requests[s.device_id])[1]
...                                           for s in states])
>>> result.total_weight, np.round(result.weighted_sum, 3).tolist()
(8, [2.5, -1.25])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from consumer.secagg import crypto, shamir
from consumer.secagg.client import SELF_LABEL, mask_seeds_with, pair_mask
from consumer.secagg.errors import (
    SecAggError,
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
from consumer.secagg.quantize import decode_sum, packed_size, unpack_vector
from schemas.errors import FedplanError

M = TypeVar("M", KeyAdvert, ShareKeys, MaskedInput, UnmaskResponse)
_STAGES = ("adverts", "shares", "masked", "unmask", "done")


@dataclass(frozen=True, slots=True)
class SecureAggregate:
    """A round's result: the weighted sum of the survivors' inputs and their total weight.

    ``error_bound`` bounds |weighted_sum - sum(w_i * clip(x_i))| per coordinate, noise aside.
    """

    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    error_bound: float

    def mean(self) -> np.ndarray:
        """The weighted average (``weighted_sum / total_weight``)."""
        if self.total_weight <= 0:
            raise SecAggError("the survivors' total weight is 0: there is no average")
        return self.weighted_sum / self.total_weight


class SecureAggregationRound:
    """One round on the server: ``collect_adverts`` → ``collect_shares`` →
    ``collect_masked_inputs`` → ``collect_unmask_responses`` (see the module example)."""

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self.stage = _STAGES[0]
        self.rejected: dict[str, FedplanError] = {}
        self.adverts: dict[str, KeyAdvert] = {}
        self.shared: dict[str, ShareKeys] = {}
        self.masked: dict[str, np.ndarray] = {}
        self._unpacked: dict[str, np.ndarray] = {}
        self.failure: SecAggError | None = None

    # -- stage 1 ------------------------------------------------------------------------
    def collect_adverts(self, adverts: Iterable[KeyAdvert]) -> dict[str, ShareKeysRequest]:
        """The adverts that arrived; returns, per advertising device, its neighbours' adverts.

        Devices with fewer than ``threshold`` advertising neighbours cannot share their
        secrets and are left out (repeatedly, until stable).
        """
        self._enter("adverts")
        valid = self._valid(adverts, self._check_advert)
        uses = Counter(k for a in valid for k in {a.cipher_public, a.mask_public})
        for advert in valid:
            if advert.cipher_public == advert.mask_public or any(
                uses[k] > 1 for k in (advert.cipher_public, advert.mask_public)
            ):  # every holder of a copied key is out, the copier and its victim alike
                self._reject(advert.device_id, SecAggIntegrityError("a reused public key"))
                continue
            self.adverts[advert.device_id] = advert
        alive = set(self.adverts)
        while lacking := {d for d in alive if len(self._peers(d, alive)) < self.config.threshold}:
            alive -= lacking
        self.adverts = {d: a for d, a in self.adverts.items() if d in alive}
        self._require(len(alive), "devices advertised keys")
        return {
            d: ShareKeysRequest(self.config.round_id,
                                tuple(self.adverts[p] for p in self._peers(d, alive)))
            for d in sorted(alive)
        }

    # -- stage 2 ------------------------------------------------------------------------
    def collect_shares(self, messages: Iterable[ShareKeys]) -> dict[str, MaskInputRequest]:
        """The encrypted shares; returns, per sharing device, the ciphertexts addressed to it."""
        self._enter("shares")
        for message in self._valid(messages, self._check_shares):
            self.shared[message.device_id] = message
        alive = set(self.shared)
        self._require(len(alive), "devices shared their keys")
        # a device with fewer than t sharing neighbours would refuse to mask: not asked
        return {
            d: MaskInputRequest(self.config.round_id,
                                {p: self.shared[p].ciphertexts[d] for p in self._peers(d, alive)})
            for d in sorted(alive)
            if len(self._peers(d, alive)) >= self.config.threshold
        }

    # -- stage 3 ------------------------------------------------------------------------
    def collect_masked_inputs(self, messages: Iterable[MaskedInput]) -> dict[str, UnmaskRequest]:
        """The masked vectors; returns the survivor list for each survivor to unmask with.

        Fails (before any device is asked to reveal a share) when fewer than
        ``min_survivors`` sent one, or a shared device has fewer than ``threshold``
        surviving neighbours to rebuild its secret from.
        """
        self._enter("masked")
        for message in self._valid(messages, self._check_masked):
            self.masked[message.device_id] = self._unpacked[message.device_id]
        self._unpacked.clear()
        survivors = set(self.masked)
        self._require(len(survivors), "devices sent a masked input")
        self._require_shares_reachable(survivors, "surviving")
        request = UnmaskRequest(self.config.round_id, tuple(sorted(survivors)))
        return {d: request for d in sorted(survivors)}

    # -- stage 4 ------------------------------------------------------------------------
    def collect_unmask_responses(self, responses: Iterable[UnmaskResponse]) -> SecureAggregate:
        """The revealed shares; returns the unmasked, dequantized weighted sum.

        Every needed secret must have ``threshold`` shares, checked for all of them before
        any is rebuilt: otherwise :class:`SecAggThresholdError` and nothing is unmasked.
        """
        self._enter("unmask")
        survivors = set(self.masked)
        dropped = set(self.shared) - survivors
        seeds: dict[str, list[bytes]] = {d: [] for d in survivors}
        keys: dict[str, list[bytes]] = {d: [] for d in dropped}
        for response in self._valid(responses, self._check_response):
            for owner, share in response.seed_shares.items():
                seeds[owner].append(share)
            for owner, share in response.key_shares.items():
                keys[owner].append(share)
        t = self.config.threshold
        short = sorted(d for d, s in (seeds | keys).items() if len(s) < t)
        if short:
            self._fail(SecAggThresholdError(
                f"fewer than {t} shares for {short}: the round fails, nothing is unmasked"))
        try:
            total = self._unmask(survivors, dropped, seeds, keys)
            weighted, weight = decode_sum(total, params=self.config.quantization,
                                          survivors=len(survivors))
        except SecAggError as exc:
            self._fail(exc)
        self.stage = "done"
        return SecureAggregate(
            weighted_sum=weighted,
            total_weight=weight,
            survivors=tuple(sorted(survivors)),
            dropped=tuple(sorted(set(self.config.devices) - survivors)),
            error_bound=self.config.quantization.error_bound(len(survivors)),
        )

    # -- internals ----------------------------------------------------------------------
    def _unmask(
        self,
        survivors: set[str],
        dropped: set[str],
        seeds: Mapping[str, list[bytes]],
        keys: Mapping[str, list[bytes]],
    ) -> np.ndarray:
        cfg = self.config
        bits = cfg.quantization.modulus_bits
        total = np.zeros(cfg.length + 1, dtype=np.uint64)
        for vector in self.masked.values():
            total += vector
        # t shares rebuild each secret; the rebuilt secret is checked against its commitment
        # or public key, so an inconsistent unused share cannot change the sum
        for owner in sorted(survivors):
            seed = shamir.combine(seeds[owner], check_extra=False)
            if crypto.seed_commitment(cfg.round_id, owner, seed) != (
                self.adverts[owner].seed_commitment
            ):
                raise SecAggIntegrityError("a rebuilt self-mask seed does not match its "
                                           "commitment: a share was tampered with",
                                           device_id=owner)
            total -= crypto.expand_mask(seed, length=cfg.length + 1, modulus_bits=bits,
                                        label=SELF_LABEL)
        for owner in sorted(dropped):
            private = shamir.combine(keys[owner], check_extra=False)
            if crypto.public_key_of(private) != self.adverts[owner].mask_public:
                raise SecAggIntegrityError("a rebuilt key does not match its advert",
                                           device_id=owner)
            peers = survivors & set(self._peers(owner, set(self.shared)))
            seeds_of = mask_seeds_with(cfg, private, owner,
                                       {p: self.adverts[p].mask_public for p in peers})
            for peer in sorted(peers):
                mask = pair_mask(cfg, seeds_of[peer])
                # the survivor added the mask if its id is smaller, else subtracted it
                if peer < owner:
                    total -= mask
                else:
                    total += mask
        return total & np.uint64(crypto.modulus_mask(bits))

    def _peers(self, device: str, among: set[str]) -> list[str]:
        return [p for p in self.config.neighbours[device] if p in among]

    def _check_advert(self, advert: KeyAdvert) -> None:
        sizes = (len(advert.cipher_public), len(advert.mask_public),
                 len(advert.seed_commitment))
        if sizes != (crypto.KEY_BYTES, crypto.KEY_BYTES, 32):
            raise SecAggIntegrityError("public keys and the seed commitment are 32 bytes")

    def _check_shares(self, message: ShareKeys) -> None:
        if message.device_id not in self.adverts:
            raise SecAggProtocolError("shares from a device that was not asked to share")
        expected = set(self._peers(message.device_id, set(self.adverts)))
        if set(message.ciphertexts) != expected:
            raise SecAggProtocolError("shares must go to exactly the advertising neighbours")

    def _check_masked(self, message: MaskedInput) -> None:
        if message.device_id not in self.shared:
            raise SecAggProtocolError("a masked input from a device that did not share")
        size = packed_size(self.config.length + 1, self.config.quantization.modulus_bits)
        if len(message.vector) != size:
            raise SecAggProtocolError(f"a masked input is {size} bytes")
        self._unpacked[message.device_id] = unpack_vector(  # checks the padding too
            message.vector, self.config.length + 1, self.config.quantization.modulus_bits
        )

    def _check_response(self, response: UnmaskResponse) -> None:
        me = response.device_id
        if me not in self.masked:
            raise SecAggProtocolError("an unmask response from a device that did not survive")
        held = set(self._peers(me, set(self.shared)))
        if set(response.seed_shares) != held & set(self.masked) or set(
            response.key_shares
        ) != held - set(self.masked):
            raise SecAggProtocolError("the response does not match the survivor list")
        point = self.config.share_point(me).to_bytes(2, "big")
        for share in (*response.seed_shares.values(), *response.key_shares.values()):
            if len(share) != shamir.SHARE_BYTES or share[3:5] != point:  # combine decodes
                raise SecAggIntegrityError("a share for another device's point")

    def _valid(
        self, messages: Iterable[M], check: Callable[[M], None]
    ) -> list[M]:
        accepted: dict[str, M] = {}
        for message in messages:
            device = message.device_id
            if not isinstance(device, str):
                continue  # no device to blame or count: not a message of this protocol
            if accepted.get(device) == message:
                continue  # the same message delivered twice
            try:
                if message.round_id != self.config.round_id:
                    raise SecAggProtocolError("a message of another round")
                if device not in self.config.devices:
                    raise SecAggProtocolError("a message from a device outside the round")
                if device in accepted or device in self.rejected:
                    raise SecAggProtocolError("a second message from one device in one stage")
                check(message)
            except (TypeError, ValueError) as exc:  # a field of the wrong type or size
                if device in self.config.devices:
                    self._reject(device, SecAggProtocolError(f"a malformed message: {exc}"))
                    accepted.pop(device, None)
                continue
            except FedplanError as exc:
                if device in self.config.devices:
                    self._reject(device, exc)
                    accepted.pop(device, None)
                continue
            accepted[device] = message
        return list(accepted.values())

    def _reject(self, device: str, error: FedplanError) -> None:
        error.device_id = device
        self.rejected.setdefault(device, error)

    def _require(self, count: int, what: str) -> None:
        if count < self.config.min_survivors:
            self._fail(SecAggThresholdError(
                f"only {count} {what}, the round needs {self.config.min_survivors}"))

    def _require_shares_reachable(self, holders: set[str], what: str) -> None:
        t = self.config.threshold
        alive = set(self.shared)
        short = sorted(d for d in alive if len(set(self._peers(d, alive)) & holders) < t)
        if short:
            self._fail(SecAggThresholdError(
                f"{short} have fewer than {t} {what} neighbours to hold their shares"))

    def _enter(self, stage: str) -> None:
        if self.failure is not None:
            raise SecAggProtocolError(f"the round failed already: {self.failure.message}")
        if self.stage != stage:
            raise SecAggProtocolError(f"the round expects {self.stage!r}, not {stage!r}")
        self.stage = _STAGES[_STAGES.index(stage) + 1]

    def _fail(self, error: SecAggError) -> None:
        self.failure = error
        self.stage = "failed"
        raise error
