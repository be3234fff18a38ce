"""A device's secure-aggregation state survives a restart: bytes out, the same state back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from consumer.secagg import (
    QuantizationParams,
    RoundConfig,
    SecAggIntegrityError,
    SecAggProtocolError,
    UnmaskRequest,
    advertise_keys,
    mask_input,
    share_keys,
    unmask,
)
from consumer.secagg.state_codec import state_from_bytes, state_to_bytes
from producer.fl.secure_aggregation import SecureAggregationRound


def test_a_device_restarted_between_every_step_finishes_the_round_with_the_right_sum() -> None:
    ids = [f"d{i}" for i in range(5)]
    q = QuantizationParams(clip=1.0, max_weight=3, num_clients=5, noise_bound=40)
    cfg = RoundConfig.create("r", ids, length=6, quantization=q, noise_sigma=3.0)
    x = {d: np.linspace(-1, 1, 6) * (i + 1) / 5 for i, d in enumerate(ids)}
    server = SecureAggregationRound(cfg)
    stored: dict[str, bytes] = {}

    def restart(d: str, step: tuple) -> object:  # type: ignore[type-arg]
        stored[d] = state_to_bytes(step[0])  # persisted before the reply leaves
        assert state_from_bytes(stored[d]) == step[0]
        return step[1]

    adverts = [restart(d, advertise_keys(cfg, d)) for d in ids]
    req = server.collect_adverts(adverts)  # type: ignore[arg-type]
    shares = [restart(d, share_keys(state_from_bytes(stored[d]), r)) for d, r in req.items()]
    req2 = server.collect_shares(shares)  # type: ignore[arg-type]
    masked = [restart(d, mask_input(state_from_bytes(stored[d]), r, x[d], weight=2))
              for d, r in req2.items()]
    # a redelivered mask request after the restart gets the very same masked vector
    d0 = ids[0]
    assert mask_input(state_from_bytes(stored[d0]), req2[d0], x[d0] * 0, weight=1)[1] == masked[0]
    req3 = server.collect_masked_inputs(masked)  # type: ignore[arg-type]
    responses = [restart(d, unmask(state_from_bytes(stored[d]), r)) for d, r in req3.items()]
    result = server.collect_unmask_responses(responses)  # type: ignore[arg-type]
    expected = sum(2 * x[d] for d in ids)
    noise_sd = 3.0 * np.sqrt(5) / 2**16
    assert np.abs(result.weighted_sum - expected).max() < result.error_bound + 12 * noise_sd
    # the reveal record survives a restart too: no second kind of share for a peer
    after = state_from_bytes(stored[d0])
    with pytest.raises(SecAggProtocolError, match="refusing to reveal both"):
        unmask(after, UnmaskRequest("r", tuple(d for d in ids if d != ids[1])))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda doc: doc.update(format="other/1"),
        lambda doc: doc.update(self_seed="AAAA"),
        lambda doc: doc.update(stage="masked-twice"),
        lambda doc: doc["config"].update(threshold=99),
        lambda doc: doc["config"]["quantization"].update(modulus_bits=True),
        lambda doc: doc.pop("mask_keys"),
        lambda doc: doc.update(cipher_keys=["!!not base64!!", "x"]),
    ],
    ids=["format", "short-seed", "stage", "threshold", "bool-int", "missing", "base64"],
)
def test_a_corrupt_stored_state_is_a_typed_integrity_error(corrupt: object) -> None:
    cfg = RoundConfig.create("r", ["a", "b", "c"], length=2,
                             quantization=QuantizationParams(clip=1.0, num_clients=3))
    doc = json.loads(state_to_bytes(advertise_keys(cfg, "a")[0]))
    corrupt(doc)  # type: ignore[operator]
    with pytest.raises(SecAggIntegrityError):
        state_from_bytes(json.dumps(doc).encode())


def test_garbage_bytes_are_a_typed_integrity_error() -> None:
    for data in (b"", b"\xff\xfe", b"[]", b"{}", b"null"):
        with pytest.raises(SecAggIntegrityError):
            state_from_bytes(data)
