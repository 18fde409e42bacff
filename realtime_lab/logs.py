"""Logging for the server: one stderr handler whose output repeated records cannot flood.

:func:`setup_logging` is what ``realtime-lab serve`` calls instead of ``logging.basicConfig``.
Its handler carries a :class:`RateLimitFilter`: of the records that share a logger, a level and a
message *template* (``record.msg`` before ``%`` formatting, so ``"ws %d: binary message refused"``
from ten thousand connections is one kind), the first ``burst`` in each ``interval`` seconds are
written and the rest are counted; when the interval is over one summary line says how many were
suppressed. A client sending 10,000 junk WebSocket messages thus costs a few log lines, not
10,000, while every distinct kind of message is still seen.

Hand-written on purpose (about 100 lines): the PyPI filters for this (``log-rate-limit``,
``ratelimitingfilter``) key records by source line rather than by logger, level and template,
write their summary by appending a second line to the *next* record's ``msg`` (which every other
handler then sees too, and which never comes if the flood stops), and keep one entry per key
forever.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TextIO

FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_BURST: Final = 10  # records of one kind written per interval
DEFAULT_INTERVAL: Final = 10.0  # seconds
MAX_KINDS: Final = 1024  # kinds tracked at once; the oldest window is closed first

_SUMMARY_ATTR: Final = "rate_limit_summary"  # set on the summary records this filter makes

Key = tuple[str, int, str]  # logger name, level number, message template


@dataclass(slots=True)
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0
    last: logging.LogRecord | None = None  # the last suppressed record, quoted in the summary


class RateLimitFilter(logging.Filter):
    """Let the first ``burst`` records of each kind through per ``interval``; count the rest.

    A kind is ``(record.name, record.levelno, str(record.msg))``. The summary of a window in
    which records were suppressed is a record of the same logger and level, written through
    ``emit`` (give the ``handle`` method of the handler this filter is on, so that the summary
    goes where the records would have gone). It is written when a record passes through the
    filter after the window is over, or when :meth:`flush` is called: call ``flush`` before the
    process exits (:func:`setup_logging` registers it with :mod:`atexit`).

    ``emit=None`` writes summaries through ``logging.getLogger(name).handle``: right for a filter
    added to a logger (``logger.addFilter``), which sees only records made on that logger.
    """

    def __init__(
        self,
        burst: int = DEFAULT_BURST,
        interval: float = DEFAULT_INTERVAL,
        *,
        emit: Callable[[logging.LogRecord], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = MAX_KINDS,
    ) -> None:
        if burst < 1 or interval <= 0 or max_kinds < 1:
            raise ValueError("burst and max_kinds must be >= 1 and interval > 0")
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._emit = emit
        self._clock = clock
        self._max_kinds = max_kinds
        # Kinds seen once in their window, and kinds seen again. Most records are of a kind seen
        # once (every access log line is its own kind): they churn through ``_once`` alone, and
        # cannot push a flooding kind out of ``_again`` (which would restart its window).
        # Both are oldest window first, so the windows that are over are at the front.
        self._once: OrderedDict[Key, _Window] = OrderedDict()
        self._again: OrderedDict[Key, _Window] = OrderedDict()
        # Records come from the event loop and from executor threads alike.
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is written; writes the summaries of windows that are over first."""
        if getattr(record, _SUMMARY_ATTR, False):
            return True
        key: Key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        ended: list[tuple[Key, _Window]] = []
        with self._lock:
            self._close_windows(now, ended)
            window = self._again.get(key)
            if window is not None and now - window.start >= self.interval:
                ended.append((key, self._again.pop(key)))  # over, but not yet at the front
                window = None
            if window is None:
                window = self._once.pop(key, None)
                if window is not None and now - window.start >= self.interval:
                    window = None  # its window is over: this record opens a new one
                if window is None:
                    window = _Window(now)
                    self._add(self._once, key, window, ended)
                else:
                    self._add(self._again, key, window, ended)
            if window.passed < self.burst:
                window.passed += 1
                allowed = True
            else:
                window.suppressed += 1
                window.last = record
                allowed = False
        self._write(ended, now)
        return allowed

    def flush(self) -> None:
        """Write the summary of every window with suppressed records now, and forget them all."""
        now = self._clock()
        with self._lock:
            ended = list(self._again.items())
            self._again.clear()
            self._once.clear()
        self._write(ended, now)

    def _add(
        self,
        table: OrderedDict[Key, _Window],
        key: Key,
        window: _Window,
        ended: list[tuple[Key, _Window]],
    ) -> None:
        if len(table) >= self._max_kinds:
            ended.append(table.popitem(last=False))
        table[key] = window

    def _close_windows(self, now: float, ended: list[tuple[Key, _Window]]) -> None:
        # A kind moves to ``_again`` when seen a second time, so that table is only roughly in
        # window order: a summary may come up to one interval late, never early.
        while self._again:
            key, window = next(iter(self._again.items()))
            if now - window.start < self.interval:
                break
            del self._again[key]
            ended.append((key, window))

    def _write(self, ended: list[tuple[Key, _Window]], now: float) -> None:
        # Outside the lock: emitting runs handlers, which run this filter again.
        for (name, level, _), window in ended:
            if window.suppressed:
                summary = self._summary(name, level, window, now)
                emit = self._emit or logging.getLogger(name).handle
                emit(summary)

    def _summary(self, name: str, level: int, window: _Window, now: float) -> logging.LogRecord:
        last = window.last
        assert last is not None  # set with every suppressed record
        try:
            text = last.getMessage()
        except Exception:  # a bad format string is the logging call's bug, not a reason to crash
            text = str(last.msg)
        record = logging.LogRecord(
            name,
            level,
            last.pathname,
            last.lineno,
            "suppressed %d similar messages in %.1fs; the last: %s",
            (window.suppressed, now - window.start, text),
            None,
            last.funcName,
        )
        setattr(record, _SUMMARY_ATTR, True)
        return record


def setup_logging(
    level: str | int = "INFO",
    *,
    stream: TextIO | None = None,
    burst: int = DEFAULT_BURST,
    interval: float = DEFAULT_INTERVAL,
) -> logging.Handler:
    """Log ``level`` and above to ``stream`` (stderr) through a :class:`RateLimitFilter`.

    The handler goes on the root logger, so the filter covers every logger of the server
    (``realtime_lab.*``, ``aiohttp.*``, ``asyncio``). Calling it again replaces the handler an
    earlier call installed (and writes that one's pending summaries); handlers installed by
    anyone else are left alone. Returns the handler: remove it from the root logger to undo.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _SUMMARY_ATTR, False):
            root.removeHandler(old)
            _retire(old)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter(FORMAT))

    def emit(record: logging.LogRecord) -> None:
        # At exit the stream may be gone already (a test runner's capture): nothing to tell.
        if not getattr(handler.stream, "closed", False):
            handler.handle(record)

    limiter = RateLimitFilter(burst, interval, emit=emit)
    handler.addFilter(limiter)
    setattr(handler, _SUMMARY_ATTR, True)  # marks the handlers this function installed
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    atexit.register(limiter.flush)
    return handler


def _retire(handler: logging.Handler) -> None:
    for f in handler.filters:
        if isinstance(f, RateLimitFilter):
            atexit.unregister(f.flush)
            f.flush()
