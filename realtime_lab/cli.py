"""The ``realtime-lab`` command: ``serve`` (and the client and benchmark tools)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from realtime_lab import app as server
from realtime_lab.auth import exposure_error
from realtime_lab.auth.cli import add_token_command
from realtime_lab.bench.cli import add_parser as add_bench_command
from realtime_lab.clients.cli import add_commands as add_client_commands
from realtime_lab.config import COMPRESSION_MODES, ENV_PREFIX, Settings
from realtime_lab.errors import BusUnavailable
from realtime_lab.logs import setup_logging

_CHOICES = {"compression": COMPRESSION_MODES}
_HELP = {
    "host": "interface to listen on",
    "port": "TCP port to listen on",
    "bus": "event bus URL: memory:// (embedded) or redis://host:port/db",
    "history": "events kept per channel for resuming",
    "history_bytes": "bytes of history kept per channel at most (older events are trimmed)",
    "max_channels": "channels held at once; publishing to a new one beyond is refused (507)",
    "channel_ttl": "seconds a finished channel (a chat) is kept before it expires",
    "heartbeat": "seconds between SSE heartbeat comments and WebSocket pings",
    "retry_ms": "SSE retry: field, the browser's reconnection delay",
    "ticker_rate": "tokens per second on the never-ending 'ticker' channel (0 pauses it)",
    "ttft_ms": "default time to first token of a chat",
    "token_ms": "default delay between a chat's tokens (jittered by 33%%)",
    "max_tokens": "upper bound of a chat answer's length",
    "longpoll_timeout": "default seconds a long-poll waits before answering empty",
    "longpoll_max_timeout": "largest long-poll timeout a client may ask for",
    "poll_limit": "default events per poll answer",
    "poll_max_limit": "largest limit a poller may ask for",
    "max_body": "largest JSON request body, in bytes",
    "ws_max_message": "largest WebSocket message a client may send, in bytes",
    "send_buffer": "unsent bytes per connection before a slow client is ended (overflow)",
    "coalesce_ms": "write-coalescing window when the server falls behind (0: off)",
    "compression": "off, message (WebSocket deflate once per event, shared by all) or connection "
    "(a compressor per connection: WebSocket context takeover, gzip/br/zstd SSE and fetch)",
    "shutdown_timeout": "seconds to end streams on SIGINT/SIGTERM",
    "chaos": "enable fault injection under /api/chaos/",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "auth_secret": "HS256 secret of user tokens: with it every API needs a user (see 'token')",
    "insecure": "serve on a non-loopback address without --auth-secret anyway",
    "allowed_origins": "comma list of extra origins allowed for CORS and WebSocket",
    "allowed_hosts": "comma list of Host values answered (default: loopback names)",
    "trusted_proxies": "comma list of proxy addresses whose X-Forwarded-Proto is believed",
    "ticket_ttl": "seconds a stream ticket stays valid (it is single use)",
    "max_chats": "chats generating at once, in total",
    "max_chats_per_user": "chats one user generates at once (auth on)",
    "max_streams": "open streams (SSE, WebSocket, waiting long polls) in total",
    "max_streams_per_client": "open streams per user (auth on) or per client address",
    "stream_timeout": "seconds a stream stays open before it ends with reason timeout (0: never)",
    "fetch_abort_grace": "seconds a cut fetch stream's chat waits for a resume before cancel",
    "header_timeout": "seconds a client has to send complete request headers",
    "upstream": "OpenAI-compatible base URL whose model generates the chats, e.g. "
    "http://127.0.0.1:9000/v1 (API key: env REALTIME_LAB_UPSTREAM_API_KEY; empty: simulated)",
    "upstream_model": "model name asked of the upstream",
    "upstream_ttft_timeout": "seconds the upstream has to send a chat's first token",
    "upstream_idle_timeout": "seconds of upstream silence mid-answer that end a chat in error",
}


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the dashboard and the four transports",
        description="Serve the token feed over short polling, long polling, SSE and WebSocket, "
        f"and the dashboard. Every option can also be set with {ENV_PREFIX}<OPTION> "
        f"(e.g. {ENV_PREFIX}PORT=9000); a flag wins over the environment.",
    )
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{_HELP[f.name]} (env {env})",
            )
        else:
            parser.add_argument(
                flag,
                type=type(default),
                default=None,
                choices=_CHOICES.get(f.name),
                metavar=f.name.upper(),
                help=f"{_HELP[f.name]} (default {default}; env {env})",
            )
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings)}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"realtime-lab serve: {exc}", file=sys.stderr)
        return 2
    refusal = exposure_error(
        settings.host, has_secret=bool(settings.auth_secret), insecure=settings.insecure
    )
    if refusal is not None:
        print(f"realtime-lab serve: {refusal}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        server.run(settings)
    except ValueError as exc:  # a malformed origin, host, proxy entry or a short secret
        print(f"realtime-lab serve: {exc}", file=sys.stderr)
        return 2
    except BusUnavailable as exc:  # Redis unreachable at start: one line, not a traceback
        print(f"realtime-lab serve: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``realtime-lab``."""
    parser = argparse.ArgumentParser(
        prog="realtime-lab",
        description="Compare short polling, long polling, SSE and WebSocket on one token feed.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    add_client_commands(sub)
    add_bench_command(sub)
    add_token_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
