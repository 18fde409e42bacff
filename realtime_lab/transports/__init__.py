"""One module per transport: thin aiohttp glue between the bus and the protocol encoders."""

from __future__ import annotations

TRANSPORTS = ("poll", "longpoll", "sse", "ws", "fetch")

__all__ = ["TRANSPORTS"]
