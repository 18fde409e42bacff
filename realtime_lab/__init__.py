"""Realtime Lab: one token feed served over short polling, long polling, SSE and WebSocket."""

from __future__ import annotations

from realtime_lab.errors import RealtimeLabError

__all__ = ["RealtimeLabError", "__version__"]
__version__ = "0.1.0"
