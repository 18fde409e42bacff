"""Server settings: one dataclass, filled from defaults, ``REALTIME_LAB_*`` variables and flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "REALTIME_LAB_"

_TRUE = {"1", "true", "yes", "on"}

#: ``compression``: none; one compressed copy per event shared by every subscriber (WebSocket
#: ``permessage-deflate`` without context takeover); a compressor per connection (WebSocket with
#: context takeover, SSE and fetch streams with ``Content-Encoding``). Polling answers are
#: compressed when asked in both modes that compress.
COMPRESSION_MODES = ("off", "message", "connection")


@dataclass(slots=True)
class Settings:
    """Everything ``realtime-lab serve`` can be told. Field ``x`` reads ``REALTIME_LAB_X``."""

    host: str = "127.0.0.1"
    port: int = 8080
    bus: str = "memory://"
    history: int = 1000  # events kept per channel
    history_bytes: int = 1024 * 1024  # and at most this many bytes of them
    max_channels: int = 10_000  # channels held at once (chats, user channels, app channels)
    channel_ttl: float = 300.0  # seconds a finished channel (and chat) is kept
    heartbeat: float = 15.0  # seconds between SSE comments / WebSocket pings
    retry_ms: int = 1000  # the SSE ``retry:`` sent at the start of each stream
    ticker_rate: float = 10.0  # ticker tokens per second (0 pauses it)
    ttft_ms: float = 100.0  # default time to first token of a chat
    token_ms: float = 15.0  # default per-token delay of a chat (jittered ±33%)
    max_tokens: int = 120  # upper bound of a chat's answer length
    longpoll_timeout: float = 30.0  # default long-poll wait
    longpoll_max_timeout: float = 60.0  # largest ``timeout`` a client may ask for
    poll_limit: int = 100  # default events per (long-)poll answer
    poll_max_limit: int = 1000  # largest ``limit`` a client may ask for
    max_body: int = 64 * 1024  # request body limit (bytes) for the JSON API
    ws_max_message: int = 4 * 1024  # largest WebSocket message a client may send (bytes)
    send_buffer: int = 256 * 1024  # per-connection unsent bytes before it is ended (overflow)
    coalesce_ms: float = 0.0  # SSE/WebSocket write coalescing window when behind (0: off)
    compression: str = "off"  # off | message | connection (see COMPRESSION_MODES)
    shutdown_timeout: float = 5.0  # seconds to end streams on SIGINT/SIGTERM
    chaos: bool = False  # enable /api/chaos fault injection
    log_level: str = "INFO"
    # Identity and browser policy (off for the local lab; see README "Who may read and publish")
    auth_secret: str = ""  # HS256 secret of the user tokens; set it and every API needs a user
    insecure: bool = False  # serve on a non-loopback address without a secret anyway
    allowed_origins: str = ""  # comma list of origins for CORS and WebSocket (own origin always)
    allowed_hosts: str = ""  # comma list of Host values answered (default: loopback names)
    trusted_proxies: str = ""  # comma list of proxy addresses whose X-Forwarded-Proto counts
    ticket_ttl: float = 30.0  # seconds a stream ticket stays valid (single use)
    # Bounds on what clients can make the server hold
    max_chats: int = 2_000  # chats generating at once, in total
    max_chats_per_user: int = 20  # chats one user generates at once (auth on)
    max_streams: int = 20_000  # open streams (SSE, WebSocket, waiting long polls) in total
    max_streams_per_client: int = 256  # per user (auth on) or per client address (auth off)
    stream_timeout: float = 0.0  # seconds a stream stays open before it is ended (0: no limit)
    fetch_abort_grace: float = 3.0  # seconds a cut fetch stream's chat waits for a resume
    header_timeout: float = 10.0  # seconds a client has to send complete request headers
    # A real model behind the chats (API key: REALTIME_LAB_UPSTREAM_API_KEY, never a flag)
    upstream: str = ""  # OpenAI-compatible base URL (e.g. http://127.0.0.1:9000/v1); "": simulate
    upstream_model: str = "realtime-lab-sim"  # the ``model`` asked of the upstream
    upstream_ttft_timeout: float = 30.0  # seconds the upstream has to send its first token
    upstream_idle_timeout: float = 30.0  # seconds of upstream silence that end a chat mid-answer

    @property
    def generator(self) -> str:
        """Who writes the chats' answers: ``simulated``, or ``upstream:<model>``."""
        return f"upstream:{self.upstream_model}" if self.upstream else "simulated"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``REALTIME_LAB_*`` variables, then non-``None`` ``overrides``."""
        env = os.environ if environ is None else environ
        settings = cls()
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                setattr(settings, f.name, _coerce(f.name, type(getattr(settings, f.name)), raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        if settings.compression not in COMPRESSION_MODES:
            raise ValueError(
                f"compression {settings.compression!r} is not one of "
                + ", ".join(COMPRESSION_MODES)
            )
        return settings


def _coerce(name: str, kind: type, raw: str) -> Any:
    try:
        if kind is bool:
            return raw.strip().lower() in _TRUE
        return kind(raw)
    except ValueError as exc:
        raise ValueError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from exc
