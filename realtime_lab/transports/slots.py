"""The open-stream bound: how many streams one client, and everyone, may hold at once.

A stream (SSE, WebSocket, fetch stream, a waiting long poll) holds a socket, buffers and a place
in every fan-out for as long as it lasts, so it is claimed before anything is sent and released
when its handler ends. Over the bound the request is refused with 429 and ``Retry-After``
(a WebSocket: close 1013 with the reason), and the refusal is counted for ``/metrics``.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from realtime_lab.transports.problems import HTTPProblem

RETRY_AFTER_S: Final = 5


class Slot:
    """One claimed stream; :meth:`release` it when the stream ends (idempotent)."""

    __slots__ = ("_key", "_slots")

    def __init__(self, slots: StreamSlots, key: str) -> None:
        self._slots: StreamSlots | None = slots
        self._key = key

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._free(self._key)


class StreamSlots:
    """Counts open streams per client key (a user, or an address) and in total."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self._by_client: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # why: "per-client" or "total"

    def claim(self, key: str) -> Slot:
        """A slot for one more stream of ``key``.

        Raises:
            HTTPProblem: 429 ``too-many-streams`` over either bound (``0`` means unbounded).
        """
        if self.max_total and self.total >= self.max_total:
            raise self._refuse("total", f"the server holds {self.max_total} streams, its most")
        if self.max_per_client and self._by_client[key] >= self.max_per_client:
            raise self._refuse("per-client", f"at most {self.max_per_client} streams per client")
        self.total += 1
        self._by_client[key] += 1
        return Slot(self, key)

    def _refuse(self, why: str, message: str) -> HTTPProblem:
        self.refused[why] += 1
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return HTTPProblem(429, "too-many-streams", f"{message}; retry later", headers=headers)

    def _free(self, key: str) -> None:
        self.total -= 1
        left = self._by_client[key] - 1
        if left > 0:
            self._by_client[key] = left
        else:
            del self._by_client[key]
