"""The one JSON envelope every transport carries.

``{"channel": "ticker", "id": "k3x9-42", "type": "token", "data": {...}, "ts": 1732170000123.4}``

An :class:`Event` is created once by the bus and shared by every subscriber; its encodings (JSON
here, SSE and WebSocket frames in their transports) are computed once and cached on it, so fan-out
writes the same bytes to every subscriber without re-encoding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Final

from realtime_lab.errors import InvalidCursor, InvalidEnvelope
from realtime_lab.protocol.cursor import parse_id

#: Event types with a meaning for every transport; anything else is an application type.
TOKEN: Final = "token"
END: Final = "end"
ERROR: Final = "error"
RESET: Final = "reset"
CONTROL_TYPES: Final = frozenset({END, ERROR, RESET})

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _refuse(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.JSONEncoder.encode builds a new C encoder on every call; this one is built once (same
# output: compact separators, no ASCII escaping, NaN refused). No circular-reference markers:
# what is encoded here is decoded JSON or the server's own dicts, never cyclic, and a cycle
# would still stop with RecursionError.
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encoder = (
    None
    if _make_encoder is None
    else _make_encoder(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
)


def _dumps(value: Any) -> str:
    if _c_encoder is None or isinstance(value, str):
        return _encoder.encode(value)
    return "".join(_c_encoder(value, 0))


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding used on every wire."""
    return _dumps(value).encode()


# Every event is encoded once, but every event is encoded: the envelope's fixed keys are written
# from a template and only ``data`` goes through the encoder (the same bytes as dumps(to_dict())).
_TEMPLATE: Final = '{"channel":%s,"id":%s,"type":%s,"data":%s,"ts":%s}'
_QUOTED_TYPES: Final = {kind: _dumps(kind) for kind in (TOKEN, END, ERROR, RESET)}
_quoted_channels: dict[str, str] = {}
_MAX_QUOTED_CHANNELS: Final = 10_000


def _quoted_id(event_id: str) -> str:
    # Ids the bus makes are <epoch>-<seq> in [0-9a-z-]: nothing to escape. (Printable, no quote
    # or backslash: json.dumps with ensure_ascii=False writes such a string as it is.)
    if event_id.isprintable() and '"' not in event_id and "\\" not in event_id:
        return f'"{event_id}"'
    return _dumps(event_id)


def _quoted_channel(channel: str) -> str:
    quoted = _quoted_channels.get(channel)
    if quoted is None:
        if len(_quoted_channels) >= _MAX_QUOTED_CHANNELS:
            _quoted_channels.clear()  # chats come and go: a bounded cache, not a registry
        quoted = _quoted_channels[channel] = _dumps(channel)
    return quoted


@dataclass(slots=True, eq=False)
class Event:
    """One event on one channel.

    Attributes:
        channel: the channel name.
        id: ``<epoch>-<seq>``; strictly increasing per channel life.
        type: ``token``, ``end``, ``error``, ``reset`` or an application type.
        data: a JSON object.
        ts: server time in milliseconds when the event was published.
        seq: the sequence number inside ``id`` (kept parsed for O(1) comparisons).
        cache: per-encoding byte strings, filled lazily by the transports.
    """

    channel: str
    id: str
    type: str
    data: dict[str, Any]
    ts: float
    seq: int
    cache: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def json(self) -> bytes:
        """The envelope as compact UTF-8 JSON, encoded on first use and then reused."""
        encoded = self.cache.get("json")
        if encoded is None:
            ts = self.ts
            text = _TEMPLATE % (
                _quoted_channel(self.channel),
                _quoted_id(self.id),
                _QUOTED_TYPES.get(self.type) or _dumps(self.type),
                _dumps(self.data),
                repr(ts) if type(ts) is float and math.isfinite(ts) else _dumps(ts),
            )
            encoded = self.cache["json"] = text.encode()
        return encoded

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a plain dict (``seq`` and the cache are not part of it)."""
        return {
            "channel": self.channel,
            "id": self.id,
            "type": self.type,
            "data": self.data,
            "ts": self.ts,
        }

    @classmethod
    def from_dict(cls, value: Any) -> Event:
        """Build an event from a decoded envelope.

        Raises:
            InvalidEnvelope: a field is missing or of the wrong type.
        """
        if not isinstance(value, dict):
            raise InvalidEnvelope("an envelope is a JSON object")
        try:
            channel, event_id, kind = value["channel"], value["id"], value["type"]
            data, ts = value.get("data", {}), value["ts"]
        except KeyError as exc:
            raise InvalidEnvelope(f"envelope lacks field {exc.args[0]!r}") from exc
        if not (isinstance(channel, str) and isinstance(event_id, str) and isinstance(kind, str)):
            raise InvalidEnvelope("channel, id and type are strings")
        if not isinstance(data, dict):
            raise InvalidEnvelope("data is a JSON object")
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            raise InvalidEnvelope("ts is a number")
        try:
            ts = float(ts)
        except OverflowError as exc:
            raise InvalidEnvelope("ts is out of range") from exc
        if not math.isfinite(ts):
            raise InvalidEnvelope("ts is a finite number")
        try:
            seq = parse_id(event_id).seq
        except InvalidCursor as exc:
            raise InvalidEnvelope(str(exc)) from exc
        return cls(channel, event_id, kind, data, ts, seq)

    @classmethod
    def restore(cls, encoded: bytes, seq: int) -> Event:
        """The event whose envelope this server encoded as ``encoded`` (its :attr:`json`).

        For history kept as JSON: decoded without :meth:`from_json`'s checks, which the bytes
        passed when they were made, and ``encoded`` is reused as the JSON, not encoded again.
        """
        value = json.loads(encoded)
        return cls(
            value["channel"],
            value["id"],
            value["type"],
            value["data"],
            value["ts"],
            seq,
            {"json": encoded},
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        """Decode one JSON envelope.

        Raises:
            InvalidEnvelope: not JSON, or not an envelope.
        """
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise InvalidEnvelope(f"not JSON: {exc}") from exc
        event = cls.from_dict(value)
        try:
            event.json  # noqa: B018 - refuse what could not be sent on again (NaN, lone surrogates)
        except (ValueError, UnicodeEncodeError) as exc:
            raise InvalidEnvelope(f"not representable as JSON: {exc}") from exc
        return event
