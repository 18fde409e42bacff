"""The SSE decoder against the WHATWG event stream interpretation, one table per rule."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from realtime_lab.protocol.sse import MAX_RETRY, ServerSentEvent, SSEDecoder

E = ServerSentEvent
Chunker = Callable[[bytes], list[bytes]]


def _whole(stream: bytes) -> list[bytes]:
    return [stream]


def _bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def _threes(stream: bytes) -> list[bytes]:
    return [stream[i : i + 3] for i in range(0, len(stream), 3)]


CHUNKERS = [
    pytest.param(_whole, id="whole"),
    pytest.param(_bytewise, id="bytewise"),
    pytest.param(_threes, id="threes"),
]


def decode(chunks: list[bytes]) -> tuple[list[ServerSentEvent], SSEDecoder]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events, decoder


# (stream, events, last_event_id after the stream)
WHATWG_EXAMPLES = [
    pytest.param(
        b"data: YHOO\ndata: +2\ndata: 10\n\n",
        [E("YHOO\n+2\n10")],
        "",
        id="stock-multiline",
    ),
    pytest.param(
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [E("first event", id="1"), E("second event", id=""), E(" third event", id="")],
        "",
        id="comment-then-three-events-id-carry-and-reset",
    ),
    pytest.param(
        b"data\n\ndata\ndata\n\ndata:",
        [E(""), E("\n")],
        "",
        id="empty-data-and-unterminated-last-block-discarded",
    ),
    pytest.param(
        b"data:test\n\ndata: test\n\n",
        [E("test"), E("test")],
        "",
        id="space-after-colon-optional",
    ),
]


@pytest.mark.parametrize("chunker", CHUNKERS)
@pytest.mark.parametrize(("stream", "events", "last_id"), WHATWG_EXAMPLES)
def test_whatwg_examples(
    chunker: Chunker, stream: bytes, events: list[ServerSentEvent], last_id: str
) -> None:
    got, decoder = decode(chunker(stream))
    assert got == events
    assert decoder.last_event_id == last_id


# Single-stream cases: every rule of the interpretation algorithm, fed whole and in pieces.
RULES = [
    # line endings
    pytest.param(b"data: a\ndata: b\n\n", [E("a\nb")], id="lf"),
    pytest.param(b"data: a\r\ndata: b\r\n\r\n", [E("a\nb")], id="crlf"),
    pytest.param(b"data: a\rdata: b\r\r", [E("a\nb")], id="cr"),
    pytest.param(b"data: a\rdata: b\r\n\n", [E("a\nb")], id="mixed"),
    pytest.param(b"data: a\n\rdata: b\n\n", [E("a"), E("b")], id="lf-cr-is-two-endings"),
    pytest.param(b"data: a\x0bb\x0cc\xe2\x80\xa8d\n\n", [E("a\x0bb\x0cc\u2028d")], id="not-breaks"),
    # BOM
    pytest.param(b"\xef\xbb\xbfdata: a\n\n", [E("a")], id="bom-stripped"),
    pytest.param(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", [], id="only-first-bom-stripped"),
    pytest.param(b"\n\xef\xbb\xbfdata: a\n\n", [], id="bom-not-at-start-is-text"),
    pytest.param(b"data: \xef\xbb\xbfa\n\n", [E("\ufeffa")], id="bom-in-value-kept"),
    # UTF-8
    pytest.param("data: é漢🎉\n\n".encode(), [E("é漢🎉")], id="utf8"),
    pytest.param(b"data: \xff\n\n", [E("\ufffd")], id="invalid-byte-replaced"),
    pytest.param(b"data: \xe6\xbcA\n\n", [E("\ufffdA")], id="truncated-sequence"),
    pytest.param(b"data: \xed\xa0\x80\n\n", [E("\ufffd" * 3)], id="encoded-surrogate"),
    pytest.param(b"\xef\xbbdata: a\n\n", [], id="partial-bom-is-invalid-text"),
    # comments
    pytest.param(b": hi\n:\n\n", [], id="comments-only"),
    pytest.param(b"data: a\n: c\ndata: b\n\n", [E("a\nb")], id="comment-inside-block"),
    pytest.param(b"data: :x\n\n", [E(":x")], id="colon-in-value-not-comment"),
    # field parsing
    pytest.param(b"data\n\n", [E("")], id="no-colon-empty-value"),
    pytest.param(b"data:\n\n", [E("")], id="colon-empty-value"),
    pytest.param(b"data:x\n\n", [E("x")], id="no-space"),
    pytest.param(b"data:  x\n\n", [E(" x")], id="one-space-stripped"),
    pytest.param(b"data:\tx\n\n", [E("\tx")], id="tab-not-stripped"),
    pytest.param(b"data: a:b: c\n\n", [E("a:b: c")], id="first-colon-splits"),
    pytest.param(b"Data: x\n\n", [], id="names-case-sensitive"),
    pytest.param(b"data : x\n\n", [], id="space-before-colon-is-name"),
    pytest.param(b"foo: bar\nretry\ndata: x\n\n", [E("x")], id="unknown-fields-ignored"),
    # event
    pytest.param(b"event: add\ndata: x\n\n", [E("x", event="add")], id="event"),
    pytest.param(b"event: a\nevent: b\ndata: x\n\n", [E("x", event="b")], id="last-event-wins"),
    pytest.param(b"event\ndata: x\n\n", [E("x")], id="empty-event-is-message"),
    pytest.param(
        b"event: a\ndata: x\n\ndata: y\n\n", [E("x", event="a"), E("y")], id="event-reset"
    ),
    pytest.param(b"event: a\n\ndata: y\n\n", [E("y")], id="event-reset-by-empty-block"),
    # data
    pytest.param(b"data: a\ndata:\n\n", [E("a\n")], id="only-one-trailing-lf-stripped"),
    pytest.param(b"data\ndata\ndata\n\n", [E("\n\n")], id="empty-lines"),
    pytest.param(b"data: \x00\n\n", [E("\x00")], id="nul-in-data"),
    pytest.param(b"\n\n\n", [], id="blank-lines-only"),
    # id
    pytest.param(b"id: 1\ndata: a\n\ndata: b\n\n", [E("a", id="1"), E("b", id="1")], id="carry"),
    pytest.param(b"data: a\nid: 1\n\n", [E("a", id="1")], id="id-after-data"),
    pytest.param(b"id: 1\n\ndata: a\n\n", [E("a", id="1")], id="id-only-block"),
    pytest.param(b"id: 1\ndata: a\n\nid\ndata: b\n\n", [E("a", id="1"), E("b")], id="reset"),
    pytest.param(b"id: 1\n\nid: 2\x003\ndata: a\n\n", [E("a", id="1")], id="nul-id-ignored"),
    pytest.param(b"id:  1\ndata: a\n\n", [E("a", id=" 1")], id="id-one-space"),
    # retry rides on the event of its own block only
    pytest.param(b"retry: 10\ndata: a\n\ndata: b\n\n", [E("a", retry=10), E("b")], id="retry"),
    pytest.param(b"retry: 10\n\ndata: a\n\n", [E("a")], id="retry-block-alone"),
    pytest.param(b"retry: x\ndata: a\n\n", [E("a")], id="retry-invalid-not-on-event"),
]


@pytest.mark.parametrize("chunker", CHUNKERS)
@pytest.mark.parametrize(("stream", "events"), RULES)
def test_rules(chunker: Chunker, stream: bytes, events: list[ServerSentEvent]) -> None:
    assert decode(chunker(stream))[0] == events


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        pytest.param([b"data: a\r", b"\ndata: b\r\n\r\n"], [E("a\nb")], id="crlf-split"),
        pytest.param([b"data: a\r", b"", b"\ndata: b\n\n"], [E("a\nb")], id="crlf-split-empty"),
        pytest.param([b"data: a\r", b"\n", b"\n"], [E("a")], id="crlf-split-then-lf"),
        pytest.param([b"data: a\r", b"\r\n"], [E("a")], id="cr-then-crlf-is-two"),
        pytest.param([b"data: a\r", b"\n"], [], id="crlf-split-is-one-ending"),
        pytest.param([b"data: a\r", b"\xc3", b"\xa9: x\n\n"], [E("a")], id="cr-then-utf8"),
        pytest.param([b"data: a\r", b"\xc3"], [], id="cr-then-partial-char"),
        pytest.param([b"data: a\r\r", b"\n"], [E("a")], id="cr-cr-then-lf"),
        pytest.param([b"\xef", b"\xbb", b"\xbfdata: a\n\n"], [E("a")], id="bom-split"),
        pytest.param([b"\xef\xbb", b"\xbf\xef\xbb\xbfdata: a\n\n"], [], id="bom-split-twice"),
        pytest.param([b"\xef", b"data: a\n\n"], [], id="bom-prefix-then-text"),
        pytest.param([b"data: \xf0\x9f", b"\x8e", b"\x89\n\n"], [E("🎉")], id="emoji-split"),
        pytest.param([b"data: \xe6", b"\xbcA\n\n"], [E("\ufffdA")], id="bad-split"),
        pytest.param([b"da", b"ta: a", b"b\n", b"\n"], [E("ab")], id="line-split"),
        pytest.param([b"data: a\n", b"\n", b"data: b\n\n"], [E("a"), E("b")], id="per-line"),
    ],
)
def test_chunk_boundaries(chunks: list[bytes], events: list[ServerSentEvent]) -> None:
    assert decode(chunks)[0] == events


def test_feed_returns_only_events_completed_by_the_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [E("a")]
    assert decoder.feed(b"\ndata: c\n\n") == [E("b"), E("c")]
    assert decoder.feed(b": x") == []
    assert decoder.comments == 0
    assert decoder.feed(b"\n") == []
    assert decoder.comments == 1


@pytest.mark.parametrize(
    ("stream", "retry"),
    [
        pytest.param(b"", None, id="never"),
        pytest.param(b"retry: 1000\n", 1000, id="applies-before-blank-line"),
        pytest.param(b"retry: 0\n\n", 0, id="zero"),
        pytest.param(b"retry:5\n\n", 5, id="no-space"),
        pytest.param(b"retry: 0010\n\n", 10, id="leading-zeros"),
        pytest.param(b"retry: 1\nretry: 2\n\n", 2, id="last-wins"),
        pytest.param(b"retry: 1\nretry: x\n\n", 1, id="invalid-keeps-previous"),
        pytest.param(b"retry\n\n", None, id="no-value"),
        pytest.param(b"retry: \n\n", None, id="empty"),
        pytest.param(b"retry: 10a\n\n", None, id="trailing-letter"),
        pytest.param(b"retry: -1\n\n", None, id="negative"),
        pytest.param(b"retry: +1\n\n", None, id="plus"),
        pytest.param(b"retry: 1.5\n\n", None, id="decimal"),
        pytest.param(b"retry:  100\n\n", None, id="second-space-not-digit"),
        pytest.param(b"retry: 100 \n\n", None, id="trailing-space"),
        pytest.param("retry: ١٢\n\n".encode(), None, id="arabic-digits"),
        pytest.param("retry: ²\n\n".encode(), None, id="superscript"),
        pytest.param(f"retry: {MAX_RETRY}\n\n".encode(), MAX_RETRY, id="u64-max"),
        pytest.param(f"retry: {MAX_RETRY + 1}\n\n".encode(), None, id="u64-overflow"),
        pytest.param(b"retry: " + b"0" * 10_000 + b"7\n\n", 7, id="very-long-zero-padded"),
        pytest.param(b"retry: " + b"9" * 10_000 + b"\n\n", None, id="very-long"),
        pytest.param(b"retry: 5\ndata: x", 5, id="kept-when-event-discarded"),
    ],
)
def test_retry(stream: bytes, retry: int | None) -> None:
    assert decode([stream])[1].retry == retry


@pytest.mark.parametrize(
    ("stream", "last_id"),
    [
        pytest.param(b"", "", id="never"),
        pytest.param(b"id: 1\n\n", "1", id="id-only-block-commits"),
        pytest.param(b"id: 1\n\nid\n\n", "", id="empty-id-resets"),
        pytest.param(b"id: 1\n\nid: 2\x00\n\n", "1", id="nul-ignored"),
        pytest.param(b"id: 1\ndata: a\n\ndata: b\n\n", "1", id="kept-by-later-events"),
        # The id of an event cut off by the disconnect was never delivered: resuming after it
        # would skip that event.
        pytest.param(b"id: 1\ndata: a\n\nid: 2\ndata: b\n", "1", id="uncommitted-id-discarded"),
        pytest.param(b"id: 1\n\nid: 2", "1", id="partial-line-discarded"),
    ],
)
def test_last_event_id(stream: bytes, last_id: str) -> None:
    assert decode([stream])[1].last_event_id == last_id


@pytest.mark.parametrize(
    ("stream", "comments"),
    [
        pytest.param(b"", 0, id="none"),
        pytest.param(b":\n", 1, id="bare-colon"),
        pytest.param(b": ping\n\n: ping\n\n", 2, id="heartbeats"),
        pytest.param(b": a\r\n: b\r: c\n", 3, id="any-line-ending"),
        pytest.param(b"data: :no\n\n", 0, id="colon-in-value"),
        pytest.param(b" : no\n\n", 0, id="leading-space-is-a-field"),
        pytest.param(b": partial", 0, id="partial-line-not-counted"),
    ],
)
def test_comments_counted(stream: bytes, comments: int) -> None:
    assert decode([stream])[1].comments == comments


@pytest.mark.parametrize(
    ("first", "second", "events"),
    [
        pytest.param(b"data: lost", b"\n\ndata: b\n\n", [E("b")], id="partial-line-discarded"),
        pytest.param(b"data: lost\n", b"\ndata: b\n\n", [E("b")], id="pending-data-discarded"),
        pytest.param(b"event: lost\n", b"data: b\n\n", [E("b")], id="pending-event-discarded"),
        pytest.param(b"retry: 5\n", b"data: b\n\n", [E("b")], id="pending-block-retry-discarded"),
        pytest.param(b"data: a\r", b"\ndata: b\n\n", [E("b")], id="pending-cr-forgotten"),
        pytest.param(b"data: \xc3", b"\xa9\n\n", [], id="partial-line-and-char-discarded"),
        pytest.param(b"\xef\xbb", b"\xbfdata: b\n\n", [], id="partial-bom-discarded"),
        pytest.param(b"", b"\xef\xbb\xbfdata: b\n\n", [E("b")], id="bom-stripped-again"),
        pytest.param(b"id: 1\n\n", b"data: b\n\n", [E("b", id="1")], id="id-carries-over"),
        pytest.param(b"id: 1\n\nid: 2\n", b"data: b\n\n", [E("b", id="1")], id="uncommitted-id"),
    ],
)
def test_close_ends_stream_and_decoder_is_reusable(
    first: bytes, second: bytes, events: list[ServerSentEvent]
) -> None:
    decoder = SSEDecoder()
    decoder.feed(first)
    assert decoder.close() == []
    assert decoder.feed(second) == events
    assert decoder.close() == []


def test_close_keeps_stream_state() -> None:
    decoder = SSEDecoder()
    decoder.feed(b": hb\nretry: 250\nid: e-1\n\n")
    decoder.close()
    assert (decoder.last_event_id, decoder.retry, decoder.comments) == ("e-1", 250, 1)


def test_close_is_idempotent() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: x\n")
    assert decoder.close() == decoder.close() == []


def test_long_line_in_many_chunks() -> None:
    decoder = SSEDecoder()
    payload = "x" * 200_000
    stream = f"data: {payload}\n\n".encode()
    events: list[ServerSentEvent] = []
    for i in range(0, len(stream), 7):
        events += decoder.feed(stream[i : i + 7])
    assert events == [E(payload)]


def test_event_is_frozen() -> None:
    with pytest.raises(AttributeError):
        E("x").data = "y"  # type: ignore[misc]
