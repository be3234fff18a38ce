"""Typed errors of secure aggregation and differential privacy, with their wire codes.

::

    FedplanError (schemas.errors)
    └── SecAggError                   SECAGG_FAILED: root of the secure-aggregation failures
        ├── SecAggOverflowError       SECAGG_OVERFLOW: the weighted sum would not fit the modulus
        ├── SecAggThresholdError      SECAGG_BELOW_THRESHOLD: too few devices/shares; nothing
        │                             is reconstructed or unmasked
        ├── SecAggProtocolError       SECAGG_PROTOCOL: a message breaks the protocol (wrong
        │                             stage, unknown sender, reveal both shares of one peer)
        ├── SecAggIntegrityError      SECAGG_INTEGRITY: a share or ciphertext failed its check
        └── PrivacyBudgetExhausted    PRIVACY_BUDGET: the next round would pass the ε budget

Every ``FedplanError`` subclass registers its code, so once this module is imported
``schemas.errors.error_from_code`` raises these classes again from their wire codes.

Examples
--------
>>> err = SECAGG_ERRORS["SECAGG_BELOW_THRESHOLD"]("2 of 5 shares", device_id="d1")
>>> isinstance(err, SecAggError), err.code, str(err)
(True, 'SECAGG_BELOW_THRESHOLD', '2 of 5 shares [device_id=d1]')
"""

from __future__ import annotations

from schemas.errors import FedplanError


class SecAggError(FedplanError):
    """A secure-aggregation round or step failed; nothing secret was revealed by the failure."""

    code = "SECAGG_FAILED"


class SecAggOverflowError(SecAggError, ValueError):
    """Quantized values or their weighted sum would not fit the chosen modulus."""

    code = "SECAGG_OVERFLOW"


class SecAggThresholdError(SecAggError):
    """Too few devices or shares remain to finish the round; no partial unmasking happens."""

    code = "SECAGG_BELOW_THRESHOLD"


class SecAggProtocolError(SecAggError):
    """A message is out of order, from an unknown device, or asks for something refused."""

    code = "SECAGG_PROTOCOL"


class SecAggIntegrityError(SecAggError):
    """A share, key or ciphertext is malformed or failed authentication."""

    code = "SECAGG_INTEGRITY"


class PrivacyBudgetExhausted(FedplanError):
    """Running another round would spend more than the run's (ε, δ) budget."""

    code = "PRIVACY_BUDGET"


SECAGG_ERRORS: dict[str, type[FedplanError]] = {
    cls.code: cls
    for cls in (
        SecAggError,
        SecAggOverflowError,
        SecAggThresholdError,
        SecAggProtocolError,
        SecAggIntegrityError,
        PrivacyBudgetExhausted,
    )
}
