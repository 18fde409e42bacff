"""WebSocket framing (RFC 6455): the RFC's own vectors, every length boundary, masking, feeds cut
at every offset, control-frame limits, and refusals of malformed input."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_lab.errors import ProtocolError, WebSocketProtocolError
from realtime_lab.protocol.websocket import (
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PING_FRAME,
    Frame,
    FrameDecoder,
    accept_key,
    close_frame,
    close_frame_size,
    close_payload,
    encode_frame,
    new_key,
    parse_close,
    text_frame,
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)

# RFC 6455 section 5.7 uses this masking key for every masked example.
RFC_MASK = bytes((0x37, 0xFA, 0x21, 0x3D))
LENGTH_BOUNDARIES = [0, 1, 125, 126, 127, 65535, 65536, 65537]


def decode_all(data: bytes, **options: bool) -> list[Frame]:
    return FrameDecoder(**options).feed(data)


def refused(data: bytes, **options: bool | int) -> WebSocketProtocolError:
    with pytest.raises(WebSocketProtocolError) as info:
        FrameDecoder(**options).feed(data)  # type: ignore[arg-type]
    return info.value


# RFC 6455 section 5.7 and section 1.3 ----------------------------------------------------------


def test_rfc_unmasked_text_hello() -> None:
    wire = bytes((0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F))
    assert encode_frame(OP_TEXT, b"Hello") == wire
    assert text_frame(b"Hello") == wire
    assert decode_all(wire) == [(OP_TEXT, b"Hello", True, False)]


def test_rfc_masked_text_hello() -> None:
    wire = bytes((0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58))
    assert encode_frame(OP_TEXT, b"Hello", mask=RFC_MASK) == wire
    assert decode_all(wire, masked=True) == [(OP_TEXT, b"Hello", True, False)]


def test_rfc_fragmented_unmasked_text() -> None:
    first = bytes((0x01, 0x03, 0x48, 0x65, 0x6C))
    last = bytes((0x80, 0x02, 0x6C, 0x6F))
    assert encode_frame(OP_TEXT, b"Hel", fin=False) == first
    assert encode_frame(OP_CONTINUATION, b"lo") == last
    assert decode_all(first + last) == [
        (OP_TEXT, b"Hel", False, False),
        (OP_CONTINUATION, b"lo", True, False),
    ]
    assert decode_all(first + last, reassemble=True) == [(OP_TEXT, b"Hello", True, False)]


def test_rfc_unmasked_ping_and_masked_pong() -> None:
    ping = bytes((0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F))
    pong = bytes((0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58))
    assert encode_frame(OP_PING, b"Hello") == ping
    assert encode_frame(OP_PONG, b"Hello", mask=RFC_MASK) == pong
    assert decode_all(ping) == [(OP_PING, b"Hello", True, False)]
    assert decode_all(pong, masked=True) == [(OP_PONG, b"Hello", True, False)]


@pytest.mark.parametrize(
    ("size", "header"),
    [
        pytest.param(256, bytes((0x82, 0x7E, 0x01, 0x00)), id="256-bytes-16-bit"),
        pytest.param(65536, bytes((0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0)), id="64KiB-64-bit"),
    ],
)
def test_rfc_binary_lengths(size: int, header: bytes) -> None:
    payload = bytes(range(256)) * (size // 256)
    assert encode_frame(OP_BINARY, payload) == header + payload
    assert decode_all(header + payload) == [(OP_BINARY, payload, True, False)]


def test_accept_key_matches_rfc_section_1_3() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_new_key_is_16_random_bytes_in_base64() -> None:
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(len(base64.b64decode(key, validate=True)) == 16 for key in keys)


# Encoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", LENGTH_BOUNDARIES)
def test_every_length_boundary_uses_the_minimal_header(size: int) -> None:
    payload = b"\xaa" * size
    frame = encode_frame(OP_BINARY, payload)
    if size < 126:
        assert frame[:2] == bytes((0x82, size))
    elif size < 65536:
        assert frame[:4] == bytes((0x82, 126)) + size.to_bytes(2)
    else:
        assert frame[:10] == bytes((0x82, 127)) + size.to_bytes(8)
    assert frame.endswith(payload)
    assert len(frame) == size + (2 if size < 126 else 4 if size < 65536 else 10)


@pytest.mark.parametrize("size", LENGTH_BOUNDARIES)
def test_text_frame_is_encode_frame_on_a_shorter_path(size: int) -> None:
    payload = b"x" * size
    assert text_frame(payload) == encode_frame(OP_TEXT, payload)


@pytest.mark.parametrize("size", [*LENGTH_BOUNDARIES, 2, 3, 4, 5])
@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_every_length_round_trips(size: int, masked: bool) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = encode_frame(OP_BINARY, payload, mask=b"\x01\x80\xff\x5a" if masked else None)
    assert decode_all(frame, masked=masked) == [(OP_BINARY, payload, True, False)]


def test_masking_xors_every_byte_with_the_key_in_turn() -> None:
    payload = bytes(range(256)) * 3 + b"tail"
    mask = b"\x0f\xf0\x55\xaa"
    frame = encode_frame(OP_BINARY, payload, mask=mask)
    assert frame[1] == 0x80 | 126
    assert frame[4:8] == mask
    assert frame[8:] == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_flags_fin_and_rsv1() -> None:
    assert encode_frame(OP_TEXT, b"a", fin=False)[0] == 0x01
    assert encode_frame(OP_BINARY, b"a", rsv1=True)[0] == 0x80 | 0x40 | 0x02
    assert encode_frame(OP_TEXT, b"a", fin=False, rsv1=True)[0] == 0x40 | 0x01


def test_ping_frame() -> None:
    assert PING_FRAME == b"\x89\x00"


@pytest.mark.parametrize(
    ("opcode", "payload", "options"),
    [
        pytest.param(0x3, b"", {}, id="reserved-data-opcode"),
        pytest.param(0xB, b"", {}, id="reserved-control-opcode"),
        pytest.param(0x10, b"", {}, id="not-an-opcode"),
        pytest.param(-1, b"", {}, id="negative-opcode"),
        pytest.param(OP_PING, b"x" * 126, {}, id="control-over-125"),
        pytest.param(OP_CLOSE, b"", {"fin": False}, id="fragmented-control"),
        pytest.param(OP_PING, b"", {"rsv1": True}, id="rsv1-on-control"),
        pytest.param(OP_CONTINUATION, b"", {"rsv1": True}, id="rsv1-on-continuation"),
        pytest.param(OP_TEXT, b"", {"mask": b"abc"}, id="short-mask"),
    ],
)
def test_encoder_refusals(opcode: int, payload: bytes, options: dict[str, object]) -> None:
    with pytest.raises(WebSocketProtocolError):
        encode_frame(opcode, payload, **options)  # type: ignore[arg-type]


def test_control_payload_limit_is_inclusive() -> None:
    payload = b"p" * MAX_CONTROL_PAYLOAD
    assert decode_all(encode_frame(OP_PING, payload)) == [(OP_PING, payload, True, False)]


# Close frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("end", "end", id="short"),
        pytest.param("a" * 123, "a" * 123, id="exactly-123"),
        pytest.param("a" * 124, "a" * 123, id="ascii-cut"),
        pytest.param("é" * 62, "é" * 61, id="two-byte-cut-mid-character"),
        pytest.param("€" * 41, "€" * 41, id="three-byte-fits-exactly"),
        pytest.param("€" * 42, "€" * 41, id="three-byte-cut"),
        pytest.param("a" + "🎉" * 31, "a" + "🎉" * 30, id="four-byte-cut-mid-character"),
    ],
)
def test_close_reason_is_cut_to_fit_on_a_character_boundary(reason: str, kept: str) -> None:
    payload = close_payload(1013, reason)
    assert payload[:2] == b"\x03\xf5"
    assert payload[2:].decode() == kept
    assert len(payload) <= MAX_CONTROL_PAYLOAD
    frame = close_frame(1013, reason)
    assert frame == bytes((0x88, len(payload))) + payload
    assert len(frame) == close_frame_size(reason)
    [(opcode, got, fin, _)] = decode_all(frame)
    assert (opcode, fin) == (OP_CLOSE, True)
    assert parse_close(got) == (1013, kept)


def test_masked_close_frame_round_trips() -> None:
    frame = close_frame(1000, "bye", mask=RFC_MASK)
    [(opcode, payload, _, _)] = decode_all(frame, masked=True)
    assert opcode == OP_CLOSE
    assert parse_close(payload) == (1000, "bye")


def test_close_frame_size_without_a_reason_is_header_and_code() -> None:
    assert close_frame_size() == 4 == len(close_frame(1000))


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1013, 1014, 3000, 4999])
def test_close_codes_that_may_be_sent(code: int) -> None:
    assert parse_close(close_payload(code)) == (code, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(WebSocketProtocolError):
        close_payload(code)
    with pytest.raises(WebSocketProtocolError) as info:
        parse_close(code.to_bytes(2))
    assert info.value.code == 1002


def test_close_reason_with_lone_surrogate_is_refused() -> None:
    with pytest.raises(WebSocketProtocolError):
        close_payload(1000, "bad \ud800")


def test_parse_close() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(b"\x03\xe8caf\xc3\xa9") == (1000, "café")
    with pytest.raises(WebSocketProtocolError) as info:
        parse_close(b"\x03")
    assert info.value.code == 1002
    with pytest.raises(WebSocketProtocolError) as info:
        parse_close(b"\x03\xe8caf\xc3")  # a character cut in two: not UTF-8
    assert info.value.code == 1007


# Decoding: cut anywhere ------------------------------------------------------------------------


def _stream(masked: bool) -> tuple[bytes, list[Frame]]:
    """Frames of every kind and length class, and what the decoder must return for them."""
    mask = RFC_MASK if masked else None
    parts = [
        (OP_TEXT, b"Hello", True),
        (OP_PING, b"", True),
        (OP_TEXT, "naïve 東京".encode(), False),  # a fragmented message ...
        (OP_PONG, b"between", True),  # ... with a control frame between its fragments
        (OP_CONTINUATION, b"x" * 300, True),
        (OP_BINARY, b"", True),
        (OP_BINARY, bytes(range(256)) * 2, True),
        (OP_CLOSE, close_payload(1000, "end"), True),
    ]
    wire = b"".join(encode_frame(op, p, fin=fin, mask=mask) for op, p, fin in parts)
    return wire, [(op, p, fin, False) for op, p, fin in parts]


@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_a_stream_cut_in_two_at_every_offset(masked: bool) -> None:
    wire, expected = _stream(masked)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder(masked=masked)
        got = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        assert got == expected, cut


@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_a_stream_fed_one_byte_at_a_time(masked: bool) -> None:
    wire, expected = _stream(masked)
    decoder = FrameDecoder(masked=masked)
    got: list[Frame] = []
    for i in range(len(wire)):
        got.extend(decoder.feed(wire[i : i + 1]))
    assert got == expected


def test_frames_come_out_as_soon_as_they_are_complete() -> None:
    decoder = FrameDecoder()
    first, second = text_frame(b"one"), text_frame(b"two" * 100)
    assert decoder.feed(first + second[:3]) == [(OP_TEXT, b"one", True, False)]
    assert decoder.feed(b"") == []
    assert decoder.feed(second[3:]) == [(OP_TEXT, b"two" * 100, True, False)]


@pytest.mark.parametrize("size", [65536, 70_000])
@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_a_64_bit_frame_cut_in_its_header_or_near_its_end(size: int, masked: bool) -> None:
    payload = bytes(i % 256 for i in range(size))
    wire = encode_frame(OP_BINARY, payload, mask=RFC_MASK if masked else None) + PING_FRAME
    if masked:
        wire = wire[:-2] + encode_frame(OP_PING, mask=RFC_MASK)
    expected = [(OP_BINARY, payload, True, False), (OP_PING, b"", True, False)]
    head = 14 if masked else 10
    for cut in [*range(head + 2), *range(len(wire) - 8, len(wire) + 1)]:
        decoder = FrameDecoder(masked=masked)
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == expected, cut


_FRAMES = st.one_of(
    st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=70_000)),
    st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=MAX_CONTROL_PAYLOAD)),
)


@PROPERTY_SETTINGS
@given(
    frames=st.lists(_FRAMES, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    masked=st.booleans(),
    mask=st.binary(min_size=4, max_size=4),
)
def test_round_trip_however_the_bytes_are_cut(
    frames: list[tuple[int, bytes]], cuts: list[int], masked: bool, mask: bytes
) -> None:
    wire = b"".join(encode_frame(op, p, mask=mask if masked else None) for op, p in frames)
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    decoder = FrameDecoder(masked=masked)
    got: list[Frame] = []
    for a, b in itertools.pairwise(bounds):
        got.extend(decoder.feed(wire[a:b]))
    assert got == [(op, p, True, False) for op, p in frames]


# Decoding: reassembly, RSV1, size limit --------------------------------------------------------


def test_reassembly_joins_fragments_and_passes_control_frames_first() -> None:
    wire = (
        encode_frame(OP_BINARY, b"ab", fin=False)
        + PING_FRAME
        + encode_frame(OP_CONTINUATION, b"cd", fin=False)
        + encode_frame(OP_CONTINUATION, b"ef")
        + text_frame(b"next")
    )
    expected = [
        (OP_PING, b"", True, False),
        (OP_BINARY, b"abcdef", True, False),
        (OP_TEXT, b"next", True, False),
    ]
    assert decode_all(wire, reassemble=True) == expected
    decoder = FrameDecoder(reassemble=True)
    got: list[Frame] = []
    for i in range(len(wire)):
        got.extend(decoder.feed(wire[i : i + 1]))
    assert got == expected


def test_rsv1_is_allowed_on_a_first_frame_when_negotiated() -> None:
    wire = encode_frame(OP_TEXT, b"z", fin=False, rsv1=True) + encode_frame(OP_CONTINUATION, b"y")
    assert decode_all(wire, rsv1=True) == [
        (OP_TEXT, b"z", False, True),
        (OP_CONTINUATION, b"y", True, False),
    ]
    assert decode_all(wire, rsv1=True, reassemble=True) == [(OP_TEXT, b"zy", True, True)]
    assert refused(wire).code == 1002  # not negotiated


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(bytes((0x89 | 0x40, 0)), id="control"),
        pytest.param(bytes((0x01, 1)) + b"a" + bytes((0x80 | 0x40, 1)) + b"b", id="continuation"),
    ],
)
def test_rsv1_is_refused_where_permessage_deflate_forbids_it(wire: bytes) -> None:
    assert refused(wire, rsv1=True).code == 1002


def test_max_size_is_checked_on_the_header() -> None:
    assert decode_all(text_frame(b"x" * 100), max_size=100) == [(OP_TEXT, b"x" * 100, True, False)]
    # Only the header of a frame that would be 1 GiB: refused before any of it is buffered.
    error = refused(bytes((0x82, 127)) + (1 << 30).to_bytes(8), max_size=1 << 20)
    assert error.code == 1009


def test_max_size_bounds_a_reassembled_message_but_not_its_control_frames() -> None:
    fragments = encode_frame(OP_TEXT, b"x" * 60, fin=False) + PING_FRAME
    fragments += encode_frame(OP_PING, b"p" * 50)
    ok = fragments + encode_frame(OP_CONTINUATION, b"y" * 40)
    assert [f[0] for f in decode_all(ok, max_size=100, reassemble=True)] == [
        OP_PING,
        OP_PING,
        OP_TEXT,
    ]
    too_big = fragments + encode_frame(OP_CONTINUATION, b"y" * 41)
    assert refused(too_big, max_size=100, reassemble=True).code == 1009
    # Frame by frame, each fragment is within the limit.
    assert len(decode_all(too_big, max_size=100)) == 4


# Decoding: malformed input ---------------------------------------------------------------------

MALFORMED = [
    pytest.param(bytes((0x81 | 0x20, 0)), {}, id="rsv2"),
    pytest.param(bytes((0x81 | 0x10, 0)), {}, id="rsv3"),
    pytest.param(bytes((0x81 | 0x40, 0)), {}, id="rsv1-not-negotiated"),
    pytest.param(bytes((0x83, 0)), {}, id="reserved-data-opcode"),
    pytest.param(bytes((0x87, 0)), {}, id="reserved-data-opcode-7"),
    pytest.param(bytes((0x8B, 0)), {}, id="reserved-control-opcode"),
    pytest.param(bytes((0x8F, 0)), {}, id="reserved-control-opcode-f"),
    pytest.param(bytes((0x80, 1)) + b"a", {}, id="continuation-without-start"),
    pytest.param(bytes((0x01, 1, 0x61, 0x81, 1, 0x62)), {}, id="new-message-inside-fragmented"),
    pytest.param(bytes((0x09, 0)), {}, id="fragmented-ping"),
    pytest.param(bytes((0x08, 0)), {}, id="fragmented-close"),
    pytest.param(bytes((0x89, 126, 0, 126)) + b"p" * 126, {}, id="ping-over-125"),
    pytest.param(bytes((0x88, 127)) + (65536).to_bytes(8), {}, id="close-64-bit-length"),
    pytest.param(bytes((0x81, 126, 0, 125)) + b"x" * 125, {}, id="16-bit-length-for-125"),
    pytest.param(bytes((0x81, 127)) + (65535).to_bytes(8), {}, id="64-bit-length-for-65535"),
    pytest.param(bytes((0x82, 127)) + (1 << 63).to_bytes(8), {}, id="64-bit-top-bit"),
    pytest.param(encode_frame(OP_TEXT, b"hi", mask=RFC_MASK), {}, id="masked-server-frame"),
    pytest.param(text_frame(b"hi"), {"masked": True}, id="unmasked-client-frame"),
]


@pytest.mark.parametrize(("wire", "options"), MALFORMED)
def test_malformed_input_is_refused_with_1002(wire: bytes, options: dict[str, bool]) -> None:
    error = refused(wire, **options)
    assert isinstance(error, ProtocolError)
    assert error.code == 1002


@pytest.mark.parametrize(("wire", "options"), MALFORMED)
def test_malformed_header_is_refused_even_after_good_frames_and_before_its_payload(
    wire: bytes, options: dict[str, bool]
) -> None:
    masked = options.get("masked", False)
    good = encode_frame(OP_PING, b"ok", mask=RFC_MASK if masked else None)
    decoder = FrameDecoder(**options)
    assert decoder.feed(good) == [(OP_PING, b"ok", True, False)]
    # Up to its extended length (at most 10 bytes) is all it takes to see what is wrong.
    with pytest.raises(WebSocketProtocolError):
        decoder.feed(wire[:10])
