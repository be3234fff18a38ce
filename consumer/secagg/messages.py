"""The public round configuration and the messages of the four secure-aggregation steps.

Plain frozen data classes: a later session maps them to versioned wire commands. Stages::

    device -> server   KeyAdvert          two X25519 public keys (share encryption, masks)
    server -> device   ShareKeysRequest   the neighbours' adverts
    device -> server   ShareKeys          Shamir shares, encrypted to each neighbour
    server -> device   MaskInputRequest   the ciphertexts addressed to this device
    device -> server   MaskedInput        quantized input + self mask + pairwise masks
    server -> device   UnmaskRequest      who sent a masked input (the survivors)
    device -> server   UnmaskResponse     self-mask shares of survivors, key shares of dropouts

Examples
--------
>>> from consumer.secagg.quantize import QuantizationParams
>>> q = QuantizationParams(clip=1.0, num_clients=5)
>>> cfg = RoundConfig.create("r1", ["a", "b", "c", "d", "e"], length=3, quantization=q)
>>> cfg.threshold, cfg.min_survivors, cfg.neighbours["a"]
(3, 4, ('b', 'c', 'd', 'e'))
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from consumer.secagg.errors import SecAggProtocolError
from consumer.secagg.graph import NeighbourGraph
from consumer.secagg.quantize import QuantizationParams

PROTOCOL_VERSION = 2
"""2: the graph travels as ``k`` and a seed (``SecAggGraph``), never as edge lists."""
NOISE_KINDS = ("discrete_gaussian", "skellam")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundConfig:
    """What every party of one round knows: devices, graph, threshold, quantization, noise.

    ``threshold`` shares of a device's secrets (out of one per neighbour) rebuild them;
    ``min_survivors`` is the fewest masked inputs a sum may cover (devices refuse to unmask
    fewer, and distributed noise is calibrated to it); ``noise_sigma`` is each device's noise
    standard deviation in quantized units (0: no noise).
    """

    round_id: str
    devices: tuple[str, ...]
    neighbours: Mapping[str, tuple[str, ...]] = field(hash=False)
    threshold: int
    min_survivors: int
    length: int
    quantization: QuantizationParams
    noise_sigma: float = 0.0
    noise_kind: str = "discrete_gaussian"
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if list(self.devices) != sorted(set(self.devices)) or len(self.devices) < 2:
            raise SecAggProtocolError("a round needs at least 2 distinct devices, sorted")
        if isinstance(self.neighbours, NeighbourGraph):  # derived: regular by construction
            if self.neighbours.devices != self.devices:
                raise SecAggProtocolError("the neighbour graph must cover exactly the devices")
            smallest = self.neighbours.degree
        else:
            if set(self.neighbours) != set(self.devices):
                raise SecAggProtocolError("the neighbour graph must cover exactly the devices")
            smallest = min(len(p) for p in self.neighbours.values())
        if not 1 <= self.threshold <= smallest:
            raise SecAggProtocolError(
                f"threshold {self.threshold} must be in 1..{smallest} (smallest neighbourhood)"
            )
        if not 1 <= self.min_survivors <= len(self.devices):
            raise SecAggProtocolError(f"min_survivors {self.min_survivors} is out of range")
        if self.quantization.num_clients < len(self.devices):
            raise SecAggProtocolError("quantization.num_clients is below the number of devices")
        if self.length < 0 or self.noise_kind not in NOISE_KINDS or self.noise_sigma < 0:
            raise SecAggProtocolError("length >= 0, noise_sigma >= 0 and a known noise_kind")
        if self.noise_sigma > 0 and self.quantization.noise_bound < self.noise_sigma:
            raise SecAggProtocolError("quantization.noise_bound does not cover noise_sigma")

    @classmethod
    def create(
        cls,
        round_id: str,
        devices: Sequence[str],
        *,
        length: int,
        quantization: QuantizationParams,
        k: int | None = None,
        graph_seed: bytes | None = None,
        threshold: int | None = None,
        max_dropout: float = 1 / 3,
        noise_sigma: float = 0.0,
        noise_kind: str = "discrete_gaussian",
    ) -> RoundConfig:
        """A config with defaults: complete graph unless ``k``, threshold = a majority of
        the smallest neighbourhood, ``min_survivors = n - floor(n * max_dropout)``. The
        graph seed defaults to a hash of the round id; a server draws a random one
        (:class:`~producer.fl.secure_rounds.SecureAggregation` does)."""
        ids = tuple(sorted(devices))
        seed = graph_seed if graph_seed is not None else hashlib.sha256(
            b"fedplan/secagg/graph\x00" + round_id.encode()).digest()
        graph = NeighbourGraph(ids, k=k, seed=seed)
        degree = graph.degree
        return cls(
            round_id=round_id,
            devices=ids,
            neighbours=graph,
            threshold=threshold if threshold is not None else degree // 2 + 1,
            min_survivors=len(ids) - math.floor(len(ids) * max_dropout),
            length=length,
            quantization=quantization,
            noise_sigma=noise_sigma,
            noise_kind=noise_kind,
        )

    def share_point(self, device_id: str) -> int:
        """The Shamir x-coordinate of the shares held by ``device_id`` (1-based index)."""
        return self.devices.index(device_id) + 1


@dataclass(frozen=True, slots=True)
class KeyAdvert:
    """Stage 1, device -> server: two public keys for this round and a commitment to the
    self-mask seed (SHA-256), so a seed rebuilt from tampered shares is caught."""

    round_id: str
    device_id: str
    cipher_public: bytes
    mask_public: bytes
    seed_commitment: bytes


@dataclass(frozen=True, slots=True)
class ShareKeysRequest:
    """Stage 2, server -> device: the adverts of the device's neighbours that advertised."""

    round_id: str
    adverts: tuple[KeyAdvert, ...]


@dataclass(frozen=True, slots=True)
class ShareKeys:
    """Stage 2, device -> server: recipient id -> encrypted (key share, seed share)."""

    round_id: str
    device_id: str
    ciphertexts: Mapping[str, bytes] = field(hash=False)


@dataclass(frozen=True, slots=True)
class MaskInputRequest:
    """Stage 3, server -> device: sender id -> the ciphertext that sender addressed to it."""

    round_id: str
    ciphertexts: Mapping[str, bytes] = field(hash=False)


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Stage 3, device -> server: the masked vector (length + 1 values), ``modulus_bits``
    bits each, packed big-endian (``quantize.pack_vector``)."""

    round_id: str
    device_id: str
    vector: bytes


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Stage 4, server -> device: the devices whose masked input the sum includes."""

    round_id: str
    survivors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnmaskResponse:
    """Stage 4, device -> server: shares of survivors' self-mask seeds and dropouts' keys."""

    round_id: str
    device_id: str
    seed_shares: Mapping[str, bytes] = field(hash=False)
    key_shares: Mapping[str, bytes] = field(hash=False)
