"""permessage-deflate (RFC 7692) without a server: offers parsed and answered per mode, the RFC's
own examples, per-message output that needs no context, per-connection output that keeps one,
and an inflater that refuses bombs and garbage."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_lab.errors import WebSocketProtocolError
from realtime_lab.protocol.deflate import (
    DEFAULT_WINDOW_BITS,
    Agreement,
    ConnectionDeflater,
    Inflater,
    context_bytes,
    deflate_message,
    negotiate,
    parse_offers,
)
from realtime_lab.protocol.websocket import (
    OP_TEXT,
    FrameDecoder,
    deflated_text_frame,
    encode_frame,
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)
ENVELOPE = (
    b'{"channel":"ticker","id":"k3j2-%d","type":"token",'
    b'"data":{"text":" word%d","index":%d},"ts":1764622000%03d.5}'
)


def envelope(i: int) -> bytes:
    return ENVELOPE % (i, i % 7, i, i % 1000)


# Parsing offers ----------------------------------------------------------------------------------


def test_parse_offers_keeps_only_deflate_offers_in_order() -> None:
    header = (
        "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits, "
        'permessage-deflate; server_max_window_bits="10"; Client_No_Context_Takeover'
    )
    assert parse_offers(header) == [
        {"client_max_window_bits": None},
        {"server_max_window_bits": "10", "client_no_context_takeover": None},
    ]
    # Several header lines are one list.
    assert parse_offers(["foo", "permessage-deflate"]) == [{}]
    assert parse_offers(None) == []
    assert parse_offers("") == []


@pytest.mark.parametrize(
    "header",
    [
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",  # twice
        "permessage-deflate; server_max_window_bits=",  # empty value
        "permessage-deflate; =10",  # no name
    ],
)
def test_broken_offers_are_declined_not_raised(header: str) -> None:
    assert parse_offers(header) == []
    assert negotiate(header, "connection") is None


# Negotiating -------------------------------------------------------------------------------------


def test_off_answers_nothing_and_bad_settings_raise() -> None:
    assert negotiate("permessage-deflate", "off") is None
    with pytest.raises(ValueError, match="mode"):
        negotiate("permessage-deflate", "fast")
    with pytest.raises(ValueError, match="window"):
        negotiate("permessage-deflate", "connection", window_bits=8)


def test_what_chromium_and_websockets_offer() -> None:
    offer = "permessage-deflate; client_max_window_bits"
    message = negotiate(offer, "message")
    assert message == Agreement(context_takeover=False)
    assert message.header() == "permessage-deflate; server_no_context_takeover"
    connection = negotiate(offer, "connection")
    assert connection == Agreement(context_takeover=True, window_bits=DEFAULT_WINDOW_BITS)
    assert (
        connection.header() == f"permessage-deflate; server_max_window_bits={DEFAULT_WINDOW_BITS}"
    )
    assert negotiate(offer, "connection", window_bits=15).header() == "permessage-deflate"


@pytest.mark.parametrize(
    ("offer", "header"),
    [
        # The client asks the server not to keep a context: message mode for it.
        (
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover",
        ),
        # A smaller window than the server's wins; a larger one does not raise it.
        (
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10",
        ),
        (
            "permessage-deflate; server_max_window_bits=15",
            "permessage-deflate; server_max_window_bits=12",
        ),
        # 8 cannot be kept by zlib: that offer is declined, the next one taken.
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate",
            "permessage-deflate; server_max_window_bits=12",
        ),
        # The client resets its own context: said back so it knows it was heard.
        (
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=12; client_no_context_takeover",
        ),
        (
            "permessage-deflate; client_max_window_bits=9",
            "permessage-deflate; server_max_window_bits=12",
        ),
    ],
)
def test_connection_mode_answers(offer: str, header: str) -> None:
    agreement = negotiate(offer, "connection")
    assert agreement is not None
    assert agreement.header() == header


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; unknown",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=yes",
        "permessage-deflate; server_max_window_bits",  # needs a value in an offer
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; server_max_window_bits=x",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=8",
        "deflate-frame",
    ],
)
def test_unacceptable_offers_are_declined(offer: str) -> None:
    assert negotiate(offer, "message") is None
    assert negotiate(offer, "connection") is None


# Compressing -------------------------------------------------------------------------------------


def test_rfc7692_hello_example() -> None:
    # Section 7.2.3.1: "Hello" compressed, tail removed; section 7.2.3.2: its frame.
    payload = bytes.fromhex("f248cdc9c90700")
    assert Inflater().message(payload) == b"Hello"
    assert ConnectionDeflater(window_bits=15, mem_level=8).message(b"Hello") == payload
    assert deflated_text_frame(payload) == bytes.fromhex("c107f248cdc9c90700")
    assert deflated_text_frame(payload) == encode_frame(OP_TEXT, payload, rsv1=True)
    # Section 7.2.3.2: the second "Hello" with the context kept refers to the first.
    deflater = ConnectionDeflater(window_bits=15, mem_level=8)
    deflater.message(b"Hello")
    assert deflater.message(b"Hello") == bytes.fromhex("f200110000")


@pytest.mark.parametrize("size", [125, 126, 65535, 65536])
def test_deflated_frames_at_every_length_boundary(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = deflated_text_frame(payload)
    assert frame == encode_frame(OP_TEXT, payload, rsv1=True)
    assert FrameDecoder(rsv1=True).feed(frame) == [(OP_TEXT, payload, True, True)]


def test_message_output_depends_on_the_message_only() -> None:
    first = deflate_message(envelope(1))
    for i in range(2, 20):
        deflate_message(envelope(i))  # other messages in between change nothing
    assert deflate_message(envelope(1)) == first
    fresh = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    alone = fresh.compress(envelope(1)) + fresh.flush(zlib.Z_SYNC_FLUSH)
    assert first == alone[:-4]


def test_message_that_does_not_shrink_is_sent_plain() -> None:
    assert deflate_message(b"{}") is None
    assert deflate_message(bytes(range(100))) is None
    compressed = deflate_message(envelope(3))
    assert compressed is not None
    assert len(compressed) < len(envelope(3))


@given(st.lists(st.binary(min_size=1, max_size=400), min_size=1, max_size=12))
@PROPERTY_SETTINGS
def test_each_message_inflates_with_a_fresh_context(messages: list[bytes]) -> None:
    inflater = Inflater(no_context_takeover=True)
    for message in messages:
        compressed = deflate_message(message)
        if compressed is not None:
            assert inflater.message(compressed) == message
            assert zlib.decompressobj(-15).decompress(compressed + b"\x00\x00\xff\xff") == message


@given(
    st.lists(st.binary(min_size=0, max_size=400), min_size=1, max_size=12),
    st.integers(9, 15),
    st.integers(1, 9),
)
@PROPERTY_SETTINGS
def test_connection_stream_inflates_in_order(messages: list[bytes], bits: int, level: int) -> None:
    deflater = ConnectionDeflater(window_bits=bits, mem_level=level)
    inflater = Inflater()
    for message in messages:
        assert inflater.message(deflater.message(message)) == message


def test_context_takeover_pays_on_a_token_feed() -> None:
    envelopes = [envelope(i) for i in range(60)]
    plain = sum(map(len, envelopes))
    per_message = sum(len(deflate_message(e) or e) for e in envelopes)
    deflater = ConnectionDeflater()
    per_connection = sum(len(deflater.message(e)) for e in envelopes)
    assert per_message < plain
    assert per_connection < per_message / 2


def test_context_bytes_follows_zlib_formula() -> None:
    assert context_bytes(15, 8) == 256 * 1024 + 6 * 1024
    assert context_bytes(12, 5) == 32 * 1024 + 6 * 1024


# Inflating ---------------------------------------------------------------------------------------


def test_inflater_refuses_a_bomb_with_1009() -> None:
    bomb = ConnectionDeflater().message(b" " * 1_000_000)
    assert len(bomb) < 2000
    with pytest.raises(WebSocketProtocolError) as info:
        Inflater(max_size=65536).message(bomb)
    assert info.value.code == 1009
    assert Inflater(max_size=1_000_000).message(bomb) == b" " * 1_000_000


def test_inflater_refuses_garbage_with_1007() -> None:
    with pytest.raises(WebSocketProtocolError) as info:
        Inflater().message(b"\xff\xff\xff\xff")
    assert info.value.code == 1007


def test_inflater_without_takeover_forgets_and_with_it_remembers() -> None:
    deflater = ConnectionDeflater(window_bits=15, mem_level=8)
    first, second = deflater.message(b"Hello"), deflater.message(b"Hello")
    keeping = Inflater()
    assert [keeping.message(first), keeping.message(second)] == [b"Hello", b"Hello"]
    forgetting = Inflater(no_context_takeover=True)
    assert forgetting.message(first) == b"Hello"
    with pytest.raises(WebSocketProtocolError):
        forgetting.message(second)  # refers to a window it no longer has
