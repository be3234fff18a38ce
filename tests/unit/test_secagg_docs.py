"""The examples in the secure-aggregation and privacy docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

from consumer.secagg import SECAGG_ERRORS
from schemas import errors as schema_errors

MODULES = [
    "consumer.secagg",
    "consumer.secagg.errors",
    "consumer.secagg.shamir",
    "consumer.secagg.crypto",
    "consumer.secagg.quantize",
    "consumer.secagg.graph",
    "consumer.secagg.noise",
    "consumer.secagg.messages",
    "consumer.secagg.client",
    "consumer.secagg.state_codec",
    "producer.fl.secure_aggregation",
    "producer.fl.privacy",
    "consumer.secagg.wire_codec",
    "producer.fl.secure_rounds",
    "producer.fl.secure_training",
    "producer.fl.dp_fedavg",
    "producer.fl.demo_privacy",
]


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_of_a_secagg_module_pass(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


def test_secagg_error_codes_are_distinct_from_the_schema_codes() -> None:
    schema_codes = {
        cls.code
        for cls in vars(schema_errors).values()
        if isinstance(cls, type) and issubclass(cls, schema_errors.FedplanError)
    }
    assert not set(SECAGG_ERRORS) & schema_codes
    for code, cls in SECAGG_ERRORS.items():
        assert cls.code == code and issubclass(cls, schema_errors.FedplanError)
        err = cls("why", device_id="d")
        assert str(err) == "why [device_id=d]"
        assert type(schema_errors.error_from_code(code, "why")) is cls
