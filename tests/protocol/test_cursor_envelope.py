"""Event ids, resume cursors and the JSON envelope."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from realtime_lab.errors import InvalidCursor, InvalidEnvelope, ProtocolError
from realtime_lab.protocol.cursor import (
    LIVE,
    MAX_CURSOR_LENGTH,
    Cursor,
    format_id,
    parse_after,
    parse_id,
)
from realtime_lab.protocol.envelope import Event, dumps

# --- cursor ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cursor"),
    [
        pytest.param("k3x9-42", Cursor("k3x9", 42), id="typical"),
        pytest.param("0-0", Cursor("0", 0), id="before-first"),
        pytest.param("a-1", Cursor("a", 1), id="first"),
        pytest.param("z" * 16 + "-1", Cursor("z" * 16, 1), id="longest-epoch"),
        pytest.param("a-" + "9" * 18, Cursor("a", 10**18 - 1), id="longest-seq"),
        pytest.param("a-10", Cursor("a", 10), id="zero-inside"),
    ],
)
def test_parse_id(text: str, cursor: Cursor) -> None:
    assert parse_id(text) == cursor
    assert str(cursor) == format_id(cursor.epoch, cursor.seq) == text


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("k3x9", id="no-dash"),
        pytest.param("-1", id="no-epoch"),
        pytest.param("k-", id="no-seq"),
        pytest.param("k-01", id="leading-zero"),
        pytest.param("k-00", id="zeros"),
        pytest.param("K-1", id="uppercase-epoch"),
        pytest.param("é-1", id="non-ascii-epoch"),
        pytest.param("k-\u0661", id="non-ascii-digit"),
        pytest.param("k_1", id="underscore"),
        pytest.param("k--1", id="negative"),
        pytest.param("k-+1", id="plus"),
        pytest.param("k-1-2", id="two-dashes"),
        pytest.param("k-1.0", id="decimal"),
        pytest.param(" k-1", id="leading-space"),
        pytest.param("k-1 ", id="trailing-space"),
        pytest.param("k-1\n", id="trailing-newline"),
        pytest.param("z" * 17 + "-1", id="epoch-too-long"),
        pytest.param("a-" + "1" * 19, id="seq-too-long"),
        pytest.param("a" * (MAX_CURSOR_LENGTH + 1), id="longer-than-max"),
        pytest.param("a-" + "1" * 10_000, id="huge"),
        pytest.param(LIVE, id="now-is-not-an-id"),
    ],
)
def test_parse_id_rejects(text: str) -> None:
    with pytest.raises(InvalidCursor):
        parse_id(text)


def test_parse_id_too_long_says_so() -> None:
    with pytest.raises(InvalidCursor, match="longer than"):
        parse_id("a-" + "1" * MAX_CURSOR_LENGTH)


def test_invalid_cursor_is_a_protocol_error() -> None:
    assert issubclass(InvalidCursor, ProtocolError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("  \t", None, id="blank"),
        pytest.param("now", LIVE, id="live"),
        pytest.param(" now ", LIVE, id="live-padded"),
        pytest.param("k3x9-42", Cursor("k3x9", 42), id="id"),
        pytest.param(" k3x9-0\t", Cursor("k3x9", 0), id="id-padded"),
    ],
)
def test_parse_after(text: str | None, expected: Cursor | str | None) -> None:
    assert parse_after(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("NOW", id="live-is-lowercase"),
        pytest.param("later", id="word"),
        pytest.param("k-01", id="leading-zero"),
        pytest.param("now!", id="not-quite"),
        pytest.param("-1", id="negative"),
        pytest.param("a" * 100, id="too-long"),
        pytest.param("k-1,k-2", id="list"),
    ],
)
def test_parse_after_rejects(text: str) -> None:
    with pytest.raises(InvalidCursor):
        parse_after(text)


# --- envelope --------------------------------------------------------------------------------

VALID = {"channel": "ticker", "id": "k3x9-42", "type": "token", "data": {"t": "hé"}, "ts": 1.5}


def _with(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != key}


@pytest.mark.parametrize(
    "raw", [json.dumps(VALID), json.dumps(VALID).encode()], ids=["str", "bytes"]
)
def test_from_json(raw: str | bytes) -> None:
    event = Event.from_json(raw)
    assert (event.channel, event.id, event.type, event.data, event.ts, event.seq) == (
        "ticker",
        "k3x9-42",
        "token",
        {"t": "hé"},
        1.5,
        42,
    )


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [
        pytest.param(_without("data"), "data", {}, id="data-defaults-to-empty"),
        pytest.param(_with(ts=17), "ts", 17.0, id="int-ts-becomes-float"),
        pytest.param(_with(type="chat.msg"), "type", "chat.msg", id="application-type"),
        pytest.param(_with(extra=1), "channel", "ticker", id="unknown-keys-ignored"),
    ],
)
def test_from_dict_details(value: dict[str, Any], field: str, expected: Any) -> None:
    actual = getattr(Event.from_dict(value), field)
    assert actual == expected
    assert type(actual) is type(expected)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(VALID, id="typical"),
        pytest.param(_with(data={}), id="empty-data"),
        pytest.param(_with(data={"n": [1, 2.5, None, True], "s": "漢字🎉\n\u2028"}), id="nested"),
        pytest.param(_with(id="0-0", type="reset", ts=0.0), id="reset"),
    ],
)
def test_json_roundtrip(value: dict[str, Any]) -> None:
    event = Event.from_dict(value)
    again = Event.from_json(event.json)
    assert again.to_dict() == event.to_dict() == value
    assert again.seq == event.seq


def test_json_is_compact_utf8_and_cached() -> None:
    event = Event.from_dict(VALID)
    encoded = event.json
    assert (
        encoded
        == '{"channel":"ticker","id":"k3x9-42","type":"token","data":{"t":"hé"},"ts":1.5}'.encode()
    )
    assert event.json is encoded
    assert event.cache["json"] is encoded


def test_dumps_never_writes_a_raw_line_break() -> None:
    # SSE data lines and line-delimited logs rely on JSON never containing CR or LF.
    assert b"\n" not in dumps({"a": "x\ny\rz"})
    assert b"\r" not in dumps({"a": "x\ny\rz"})


def test_to_dict_leaves_out_seq_and_cache() -> None:
    event = Event.from_dict(VALID)
    event.cache["sse"] = b"x"
    assert set(event.to_dict()) == {"channel", "id", "type", "data", "ts"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("{", id="truncated"),
        pytest.param("not json", id="text"),
        pytest.param(b"\xff\xfe\x00", id="bad-bytes"),
        pytest.param(b'{"channel": "\xff"}', id="invalid-utf8"),
        pytest.param("[]", id="array"),
        pytest.param("null", id="null"),
        pytest.param('"x"', id="string"),
        pytest.param(json.dumps(_without("channel")), id="no-channel"),
        pytest.param(json.dumps(_without("id")), id="no-id"),
        pytest.param(json.dumps(_without("type")), id="no-type"),
        pytest.param(json.dumps(_without("ts")), id="no-ts"),
        pytest.param(json.dumps(_with(channel=1)), id="channel-int"),
        pytest.param(json.dumps(_with(id=None)), id="id-null"),
        pytest.param(json.dumps(_with(id=42)), id="id-int"),
        pytest.param(json.dumps(_with(type=["token"])), id="type-list"),
        pytest.param(json.dumps(_with(data=None)), id="data-null"),
        pytest.param(json.dumps(_with(data=[1])), id="data-list"),
        pytest.param(json.dumps(_with(data="x")), id="data-string"),
        pytest.param(json.dumps(_with(ts="1")), id="ts-string"),
        pytest.param(json.dumps(_with(ts=True)), id="ts-bool"),
        pytest.param(json.dumps(_with(ts=None)), id="ts-null"),
        pytest.param(json.dumps(_with(id="k3x9-042")), id="id-leading-zero"),
        pytest.param(json.dumps(_with(id="now")), id="id-now"),
        pytest.param(json.dumps(_with(id="")), id="id-empty"),
    ],
)
def test_from_json_rejects(raw: str | bytes) -> None:
    with pytest.raises(InvalidEnvelope):
        Event.from_json(raw)


def test_invalid_envelope_is_a_protocol_error() -> None:
    assert issubclass(InvalidEnvelope, ProtocolError)


# Hostile input: each must be refused as InvalidEnvelope, never escape as another exception or
# be accepted and then fail to re-encode as strict JSON.


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            '{"channel":"c","id":"a-1","type":"t","ts":1' + "0" * 400 + "}",
            id="ts-overflows-float",
        ),
        pytest.param(
            "[" * 100_000,
            id="deep-nesting",
        ),
    ],
)
def test_from_json_raises_only_invalid_envelope(raw: str) -> None:
    with pytest.raises(InvalidEnvelope):
        Event.from_json(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            '{"channel":"c","id":"a-1","type":"t","ts":NaN}',
            id="nan-ts",
        ),
        pytest.param(
            '{"channel":"c","id":"a-1","type":"t","ts":1e400}',
            id="infinite-ts",
        ),
        pytest.param(
            '{"channel":"c","id":"a-1","type":"t","ts":1,"data":{"s":"\\ud800"}}',
            id="lone-surrogate",
        ),
        pytest.param('{"channel":"c","id":"a-1","type":"t","ts":1}', id="control"),
    ],
)
def test_accepted_envelopes_reencode_to_strict_json(raw: str) -> None:
    try:
        event = Event.from_json(raw)
    except InvalidEnvelope:
        return  # refusing is fine; accepting and then writing non-JSON is not
    decoded = json.loads(event.json.decode(), parse_constant=_reject_constant)
    assert decoded == event.to_dict()
    assert math.isfinite(event.ts)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
