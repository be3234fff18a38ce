"""Secure aggregation (SecAgg / SecAgg+): primitives and the device's protocol steps.

Both sides import this package: devices run :mod:`consumer.secagg.client`, the server's round
(``producer.fl.secure_aggregation``) uses the same messages, quantization and masks.
See docs/secure_aggregation.md.

Examples
--------
>>> from consumer.secagg import QuantizationParams, RoundConfig, advertise_keys
>>> cfg = RoundConfig.create("r", ["a", "b", "c"], length=1,
...                          quantization=QuantizationParams(clip=1.0, num_clients=3))
>>> advertise_keys(cfg, "b")[1].device_id
'b'
"""

from consumer.secagg.client import ClientState, advertise_keys, mask_input, share_keys, unmask
from consumer.secagg.errors import (
    SECAGG_ERRORS,
    PrivacyBudgetExhausted,
    SecAggError,
    SecAggIntegrityError,
    SecAggOverflowError,
    SecAggProtocolError,
    SecAggThresholdError,
)
from consumer.secagg.graph import neighbour_graph
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
from consumer.secagg.quantize import QuantizationParams, decode_sum, quantize

__all__ = [
    "SECAGG_ERRORS",
    "ClientState",
    "KeyAdvert",
    "MaskInputRequest",
    "MaskedInput",
    "PrivacyBudgetExhausted",
    "QuantizationParams",
    "RoundConfig",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggOverflowError",
    "SecAggProtocolError",
    "SecAggThresholdError",
    "ShareKeys",
    "ShareKeysRequest",
    "UnmaskRequest",
    "UnmaskResponse",
    "advertise_keys",
    "decode_sum",
    "mask_input",
    "neighbour_graph",
    "quantize",
    "share_keys",
    "unmask",
]
