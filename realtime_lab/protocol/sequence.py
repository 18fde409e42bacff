"""The one rule for sequence continuity: what is a new event, a gap, a duplicate, a late arrival.

Event ids are ``<epoch>-<seq>`` (:mod:`realtime_lab.protocol.cursor`): within one epoch (one life
of a channel) ``seq`` goes up by one per event. A :class:`Sequence` follows one stream of ids and
says what each one is:

- an id that is not ``<epoch>-<seq>``: ``foreign``, counted nowhere; the caller decides;
- a ``reset`` event: ``resets += 1``, a new run starts at the reset's own id, ``reset``;
- no run yet: the event opens the run, ``new``;
- another epoch than the run's, without a reset: ``gaps += 1`` (a channel life ended unsaid, so
  a loss of unknown size), a new run starts at this event, ``new``;
- ``seq == last + 1``: ``new``; ``seq > last + 1``: ``gaps += seq - last - 1`` (one per id
  skipped), the skipped range is recorded, ``new``;
- ``seq <= last``: a seq in the skipped record is ``reordered`` (``reordered += 1``; it leaves
  the record; ``gaps`` stays: both facts are counted); anything else is a ``duplicate``.

The skipped record holds at most :data:`MAX_SKIPPED_RANGES` ranges, in seq order (which within a
run is their age): a late arrival inside a range splits it in place, and beyond the bound the
lowest (oldest) range is dropped, so a very late arrival from it becomes a duplicate. A reset, a
new run and :meth:`Sequence.forget` clear the record.

Callers deliver ``new`` and ``reset`` events and drop ``duplicate`` and ``reordered`` ones (their
place in the stream has passed). The same rule is written in ``static/sequence.js`` (dashboard)
and ``bench/loadclient.c`` (native load client); ``tests/protocol/sequence_cases.json`` is the
table all of them are tested against, so change the three together.

Why no library: nothing on PyPI tracks this id format; the rule is a dozen lines that must match
a JavaScript and a C copy clause for clause, which a dependency would only hide.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from realtime_lab.errors import InvalidCursor
from realtime_lab.protocol.cursor import LIVE, parse_id

#: The most skipped ranges a :class:`Sequence` remembers (the oldest go first).
MAX_SKIPPED_RANGES: Final = 64


class Verdict(StrEnum):
    """What one observed id is. Deliver ``NEW`` and ``RESET``; drop ``DUPLICATE`` and
    ``REORDERED``; ``FOREIGN`` (not an event id) is the caller's call."""

    NEW = "new"
    RESET = "reset"
    DUPLICATE = "duplicate"
    REORDERED = "reordered"
    FOREIGN = "foreign"


NEW: Final = Verdict.NEW
RESET: Final = Verdict.RESET
DUPLICATE: Final = Verdict.DUPLICATE
REORDERED: Final = Verdict.REORDERED
FOREIGN: Final = Verdict.FOREIGN


