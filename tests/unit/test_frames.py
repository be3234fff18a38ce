"""The worker's decoding of message properties is total (consumer.worker.frames)."""

from __future__ import annotations

import struct

from amqp.basic_message import Message

from consumer.worker.frames import UNDECODABLE, decode_properties


def _basic(**props: object) -> bytes:
    return bytes(Message(**props)._serialize_properties())


def test_properties_py_amqp_decodes_come_out_as_py_amqp_decodes_them() -> None:
    frame = _basic(content_type="a/b", correlation_id="c1", application_headers={"id": "x"})
    props, end = decode_properties(frame, 0)
    assert props == {
        "content_type": "a/b",
        "correlation_id": "c1",
        "application_headers": {"id": "x"},
    }
    assert end == len(frame)


def test_a_property_that_is_not_utf8_stays_bytes_and_marks_the_headers() -> None:
    frame = bytes([0x04 | 0x80, 0x00]) + bytes([3]) + b"a/b" + bytes([2]) + b"\xff\xfe"
    props, end = decode_properties(frame, 0)
    assert props["content_type"] == "a/b" and props["correlation_id"] == b"\xff\xfe"
    assert props["application_headers"][UNDECODABLE] == "property correlation_id is not UTF-8"
    assert end == len(frame)


def test_a_header_timestamp_past_year_9999_skips_the_table_and_keeps_the_rest() -> None:
    table = b"\x01t" + b"T" + struct.pack(">Q", 2**64 - 1)
    frame = (
        struct.pack(">H", 0x2000 | 0x0400)
        + struct.pack(">I", len(table))
        + table
        + bytes([2])
        + b"c1"
    )
    props, end = decode_properties(frame, 0)
    assert props["correlation_id"] == "c1"
    assert set(props["application_headers"]) == {UNDECODABLE}
    assert "OverflowError" in props["application_headers"][UNDECODABLE]
    assert end == len(frame)


def test_a_truncated_frame_gives_only_the_undecodable_mark() -> None:
    frame = struct.pack(">H", 0x0400) + bytes([200]) + b"\xff"
    props, end = decode_properties(frame, 0)
    assert list(props) == ["application_headers"]
    assert UNDECODABLE in props["application_headers"]
    assert end == len(frame)
