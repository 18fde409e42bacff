"""One timer for many paced generations: the simulated chats' clock.

A chat of the simulated model emits a token every ``token_ms``. As one task per chat sleeping
between tokens, a thousand chats at 50 tokens/s cost 50,000 timer handles, task steps and
coroutine resumptions a second, more than the tokens themselves. A :class:`Pacer` keeps every
paced job in one heap ordered by due time and one loop timer armed ``slack`` seconds after the
earliest: each wake runs every job due by then, so a wake is shared by all the chats whose tokens
fall in the same few milliseconds, a job is never run before its due time (a chat's first token
never comes before its ``ttft``), and a job is a plain call, not a task.

Jobs keep their own pace: the next due time is the previous one plus the delay the job asks for
(no drift from the time the call itself took). A loop that fell more than ``max_lag`` behind
re-bases the job on now instead of emitting the backlog at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

#: A wake comes this many seconds after the earliest due job and runs every job due by then
#: (shares wakes between chats). A token is then up to 5 ms late, inside the simulated model's
#: own spacing (1/rate +-33%: +-6.7 ms at 50 tokens/s), and a wake serves five times the chats
#: it did at 1 ms: at 100 chatting users (measured with ``bench --workload chats --chats 100``,
#: A-B-A-B, when the window ran jobs up to 5 ms early instead: the same wakes) 7-16% less server
#: CPU per token on every transport, each loop wake being a sleep and a context switch; 10 ms
#: bought little more (4%) for twice the jitter.
DEFAULT_SLACK_S: Final = 0.005
#: A job this far behind its due time is re-based on now (its pace resumes from there): a busy
#: loop delays tokens a little, it does not release a burst of them afterwards (about one token
#: of a 50 tokens/s chat; a reader must never find several tokens at once where it expects one).
DEFAULT_MAX_LAG_S: Final = 0.025

#: What a job's step returns: the seconds until its next step, or ``None`` when it is over.
Step = Callable[[], "float | None"]


class PacedJob:
    """A handle on one job of a :class:`Pacer`; :meth:`cancel` stops it before its next step."""

    __slots__ = ("cancelled", "due", "step")

    def __init__(self, due: float, step: Step) -> None:
        self.due = due
        self.step = step
        self.cancelled = False

    def cancel(self) -> None:
        """The job's step is not called again (a step running now finishes)."""
        self.cancelled = True


class Pacer:
    """Runs paced jobs on one loop timer (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        slack: float = DEFAULT_SLACK_S,
        max_lag: float = DEFAULT_MAX_LAG_S,
    ) -> None:
        self._loop = loop
        self._slack = slack
        self._max_lag = max_lag
        self._heap: list[tuple[float, int, PacedJob]] = []
        self._order = itertools.count()  # ties keep insertion order; jobs are never compared
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._closed = False

    def __len__(self) -> int:
        """Jobs scheduled (cancelled ones included until their due time passes)."""
        return len(self._heap)

    def add(self, delay: float, step: Step) -> PacedJob:
        """Call ``step()`` in ``delay`` seconds, then again after each delay it returns.

        ``step`` must not block or await; an exception from it ends that job (and is logged).
        Cancel the returned job to stop it.
        """
        job = PacedJob(self._loop.time() + max(delay, 0.0), step)
        if not self._closed:
            self._push(job)
        return job

    def close(self) -> None:
        """Stop the timer and drop every job (their steps are not called again)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, job in self._heap:
            job.cancelled = True
        self._heap.clear()

    def _push(self, job: PacedJob) -> None:
        heapq.heappush(self._heap, (job.due, next(self._order), job))
        if self._timer is None or job.due < self._timer_due:
            self._arm(job.due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_at(due + self._slack, self._wake)

    def _wake(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time()
        pop, push, order = heapq.heappop, heapq.heappush, self._order
        while heap and heap[0][0] <= now:
            job = pop(heap)[2]
            if job.cancelled:
                continue
            try:
                delay = job.step()
            except Exception:
                log.exception("paced job %r failed; it is stopped", job.step)
                continue
            if delay is None or job.cancelled or self._closed:
                continue
            due = job.due + delay
            if due < now - self._max_lag:
                due = now + delay
            job.due = due
            push(heap, (due, next(order), job))
        if heap and not self._closed:
            self._arm(heap[0][0])
