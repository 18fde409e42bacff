"""What every helper of a streaming connection needs of it: its socket, its bound, its end."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Outlet(Protocol):
    """A streaming connection, as the broadcast, the backlog and the chaos path see it."""

    @property
    def socket(self) -> asyncio.Transport:
        """The transport its bytes are written to."""
        ...

    @property
    def send_buffer(self) -> int:
        """Unsent (or held) bytes past which it has fallen too far behind."""
        ...

    @property
    def done(self) -> asyncio.Future[str]:
        """Resolved once the connection has ended."""
        ...

    def overflow(self) -> None:
        """End it: it fell more than ``send_buffer`` behind."""

    def lost(self) -> None:
        """Its socket is gone: end it."""
