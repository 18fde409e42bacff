"""Every typed ``web.AppKey`` of the application, in one place."""

from __future__ import annotations

from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from realtime_lab.bus import Bus
from realtime_lab.config import Settings
from realtime_lab.feed.chats import ChatRegistry
from realtime_lab.feed.ticker import Ticker
from realtime_lab.transports.abortgrace import AbortGrace
from realtime_lab.transports.access import Access
from realtime_lab.transports.accounting import Hub
from realtime_lab.transports.broadcast import Broadcasts
from realtime_lab.transports.chaos import Chaos
from realtime_lab.transports.heartbeat import Heartbeat
from realtime_lab.transports.slots import StreamSlots

SETTINGS_KEY: Final = web.AppKey("settings", Settings)
BUS_KEY: Final = web.AppKey("bus", Bus)
CHATS_KEY: Final = web.AppKey("chats", ChatRegistry)
TICKER_KEY: Final = web.AppKey("ticker", Ticker)
HUB_KEY: Final = web.AppKey("hub", Hub)
CHAOS_KEY: Final = web.AppKey("chaos", Chaos)
BROADCASTS_KEY: Final = web.AppKey("broadcasts", Broadcasts)
REGISTRY_KEY: Final = web.AppKey("metrics_registry", CollectorRegistry)
ACCESS_KEY: Final = web.AppKey("access", Access)
SLOTS_KEY: Final = web.AppKey("stream_slots", StreamSlots)
HEARTBEAT_KEY: Final = web.AppKey("heartbeat", Heartbeat)
ABORT_GRACE_KEY: Final = web.AppKey("abort_grace", AbortGrace)
