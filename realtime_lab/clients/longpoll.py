"""Long polling: ``GET /longpoll/{channel}?after=CURSOR&timeout=S``, asked again at once.

The server holds each request until an event arrives (or ``longpoll_timeout`` passes, then it
answers with no events); the client sends the answer's ``cursor`` back immediately.
"""

from __future__ import annotations

from realtime_lab.clients.poll import PollClient

#: Extra seconds to wait for a long-poll answer beyond the wait the client asked for.
ANSWER_GRACE_S = 10.0


class LongPollClient(PollClient):
    """A channel over long polling (see the module docstring)."""

    transport = "longpoll"
    path = "longpoll"

    def _extra_params(self) -> dict[str, str | None]:
        return {"timeout": f"{self.longpoll_timeout:g}"}

    def _read_timeout(self) -> float:
        grace = self.idle_timeout if self.idle_timeout is not None else ANSWER_GRACE_S
        return self.longpoll_timeout + grace

    def _pause(self) -> float:
        return 0.0
