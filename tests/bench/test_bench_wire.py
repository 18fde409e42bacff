"""The load clients' fast parsers give the same answers as the full decoders, however TCP cuts
the bytes."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_lab.bench import wire
from realtime_lab.bus.base import Replay
from realtime_lab.errors import WebSocketProtocolError
from realtime_lab.protocol.envelope import Event
from realtime_lab.protocol.sse import SSEDecoder, encode_event
from realtime_lab.transports.polling import render
from realtime_lab.transports.sse import PING_CHUNK, chunked, sse_chunk
from realtime_lab.transports.ws import PING_FRAME, text_frame, ws_frame

SETTINGS = settings(max_examples=150, deadline=None)


def _event(seq: int, kind: str = "token", text: str = "hi") -> Event:
    data = {"text": text, "index": seq - 1} if kind == "token" else {"reason": "done"}
    return Event("chat.abc", f"k3x9-{seq}", kind, data, 1_700_000_000_000.0 + seq / 7, seq)


# A server-made stream: retry, tokens (one with tricky text), a ping, then the end event.
TRICKY = 'say "ts":1} and "type":"end" \n\n data: x'
EVENTS = [_event(1), _event(2, text=TRICKY), _event(3, text="naïve 東京"), _event(4, "end")]
STREAM = (
    chunked(b"retry: 1000\n\n")
    + b"".join(sse_chunk(e) for e in EVENTS[:2])
    + PING_CHUNK
    + b"".join(sse_chunk(e) for e in EVENTS[2:])
    + b"0\r\n\r\n"
)
EXPECTED = [wire.Item(None if e.type == "token" else e.type, e.seq, e.ts, e.json) for e in EVENTS]


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@SETTINGS
@given(st.lists(st.integers(min_value=0), max_size=40))
def test_chunked_sse_stream_parses_the_same_however_it_is_cut(points: list[int]) -> None:
    chunks, parser = wire.ChunkedDecoder(), wire.SSEParser()
    items: list[wire.Item] = []
    for piece in _cuts(STREAM, points):
        items.extend(parser.feed(chunks.feed(piece)))
    assert items == EXPECTED
    assert chunks.finished


def test_fast_sse_path_agrees_with_the_whatwg_decoder() -> None:
    body = b"".join(sse_chunk(e)[sse_chunk(e).index(b"\r\n") + 2 : -2] for e in EVENTS)
    slow = SSEDecoder().feed(body)
    assert [(e.id, json.loads(e.data)["ts"]) for e in slow] == [
        (f"k3x9-{i.seq}", i.ts) for i in wire.SSEParser().feed(body)
    ]


def test_crlf_streams_fall_back_to_the_full_decoder() -> None:
    body = encode_event(EVENTS[0].json.decode(), id=EVENTS[0].id).replace(b"\n", b"\r\n")
    parser = wire.SSEParser()
    assert parser.feed(body[:7]) == []
    assert parser.feed(body[7:]) == [EXPECTED[0]]


def test_overflow_error_event_is_reported_with_its_payload() -> None:
    body = encode_event('{"code":"overflow","last_id":"k3x9-9"}', event="error")
    [item] = wire.SSEParser().feed(body)
    assert item.kind == "error"
    assert item.seq == -1
    assert math.isnan(item.ts)
    assert b"overflow" in item.payload


def test_chunk_extensions_are_ignored() -> None:
    decoder = wire.ChunkedDecoder()
    assert decoder.feed(b"5;name=value\r\nhello\r\n0\r\n\r\n") == b"hello"
    assert decoder.finished


def test_chunked_decoder_rejects_garbage() -> None:
    with pytest.raises(wire.BenchProtocolError):
        wire.ChunkedDecoder().feed(b"zz\r\nhello\r\n")
    with pytest.raises(wire.BenchProtocolError):
        wire.ChunkedDecoder().feed(b"2\r\nhello\r\n")


def test_envelope_item_fast_path_and_fallbacks() -> None:
    token = _event(7, text=TRICKY)
    assert wire.envelope_item(token.json) == wire.Item(None, 7, token.ts, token.json)
    end = _event(8, "end")
    assert wire.envelope_item(end.json)[:3] == ("end", 8, end.ts)
    # Another key order (not this server's encoder) still reads right, through json.loads.
    shuffled = json.dumps({"ts": 5.5, "type": "token", "id": "e-3", "channel": "c", "data": {}})
    assert wire.envelope_item(shuffled.encode())[:3] == (None, 3, 5.5)
    # The WebSocket error answer to a bad client message has id and ts null.
    problem = b'{"channel":"c","id":null,"type":"error","data":{"code":"x"},"ts":null}'
    kind, seq, ts, _ = wire.envelope_item(problem)
    assert (kind, seq, math.isnan(ts)) == ("error", -1, True)


@SETTINGS
@given(st.lists(st.integers(min_value=0), max_size=30))
def test_ws_frames_parse_however_they_are_cut(points: list[int]) -> None:
    big = _event(9, text="x" * 70_000)
    medium = _event(10, text="y" * 300)
    frames = [ws_frame(_event(1)), PING_FRAME, ws_frame(medium), ws_frame(big)]
    # A fragmented message: first fragment (FIN clear), a ping in between, the continuation.
    frames += [b"\x01\x03abc", PING_FRAME, b"\x80\x03def"]
    stream = b"".join(frames)
    parser = wire.WSFrameParser()
    got: list[tuple[int, bytes]] = []
    for piece in _cuts(stream, points):
        got.extend((opcode, payload) for opcode, payload, _, _ in parser.feed(piece))
    assert got == [
        (wire.OP_TEXT, _event(1).json),
        (wire.OP_PING, b""),
        (wire.OP_TEXT, medium.json),
        (wire.OP_TEXT, big.json),
        (wire.OP_PING, b""),
        (wire.OP_TEXT, b"abcdef"),
    ]


def test_masked_server_frames_are_refused() -> None:
    with pytest.raises(WebSocketProtocolError):
        wire.WSFrameParser().feed(wire.client_frame(wire.OP_TEXT, b"hi"))


def test_client_frames_are_masked_and_round_trip() -> None:
    mask = b"\x01\x02\x03\x04"
    frame = wire.client_frame(wire.OP_PONG, b"ping!", mask)
    assert frame[0] == 0x80 | wire.OP_PONG
    assert frame[1] == 0x80 | 5
    assert frame[2:6] == mask
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(frame[6:])) == b"ping!"
    assert text_frame(b"ping!")[2:] == b"ping!"  # the server's frames carry it unmasked


def test_ws_accept_matches_rfc6455_example() -> None:
    assert wire.ws_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_parse_head_waits_for_the_blank_line_and_rejects_non_http() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A:  b \r\n\r\nhi"
    assert wire.parse_head(raw[:20]) is None
    parsed = wire.parse_head(raw)
    assert parsed is not None
    head, offset = parsed
    assert head.status == 200
    assert head.headers == {"content-length": "2", "x-a": "b"}
    assert raw[offset:] == b"hi"
    with pytest.raises(wire.BenchProtocolError):
        wire.parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_poll_answer_reads_the_servers_render() -> None:
    body = render(Replay([_event(1), _event(2), _event(3, "end")], "k3x9-3", more=True))
    items, cursor, more = wire.poll_answer(body)
    assert [(i.kind, i.seq) for i in items] == [(None, 1), (None, 2), ("end", 3)]
    assert items[0].ts == _event(1).ts
    assert cursor == "k3x9-3"
    assert more is True
    with pytest.raises(wire.BenchProtocolError):
        wire.poll_answer(b'{"nope": 1}')


def test_seq_of() -> None:
    assert wire.seq_of("k3x9-42") == 42
    assert wire.seq_of(b"ab-0") == 0
    assert wire.seq_of("garbage") == -1
    assert wire.seq_of("a-b") == -1


def test_post_request_carries_its_json_body() -> None:
    body = '{"prompt":"héllo"}'.encode()
    raw = wire.post_request("/api/chats/stream?client=t", "h:1", body, {"Accept": "x"})
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"POST /api/chats/stream?client=t HTTP/1.1",
        b"Host: h:1",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Accept: x",
    ]
    assert rest == body


def test_the_fetch_streams_opening_chat_event_is_an_item_of_its_own() -> None:
    # As the server writes it: retry: joined to the chat event's block, then an event.
    opening = b'retry: 1000\nevent: chat\ndata: {"chat":{"id":"ab12","channel":"chat.ab12"}}\n\n'
    token = encode_event(
        '{"channel":"chat.ab12","id":"ab12-1","type":"token","data":{},"ts":5.0}', id="ab12-1"
    )
    items = wire.SSEParser().feed(opening + token)
    assert [(i.kind, i.seq) for i in items] == [("chat", -1), (None, 1)]
