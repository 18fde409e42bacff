"""The envelope's JSON: written from a template, byte for byte what json.dumps writes."""

from __future__ import annotations

import pytest

from realtime_lab.protocol.envelope import Event, dumps


@pytest.mark.parametrize(
    ("channel", "event_id", "kind", "data", "ts"),
    [
        ("chat.abc", "abc-1", "token", {"text": " hi", "index": 0}, 1764623000123.4),
        ('we"ird', "zz-9", 'odd"type', {"t": "\u2028\n\x00é"}, 5),
        ("c", "a-1", "end", {"reason": "done", "tokens": 3}, 1e20),
        ("c", "a-1", "reset", {}, -0.0),
    ],
)
def test_json_is_what_json_dumps_writes(
    channel: str, event_id: str, kind: str, data: dict[str, object], ts: float
) -> None:
    # The envelope is written from a template (only data goes through the encoder): the bytes
    # must be exactly the compact encoding of to_dict().
    event = Event(channel, event_id, kind, data, ts, 1)
    assert event.json == dumps(event.to_dict())
    assert Event.from_json(event.json).to_dict() == {**event.to_dict(), "ts": float(ts)}


def test_json_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        Event("c", "a-1", "token", {"x": float("nan")}, 1.0, 1).json  # noqa: B018
    with pytest.raises(ValueError, match="not JSON compliant"):
        Event("c", "a-1", "token", {}, float("inf"), 1).json  # noqa: B018
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})


@pytest.mark.parametrize("event_id", ['q"uote-1', "back\\slash-1", "line\u2028sep-1", "del\x7f-1"])
def test_an_id_the_bus_did_not_make_is_escaped_as_json_escapes_it(event_id: str) -> None:
    event = Event("c", event_id, "token", {}, 1.5, 1)
    assert event.json == dumps(event.to_dict())


def test_restore_gives_back_the_event_and_reuses_its_json() -> None:
    event = Event("chat-1", "a1b2c3d4-7", "token", {"text": "é\u2028", "index": 6}, 1.5e12 + 0.1, 7)
    encoded = event.json
    again = Event.restore(encoded, 7)
    assert again.to_dict() == event.to_dict()
    assert (again.seq, again.ts) == (7, event.ts)
    assert again.json is encoded  # not encoded a second time
