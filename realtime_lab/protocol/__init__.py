"""Sans-I/O wire formats: the event envelope, cursors, and the SSE codec.

Nothing in this package imports asyncio or aiohttp: every function takes bytes or values and
returns bytes or values, so it is tested without an event loop.
"""

from __future__ import annotations

from realtime_lab.protocol.cursor import LIVE, Cursor, format_id, parse_after
from realtime_lab.protocol.envelope import Event

__all__ = ["LIVE", "Cursor", "Event", "format_id", "parse_after"]
