"""The SSE encoder: exact bytes, refusals, and decode(encode(x)) == x."""

from __future__ import annotations

from typing import Any

import pytest

from realtime_lab.errors import SSEEncodeError
from realtime_lab.protocol.sse import (
    MAX_RETRY,
    ServerSentEvent,
    SSEDecoder,
    encode_comment,
    encode_event,
    encode_retry,
)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"data": "hi"}, b"data: hi\n\n", id="data"),
        pytest.param({"data": ""}, b"data: \n\n", id="empty-data-is-one-line"),
        pytest.param({"data": "a\nb"}, b"data: a\ndata: b\n\n", id="lf"),
        pytest.param({"data": "a\r\nb"}, b"data: a\ndata: b\n\n", id="crlf"),
        pytest.param({"data": "a\rb"}, b"data: a\ndata: b\n\n", id="cr"),
        pytest.param({"data": "a\r\n\rb\n"}, b"data: a\ndata: \ndata: b\ndata: \n\n", id="mixed"),
        pytest.param({"data": "a\n\r"}, b"data: a\ndata: \ndata: \n\n", id="lf-then-cr-is-two"),
        pytest.param({"data": " x "}, b"data:  x \n\n", id="spaces-kept"),
        pytest.param(
            {"data": "a\x0bb\x0cc\u2028d"},
            "data: a\x0bb\x0cc\u2028d\n\n".encode(),
            id="vt-ff-ls-not-breaks",
        ),
        pytest.param({"data": "漢字 é 🎉"}, "data: 漢字 é 🎉\n\n".encode(), id="utf8"),
        pytest.param({"data": ": not a comment"}, b"data: : not a comment\n\n", id="colon-data"),
        pytest.param({"event": "token", "data": "x"}, b"event: token\ndata: x\n\n", id="event"),
        pytest.param({"id": "k3-1", "data": "x"}, b"id: k3-1\ndata: x\n\n", id="id"),
        pytest.param({"id": ""}, b"id: \n\n", id="empty-id-resets"),
        pytest.param({"retry": 0}, b"retry: 0\n\n", id="retry-zero"),
        pytest.param({"retry": MAX_RETRY}, f"retry: {MAX_RETRY}\n\n".encode(), id="retry-max"),
        pytest.param({"comment": "hb"}, b": hb\n\n", id="comment"),
        pytest.param({"comment": "a\r\nb\rc\nd"}, b": a\n: b\n: c\n: d\n\n", id="comment-lines"),
        pytest.param(
            {"data": "d", "event": "e", "id": "i", "retry": 5, "comment": "c"},
            b": c\nevent: e\nid: i\nretry: 5\ndata: d\n\n",
            id="field-order",
        ),
        pytest.param({}, b"", id="nothing"),
    ],
)
def test_encode_event(kwargs: dict[str, Any], expected: bytes) -> None:
    assert encode_event(**kwargs) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"event": "a\nb"}, id="event-lf"),
        pytest.param({"event": "a\rb"}, id="event-cr"),
        pytest.param({"event": "a\r\n"}, id="event-crlf"),
        pytest.param({"event": "a\x00b"}, id="event-nul"),
        pytest.param({"id": "1\n"}, id="id-lf"),
        pytest.param({"id": "\r1"}, id="id-cr"),
        pytest.param({"id": "1\x00"}, id="id-nul"),
        pytest.param({"retry": -1}, id="retry-negative"),
        pytest.param({"retry": MAX_RETRY + 1}, id="retry-too-large"),
        pytest.param({"retry": True}, id="retry-bool"),
        pytest.param({"retry": 1.5}, id="retry-float"),
        pytest.param({"retry": "100"}, id="retry-str"),
        pytest.param({"data": "\ud800"}, id="data-lone-surrogate"),
        pytest.param({"comment": "\udfff"}, id="comment-lone-surrogate"),
        pytest.param({"data": "ok", "id": "bad\n"}, id="valid-data-does-not-save-bad-id"),
    ],
)
def test_encode_event_refuses(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SSEEncodeError):
        encode_event(**kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", b": \n\n", id="empty"),
        pytest.param("ping", b": ping\n\n", id="text"),
        pytest.param("a\nb", b": a\n: b\n\n", id="lf"),
        pytest.param("a\r\nb\r", b": a\n: b\n: \n\n", id="crlf-cr"),
    ],
)
def test_encode_comment(text: str, expected: bytes) -> None:
    assert encode_comment(text) == expected


def test_encode_comment_default_is_heartbeat() -> None:
    assert encode_comment() == b": \n\n"


@pytest.mark.parametrize(
    ("ms", "expected"),
    [
        (0, b"retry: 0\n\n"),
        (3000, b"retry: 3000\n\n"),
        (MAX_RETRY, f"retry: {MAX_RETRY}\n\n".encode()),
    ],
)
def test_encode_retry(ms: int, expected: bytes) -> None:
    assert encode_retry(ms) == expected


@pytest.mark.parametrize("ms", [-1, MAX_RETRY + 1, True, False, 2.0, "5", None])
def test_encode_retry_refuses(ms: Any) -> None:
    with pytest.raises(SSEEncodeError):
        encode_retry(ms)


def _roundtrip(value: ServerSentEvent) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    block = encode_event(value.data, event=value.event, id=value.id, retry=value.retry)
    return decoder.feed(block) + decoder.close()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(ServerSentEvent(), id="defaults"),
        pytest.param(ServerSentEvent("hello"), id="data"),
        pytest.param(ServerSentEvent("a\nb\n\nc\n"), id="multi-line"),
        pytest.param(ServerSentEvent("\n"), id="only-newline"),
        pytest.param(ServerSentEvent(" lead and trail "), id="spaces"),
        pytest.param(ServerSentEvent(":colon: data"), id="colons"),
        pytest.param(ServerSentEvent("\ufeffbom inside"), id="bom-in-data"),
        pytest.param(ServerSentEvent("nul\x00ok"), id="nul-in-data"),
        pytest.param(ServerSentEvent("漢字 é 🎉", event="töken", id="ïd-漢"), id="non-ascii"),
        pytest.param(ServerSentEvent('{"a":1}', event="token", id="k3x9-42"), id="json"),
        pytest.param(ServerSentEvent("x", event=" spaced", id=" 1"), id="leading-space-kept"),
        pytest.param(ServerSentEvent("x", retry=2500), id="retry"),
        pytest.param(ServerSentEvent("x", retry=0), id="retry-zero"),
    ],
)
def test_roundtrip(value: ServerSentEvent) -> None:
    assert _roundtrip(value) == [value]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param("a\r\nb", "a\nb", id="crlf"),
        pytest.param("a\rb\r", "a\nb\n", id="cr"),
    ],
)
def test_roundtrip_normalises_line_endings(data: str, expected: str) -> None:
    assert _roundtrip(ServerSentEvent(data)) == [ServerSentEvent(expected)]


def test_roundtrip_empty_event_type_reads_as_message() -> None:
    assert _roundtrip(ServerSentEvent("x", event="")) == [ServerSentEvent("x")]


def test_concatenated_blocks_decode_in_order() -> None:
    stream = (
        encode_retry(1000)
        + encode_comment("hb")
        + encode_event("one", event="token", id="e-1")
        + encode_event(id="e-2")
        + encode_event("two")
    )
    decoder = SSEDecoder()
    assert decoder.feed(stream) == [
        ServerSentEvent("one", "token", "e-1"),
        ServerSentEvent("two", "message", "e-2"),
    ]
    assert (decoder.last_event_id, decoder.retry, decoder.comments) == ("e-2", 1000, 1)
