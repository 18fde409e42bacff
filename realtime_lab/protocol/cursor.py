"""Event ids and resume cursors.

An event id is ``<epoch>-<seq>``: ``epoch`` names one life of one channel on one bus (it changes
when history is lost: a restart of the memory bus, a channel that expired and came back) and
``seq`` counts the channel's events from 1, with no holes. Clients treat ids as opaque strings to
send back; the server (and the diagnostic counters of our clients) read them to tell "I missed
nothing" from "I may have missed something":

- same epoch, ``seq`` inside retained history  -> resume exactly after it;
- same epoch, ``seq`` older than history        -> ``reset`` (history trimmed);
- same epoch, ``seq`` beyond the newest event   -> ``reset`` (never issued);
- another epoch                                 -> ``reset`` (from another life of the channel).

``<epoch>-0`` is the position before the first event of that epoch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from realtime_lab.errors import InvalidCursor

#: The ``after`` value that means "only events published from now on".
LIVE: Final = "now"

_ID_RE: Final = re.compile(r"([0-9a-z]{1,16})-(0|[1-9][0-9]{0,17})")
MAX_CURSOR_LENGTH: Final = 40


@dataclass(frozen=True, slots=True)
class Cursor:
    """A parsed event id: resume after event number ``seq`` of channel life ``epoch``."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return format_id(self.epoch, self.seq)


def format_id(epoch: str, seq: int) -> str:
    """Build the wire form of an event id."""
    return f"{epoch}-{seq}"


def parse_id(text: str) -> Cursor:
    """Parse an event id.

    Raises:
        InvalidCursor: ``text`` is not ``<epoch>-<seq>``; answer the caller with a 400.
    """
    if len(text) > MAX_CURSOR_LENGTH:
        raise InvalidCursor(f"event id longer than {MAX_CURSOR_LENGTH} characters")
    match = _ID_RE.fullmatch(text)
    if match is None:
        raise InvalidCursor(f"malformed event id {text!r}: expected '<epoch>-<seq>'")
    return Cursor(match.group(1), int(match.group(2)))


def parse_after(text: str | None) -> Cursor | str | None:
    """Parse a resume position from a query string or a ``Last-Event-ID`` header.

    Returns:
        ``None`` for "everything still in history" (no value, or an empty one), the string
        :data:`LIVE` for "only new events", or a :class:`Cursor`.

    Raises:
        InvalidCursor: the value is neither empty, ``now`` nor an event id.
    """
    if text is None:
        return None
    text = text.strip(" \t")  # HTTP optional whitespace only
    if not text:
        return None
    if text == LIVE:
        return LIVE
    return parse_id(text)
