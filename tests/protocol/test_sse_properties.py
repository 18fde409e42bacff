"""Properties of the SSE codec: chunking never changes the result, the decoder agrees with a
literal transliteration of the WHATWG algorithm, and encode -> decode round-trips."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_lab.errors import SSEEncodeError
from realtime_lab.protocol.sse import (
    MAX_RETRY,
    ServerSentEvent,
    SSEDecoder,
    encode_event,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


@dataclass(frozen=True)
class Outcome:
    events: list[ServerSentEvent]
    last_event_id: str
    retry: int | None
    comments: int


def run_decoder(chunks: list[bytes]) -> Outcome:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return Outcome(events, decoder.last_event_id, decoder.retry, decoder.comments)


def reference(stream: bytes) -> Outcome:
    """The spec's steps, as literally as possible, on the whole stream at once."""
    text = stream.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    events: list[ServerSentEvent] = []
    data, event_type, id_buffer, last_event_id = "", "", "", ""
    retry: int | None = None
    block_retry: int | None = None
    comments = 0
    pos = 0
    while True:
        end = pos
        while end < len(text) and text[end] not in "\r\n":
            end += 1
        if end == len(text):
            break  # end of file: the partial line and pending event are discarded
        line = text[pos:end]
        pos = end + 2 if text[end : end + 2] == "\r\n" else end + 1
        if line == "":
            last_event_id = id_buffer
            if data == "":
                event_type, block_retry = "", None
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(
                ServerSentEvent(data, event_type or "message", last_event_id, block_retry)
            )
            data, event_type, block_retry = "", "", None
            continue
        if line.startswith(":"):
            comments += 1
            continue
        if ":" in line:
            name, value = line[: line.index(":")], line[line.index(":") + 1 :]
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                id_buffer = value
        elif (
            name == "retry"
            and value
            and all(c in "0123456789" for c in value)
            and int(value) <= MAX_RETRY
        ):
            retry = block_retry = int(value)
    return Outcome(events, last_event_id, retry, comments)


def split_at(stream: bytes, points: list[int]) -> list[bytes]:
    # Repeated points give empty chunks, which feed() must also take in its stride.
    bounds = [0, *sorted(points), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --- stream generator ------------------------------------------------------------------------

interesting_chars = st.sampled_from(
    [*"ab :0123456789", "\x00", "\t", "é", "漢", "字", "🎉", "\ufeff", "\u2028", "\x0b"]
)
values = st.one_of(
    st.text(interesting_chars, max_size=8),
    st.integers(0, 10**6).map(str),
    st.text(max_size=6),  # anything, line breaks included
)
names = st.sampled_from(["data", "event", "id", "retry", "", "foo", "Data", " data", "dat"])
endings = st.sampled_from(["\n", "\r", "\r\n"])


@st.composite
def field_lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["field", "bare", "comment", "blank"]))
    if kind == "blank":
        return ""
    if kind == "comment":
        return ":" + draw(values)
    if kind == "bare":
        return draw(names)
    sep = draw(st.sampled_from([":", ": ", ":  "]))
    return draw(names) + sep + draw(values)


# Invalid or truncated UTF-8 (no str encodes to these), stray BOMs and extra line breaks.
raw_bytes = st.sampled_from(
    [
        *(b"\xff", b"\x80", b"\xc3", b"\xe6\xbc", b"\xf0\x9f\x8e", b"\xed\xa0\x80"),
        *(b"\xef\xbb", b"\xef\xbb\xbf", b"\r", b"\n"),
    ]
)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    if draw(st.booleans()):
        parts.append(b"\xef\xbb\xbf" * draw(st.integers(1, 2)))
    for line in draw(st.lists(field_lines(), max_size=25)):
        parts.append((line + draw(endings)).encode("utf-8", "surrogatepass"))
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(raw_bytes))
    if draw(st.booleans()):
        parts.append(draw(field_lines()).encode("utf-8", "surrogatepass"))  # unterminated
    return b"".join(parts)


any_streams = st.one_of(streams(), st.binary(max_size=200))


@PROPERTY_SETTINGS
@given(stream=any_streams, data=st.data())
def test_chunking_never_changes_the_result(stream: bytes, data: st.DataObject) -> None:
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=30), label="split points")
    assert run_decoder(split_at(stream, points)) == run_decoder([stream])


@PROPERTY_SETTINGS
@given(stream=any_streams)
def test_byte_at_a_time_equals_whole(stream: bytes) -> None:
    assert run_decoder([stream[i : i + 1] for i in range(len(stream))]) == run_decoder([stream])


@PROPERTY_SETTINGS
@given(stream=any_streams)
def test_decoder_agrees_with_reference(stream: bytes) -> None:
    assert run_decoder([stream]) == reference(stream)


def _normalise(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


@PROPERTY_SETTINGS
@given(data=st.text())
def test_data_roundtrips(data: str) -> None:
    assert run_decoder([encode_event(data)]).events == [ServerSentEvent(_normalise(data))]


@PROPERTY_SETTINGS
@given(data=st.text(st.characters(codec="utf-8", blacklist_characters="\r")))
def test_data_without_cr_roundtrips_exactly(data: str) -> None:
    assert run_decoder([encode_event(data)]).events == [ServerSentEvent(data)]


field_text = st.text(st.characters(codec="utf-8", blacklist_characters="\r\n\x00"))


@PROPERTY_SETTINGS
@given(
    data=st.text(),
    event=field_text.filter(bool),
    event_id=field_text,
    retry=st.none() | st.integers(0, MAX_RETRY),
)
def test_event_roundtrips(data: str, event: str, event_id: str, retry: int | None) -> None:
    value = ServerSentEvent(_normalise(data), event, event_id, retry)
    outcome = run_decoder([encode_event(data, event=event, id=event_id, retry=retry)])
    assert outcome.events == [value]
    assert outcome.last_event_id == event_id
    assert outcome.retry == retry


@PROPERTY_SETTINGS
@given(events=st.lists(st.tuples(st.text(max_size=20), st.none() | field_text), max_size=10))
def test_concatenated_events_carry_ids(events: list[tuple[str, str | None]]) -> None:
    stream = b"".join(encode_event(data, id=event_id) for data, event_id in events)
    expected, current = [], ""
    for data, event_id in events:
        current = current if event_id is None else event_id
        expected.append(ServerSentEvent(_normalise(data), id=current))
    assert run_decoder([stream]).events == expected


@PROPERTY_SETTINGS
@given(value=st.text(max_size=10), field=st.sampled_from(["event", "id"]))
def test_event_and_id_refused_exactly_when_unencodable(value: str, field: str) -> None:
    unencodable = any(c in value for c in "\r\n\x00")
    try:
        if field == "event":
            encode_event("x", event=value)
        else:
            encode_event("x", id=value)
    except SSEEncodeError:
        assert unencodable
    else:
        assert not unencodable
