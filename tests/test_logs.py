"""The rate-limiting log filter and ``setup_logging`` (``realtime_lab.logs``).

The filter is driven by a fake clock: no test waits for an interval to pass.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from realtime_lab.logs import RateLimitFilter, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Capture(logging.Handler):
    """A handler that keeps what passed its filters, with the filter under test on it."""

    def __init__(self, burst: int = 3, interval: float = 10.0, **kwargs: object) -> None:
        super().__init__()
        self.clock = Clock()
        self.limiter = RateLimitFilter(
            burst,
            interval,
            emit=self.handle,
            clock=self.clock,
            **kwargs,  # type: ignore[arg-type]
        )
        self.addFilter(self.limiter)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def capture() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


log = logging.getLogger("test.logs")


def test_the_first_burst_passes_and_the_rest_are_counted(capture: Capture) -> None:
    for i in range(10_000):
        log.warning("ws %d: junk message refused", i)
    assert capture.lines == [f"ws {i}: junk message refused" for i in range(3)]


def test_one_summary_line_when_the_interval_is_over(capture: Capture) -> None:
    for i in range(10_000):
        log.warning("ws %d: junk message refused", i)
    capture.clock.now += 10.0
    log.info("something else")
    summary = capture.records[3]
    assert summary.levelno == logging.WARNING
    assert summary.name == "test.logs"
    assert summary.getMessage() == (
        "suppressed 9997 similar messages in 10.0s; the last: ws 9999: junk message refused"
    )
    assert capture.lines[4:] == ["something else"]


def test_the_next_interval_lets_a_burst_through_again(capture: Capture) -> None:
    for i in range(5):
        log.warning("tick %d", i)
    capture.clock.now += 10.0
    for i in range(5, 10):
        log.warning("tick %d", i)
    assert capture.lines == [
        "tick 0",
        "tick 1",
        "tick 2",
        "suppressed 2 similar messages in 10.0s; the last: tick 4",
        "tick 5",
        "tick 6",
        "tick 7",
    ]


def test_no_summary_when_nothing_was_suppressed(capture: Capture) -> None:
    log.warning("once")
    log.warning("twice")
    capture.clock.now += 60.0
    log.warning("later")
    capture.limiter.flush()
    assert capture.lines == ["once", "twice", "later"]


def test_kinds_are_logger_level_and_template(capture: Capture) -> None:
    other = logging.getLogger("test.logs.other")
    for _ in range(5):
        log.warning("same %s", "text")
        log.error("same %s", "text")
        log.warning("other %s", "template")
        other.warning("same %s", "text")
    assert len(capture.records) == 4 * 3


def test_arguments_do_not_make_a_new_kind_but_preformatted_text_does(capture: Capture) -> None:
    for i in range(5):
        log.warning("client %s sent junk", f"c{i}")
    for i in range(5):
        log.warning(f"client c{i} sent junk")
    assert len(capture.records) == 3 + 5


def test_a_window_that_is_over_is_closed_even_when_not_first_in_line(capture: Capture) -> None:
    # "a" opens its window first but is seen again after "b": it sits behind "b" in the table.
    log.warning("a")
    capture.clock.now += 1
    log.warning("b")
    log.warning("b")
    capture.clock.now += 1
    log.warning("a")
    log.warning("a")
    log.warning("a")  # the fourth: suppressed
    capture.clock.now += 8.5  # a's window is over, b's is not
    log.warning("a")
    assert capture.lines[-2:] == ["suppressed 1 similar messages in 10.5s; the last: a", "a"]


def test_summaries_are_never_limited_themselves() -> None:
    capture = Capture(burst=1)
    logger = logging.getLogger("test.logs.summaries")
    logger.addHandler(capture)
    logger.propagate = False
    try:
        for kind in ("a", "b", "c", "d"):
            for _ in range(3):
                logger.warning(kind)
        capture.limiter.flush()
        assert sum(line.startswith("suppressed 2 similar") for line in capture.lines) == 4
    finally:
        logger.removeHandler(capture)
        logger.propagate = True


def test_flush_writes_the_pending_summaries(capture: Capture) -> None:
    for _ in range(7):
        log.error("boom")
    capture.limiter.flush()
    assert capture.lines[-1] == "suppressed 4 similar messages in 0.0s; the last: boom"
    capture.limiter.flush()
    assert len(capture.records) == 4  # flushed once


def test_a_flood_of_one_off_records_does_not_reopen_a_flooding_kind() -> None:
    # Access log lines are all different: they must not push the flooding kind out of the
    # table, which would let another burst of it through.
    capture = Capture(burst=2, max_kinds=32)
    logger = logging.getLogger("test.logs.churn")
    logger.addHandler(capture)
    logger.propagate = False
    try:
        for i in range(100):
            logger.warning("junk")
            for j in range(20):
                logger.warning(f"access line {i}.{j}")
        junk = [r for r in capture.records if r.getMessage() == "junk"]
        assert len(junk) == 2
    finally:
        logger.removeHandler(capture)
        logger.propagate = True


def test_a_summary_is_written_even_when_the_table_is_full() -> None:
    capture = Capture(burst=1, max_kinds=2)
    logger = logging.getLogger("test.logs.full")
    logger.addHandler(capture)
    logger.propagate = False
    try:
        for kind in ("a", "b", "c"):
            for _ in range(3):
                logger.warning(kind)
        assert "suppressed 2 similar messages in 0.0s; the last: a" in capture.lines
    finally:
        logger.removeHandler(capture)
        logger.propagate = True


def test_a_bad_format_string_does_not_break_the_summary() -> None:
    # Straight to the filter: a handler that formats the record would fail on it first.
    summaries: list[logging.LogRecord] = []
    limiter = RateLimitFilter(1, 10.0, emit=summaries.append, clock=Clock())
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%d broken", ("nan",), None)
    assert limiter.filter(record)
    assert not limiter.filter(record)
    limiter.flush()
    [summary] = summaries
    assert summary.getMessage().endswith("the last: %d broken")
    assert limiter.filter(summary)  # a summary is never limited itself


def test_threads_logging_at_once_lose_no_count(capture: Capture) -> None:
    def flood() -> None:
        for _ in range(1000):
            log.warning("from a thread")

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    capture.limiter.flush()
    assert capture.lines[-1].startswith("suppressed 3997 similar messages")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimitFilter(burst=0)
    with pytest.raises(ValueError, match="interval"):
        RateLimitFilter(interval=0)


# setup_logging ---------------------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored afterwards (setup_logging changes it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_setup_logging_rate_limits_every_logger_of_the_server(
    root_logger: logging.Logger,
) -> None:
    out = io.StringIO()
    handler = setup_logging("INFO", stream=out, burst=2)
    assert handler in root_logger.handlers
    assert root_logger.level == logging.INFO
    for name in ("realtime_lab.server", "aiohttp.server", "aiohttp.websocket"):
        for i in range(50):
            logging.getLogger(name).warning("junk %d", i)
    logging.getLogger("realtime_lab.server").debug("not at INFO")
    for f in handler.filters:
        assert isinstance(f, RateLimitFilter)
        f.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 * (2 + 1)
    assert sum("suppressed 48 similar messages" in line for line in lines) == 3
    assert " WARNING aiohttp.server: junk 0" in lines[2]


def test_setup_logging_twice_replaces_its_own_handler_only(root_logger: logging.Logger) -> None:
    other = logging.NullHandler()
    root_logger.addHandler(other)
    first_out, second_out = io.StringIO(), io.StringIO()
    first = setup_logging("WARNING", stream=first_out, burst=1)
    logging.getLogger("realtime_lab.server").warning("pending")
    logging.getLogger("realtime_lab.server").warning("pending")
    second = setup_logging("DEBUG", stream=second_out)
    assert first not in root_logger.handlers
    assert second in root_logger.handlers
    assert other in root_logger.handlers
    assert "suppressed 1 similar messages" in first_out.getvalue()  # written when replaced
    logging.getLogger("realtime_lab.server").debug("now at DEBUG")
    assert "now at DEBUG" in second_out.getvalue()
    root_logger.removeHandler(other)