class Sequence:
    """Continuity of one stream of event ids, and its counters.

    Create one per stream, with the position the stream resumes after (``after``: an event id)
    or without one (``None``, ``""``, ``"now"``, or anything that is not an event id: the first
    event then opens the run). Call :meth:`observe` for each event as it arrives, deliver it
    unless the verdict is ``duplicate`` or ``reordered``, and read the counters at any time.

    Attributes:
        gaps: ids skipped inside a run (one per id), plus one per epoch change no reset announced.
        duplicates: ids at or below the last one that no gap was waiting for.
        reordered: ids that arrived after a later one and filled a recorded gap.
        resets: reset events observed.
        epoch: the current run's epoch (``None`` without a run, or when opened by
            :meth:`observe_seq` or :meth:`start_at` without one).
        last: the current run's last seq, ``None`` without a run.
    """

    __slots__ = ("_skipped", "duplicates", "epoch", "gaps", "last", "reordered", "resets")

    def __init__(self, after: str | None = None) -> None:
        self.gaps = 0
        self.duplicates = 0
        self.reordered = 0
        self.resets = 0
        self.epoch: str | None = None
        self.last: int | None = None
        # Seq ranges (low, high) skipped in the current run, ascending, for late arrivals.
        self._skipped: list[tuple[int, int]] = []
        if after is not None and after not in ("", LIVE):
            try:
                cursor = parse_id(after)
            except InvalidCursor:
                return  # not a position: the server would refuse it; start without a run
            self.epoch, self.last = cursor.epoch, cursor.seq

    @property
    def skipped(self) -> tuple[tuple[int, int], ...]:
        """The recorded skipped ranges ``(low, high)`` of the current run, oldest first."""
        return tuple(self._skipped)

    def observe(self, event_id: str, *, reset: bool = False) -> Verdict:
        """Account for the event ``event_id`` (a ``reset`` event when ``reset``).

        Returns:
            The verdict: deliver ``new`` and ``reset`` events, drop ``duplicate`` and
            ``reordered`` ones; a ``foreign`` id changed nothing, so decide for yourself.
        """
        try:
            cursor = parse_id(event_id)
        except InvalidCursor:
            return FOREIGN
        epoch, seq = cursor.epoch, cursor.seq
        if reset:
            self.resets += 1
            self._open(epoch, seq)
            return RESET
        if self.last is None:
            self._open(epoch, seq)
            return NEW
        if epoch != self.epoch:
            self.gaps += 1
            self._open(epoch, seq)
            return NEW
        return self._step(seq)

    def observe_seq(self, seq: int, *, reset: bool = False) -> Verdict:
        """:meth:`observe` for a caller that has only the ``seq``, all in one epoch.

        The same rule without the epoch clauses: use it when every event comes from one channel
        life (or a reset announces the change), as for the load generator's parsed items. A
        negative ``seq`` means "no id" and is ``foreign``. Do not mix with :meth:`observe` on one
        instance: a run opened here has no epoch, so the next :meth:`observe` sees a new one.
        """
        if seq < 0:
            return FOREIGN
        if reset:
            self.resets += 1
            self._open(None, seq)
            return RESET
        last = self.last
        if last is None:
            self._open(None, seq)
            return NEW
        if seq == last + 1:  # the common case, kept first and short: this runs per event
            self.last = seq
            return NEW
        return self._step(seq)

    def start_at(self, seq: int, epoch: str | None = None) -> None:
        """Open the run at a position the caller knows (what a cursor ``after`` does).

        With ``epoch=None`` it suits :meth:`observe_seq`: a chat read from its start is
        ``start_at(0)``, so events missing before its first one count as gaps.
        """
        self._open(epoch, seq)

    def forget(self) -> None:
        """Drop the current run: the next event opens a new one, with no gap counted."""
        self.epoch = self.last = None
        self._skipped.clear()

    def _open(self, epoch: str | None, seq: int) -> None:
        self.epoch, self.last = epoch, seq
        self._skipped.clear()

    def _step(self, seq: int) -> Verdict:
        """A seq of the current run's epoch; ``self.last`` is set."""
        last = self.last
        assert last is not None
        if seq == last + 1:
            self.last = seq
            return NEW
        if seq > last:
            self.gaps += seq - last - 1
            skipped = self._skipped
            skipped.append((last + 1, seq - 1))
            if len(skipped) > MAX_SKIPPED_RANGES:
                del skipped[0]
            self.last = seq
            return NEW
        if self._take(seq):
            self.reordered += 1
            return REORDERED
        self.duplicates += 1
        return DUPLICATE

    def _take(self, seq: int) -> bool:
        """Remove ``seq`` from the skipped record; ``False`` when it was not there."""
        skipped = self._skipped
        # Newest first: a late arrival is most often from the latest gap.
        for index in range(len(skipped) - 1, -1, -1):
            low, high = skipped[index]
            if seq > high:
                return False  # ranges ascend: no older one holds it either
            if seq >= low:
                pieces = []
                if low < seq:
                    pieces.append((low, seq - 1))
                if seq < high:
                    pieces.append((seq + 1, high))
                skipped[index : index + 1] = pieces
                if len(skipped) > MAX_SKIPPED_RANGES:
                    del skipped[0]
                return True
        return False


__all__ = [
    "DUPLICATE",
    "FOREIGN",
    "MAX_SKIPPED_RANGES",
    "NEW",
    "REORDERED",
    "RESET",
    "Sequence",
    "Verdict",
]
