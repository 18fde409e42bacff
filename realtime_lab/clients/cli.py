"""``realtime-lab tail`` and ``realtime-lab chat``: the clients from a terminal.

``tail URL/CHANNEL`` prints a channel's tokens as they arrive (typewriter style) and every other
event on its own line; ``chat "prompt"`` starts a chat and tails it (with ``--transport fetch``
in one request, ``POST /api/chats/stream``, as ChatGPT's page does). Both print the client's
statistics to stderr at the end, also on Ctrl-C, so stdout carries only the stream (pipe it).
Exit status: 0 after ``end`` (or when the stream stops), 1 when the client gives up or the server
refuses, 130 on Ctrl-C.

Against a server with auth on, both take ``--token`` (better: ``REALTIME_LAB_TOKEN``, which
``ps`` does not show) and ``--tickets`` (open each stream with a single-use ticket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

import aiohttp
from yarl import URL

from realtime_lab.clients import (
    CHANNEL_TRANSPORTS,
    TRANSPORTS,
    FetchClient,
    StreamClient,
    open_stream,
)
from realtime_lab.errors import ClientError, ServerRefused
from realtime_lab.protocol.envelope import TOKEN, Event

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TRANSPORT = "sse"
EXIT_GAVE_UP = 1
EXIT_INTERRUPTED = 130
TOKEN_ENV = "REALTIME_LAB_TOKEN"
SIGN_IN_HINT = f"pass --token TOKEN or set {TOKEN_ENV} (mint one: realtime-lab token --user NAME)"


class Printer:
    """Writes events to a terminal: tokens inline and flushed at once, the rest one per line."""

    def __init__(self, out: TextIO, as_json: bool = False) -> None:
        self.out = out
        self.as_json = as_json
        self._mid_line = False

    def event(self, event: Event) -> None:
        """Print one event."""
        out = self.out
        if self.as_json:
            out.write(event.json.decode() + "\n")
        elif event.type == TOKEN:
            out.write(str(event.data.get("text", "")))
            self._mid_line = True
        else:
            self.finish()
            data = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
            out.write(f"[{event.type} {event.id}] {data}\n")
        out.flush()

    def finish(self) -> None:
        """End a line of tokens, if one is open."""
        if self._mid_line:
            self._mid_line = False
            self.out.write("\n")
            self.out.flush()


def split_target(target: str) -> tuple[str, str, str | None]:
    """``http://host:port[/prefix][/TRANSPORT]/CHANNEL`` as (base URL, channel, transport).

    A transport segment before the channel (as in a chat's ``urls``) is recognised and returned;
    ``ws://`` and ``wss://`` become ``http://`` and ``https://``.

    Raises:
        ClientError: no channel in the URL.
    """
    url = URL(target)
    if not url.absolute or url.scheme not in ("http", "https", "ws", "wss"):
        raise ClientError(f"{target!r}: expected http://HOST:PORT/CHANNEL")
    parts = [p for p in url.path.split("/") if p]
    if not parts:
        raise ClientError(f"{target!r}: the URL names no channel (http://HOST:PORT/CHANNEL)")
    channel = parts.pop()
    transport = parts.pop() if parts and parts[-1] in CHANNEL_TRANSPORTS else None
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    base = url.with_scheme(scheme).with_path("/" + "/".join(parts)).with_query(None)
    return str(base).rstrip("/"), channel, transport


async def stream(
    client: StreamClient,
    printer: Printer,
    errors: TextIO,
    before_first: Callable[[], None] | None = None,
) -> int:
    """Print ``client``'s events until ``end``; then (and on any way out) print its statistics.

    ``before_first`` is called once, before the first event is printed.
    """
    try:
        async with client:
            async for event in client:
                if before_first is not None:
                    before_first()
                    before_first = None
                printer.event(event)
        return 0
    except ClientError as exc:
        printer.finish()
        print(f"realtime-lab: {exc}", file=errors)
        if isinstance(exc, ServerRefused) and exc.status == 401 and client.token is None:
            print(f"realtime-lab: the server wants a user: {SIGN_IN_HINT}", file=errors)
        return EXIT_GAVE_UP
    finally:
        printer.finish()
        if printer.as_json:
            print(json.dumps(client.stats.summary()), file=errors)
        else:
            print(client.stats.format(), file=errors)
        errors.flush()


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        # asyncio.run cancelled the command's task first, so its statistics are printed.
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout went away (| head). Point it at /dev/null so the interpreter's final flush
        # does not fail again on the way out.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# tail ---------------------------------------------------------------------------------------------


def _add_stream_options(
    parser: argparse.ArgumentParser, transports: tuple[str, ...], fetch_note: str = ""
) -> None:
    parser.add_argument(
        "--transport",
        "-t",
        choices=transports,
        default=None,
        help=f"how to receive the events (default {DEFAULT_TRANSPORT}){fetch_note}",
    )
    parser.add_argument(
        "--json", action="store_true", help="print each event's JSON envelope, one per line"
    )
    parser.add_argument("--client-tag", help="sent as ?client=, see GET /api/stats?client=TAG")
    parser.add_argument(
        "--token",
        default=None,
        help=f"a user token for a server with auth on, sent as Authorization: Bearer "
        f"(default: ${TOKEN_ENV}; prefer the variable, a command line is visible to ps)",
    )
    parser.add_argument(
        "--tickets",
        action="store_true",
        help="open each stream with a single-use ticket (POST /api/tickets with the token), "
        "as a browser does, instead of sending the token on the stream request (not for "
        "fetch: its POST creates the chat, so it always sends the token)",
    )


def token_of(args: argparse.Namespace) -> str | None:
    """The user token: ``--token``, else ``$REALTIME_LAB_TOKEN``; ``None`` when neither is set."""
    token: str | None = args.token or os.environ.get(TOKEN_ENV, "").strip() or None
    return token


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _tail(args: argparse.Namespace) -> int:
    base, channel, transport = split_target(args.target)
    client = open_stream(
        base,
        channel,
        args.transport or transport or DEFAULT_TRANSPORT,
        after=args.after,
        client_tag=args.client_tag,
        token=token_of(args),
        use_tickets=args.tickets,
    )
    return await stream(client, Printer(sys.stdout, args.json), sys.stderr)


def _tail_command(args: argparse.Namespace) -> int:
    try:
        split_target(args.target)
    except ClientError as exc:
        print(f"realtime-lab tail: {exc}", file=sys.stderr)
        return 2
    return _run(_tail(args))


def _add_tail(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "tail",
        help="print a channel's events as they arrive",
        description="Print a channel's events as they arrive: tokens inline, other events on "
        "their own line, the client's statistics (stderr) at the end or on Ctrl-C. The client "
        "reconnects and resumes by itself.",
    )
    parser.add_argument(
        "target",
        metavar="URL/CHANNEL",
        help="e.g. http://127.0.0.1:8080/ticker (a transport URL such as .../sse/ticker works)",
    )
    _add_stream_options(parser, CHANNEL_TRANSPORTS)
    parser.add_argument(
        "--after", help="start after this event id ('now': new events only; default: history)"
    )
    parser.set_defaults(func=_tail_command)


# chat ---------------------------------------------------------------------------------------------


async def _chat(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    body: dict[str, Any] = {"prompt": args.prompt, "seed": args.seed}
    for name in ("ttft_ms", "token_ms", "max_tokens"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    token = token_of(args)
    transport = args.transport or DEFAULT_TRANSPORT
    async with aiohttp.ClientSession() as session:
        if transport == "fetch":
            return await _fetch_chat(args, base, body, token, session)
        try:
            async with session.post(
                f"{base}/api/chats", json=body, headers=_bearer(token)
            ) as response:
                answer = await response.json(content_type=None)
                if response.status != 201:
                    error = answer.get("error", {}) if isinstance(answer, dict) else {}
                    message = error.get("message", response.reason)
                    print(f"realtime-lab chat: HTTP {response.status}: {message}", file=sys.stderr)
                    if response.status == 401 and token is None:
                        print(f"realtime-lab chat: {SIGN_IN_HINT}", file=sys.stderr)
                    return EXIT_GAVE_UP
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            print(f"realtime-lab chat: cannot start a chat at {base}: {exc}", file=sys.stderr)
            return EXIT_GAVE_UP
        print(f"chat {answer['id']} on {answer['channel']} over {transport}", file=sys.stderr)
        client = open_stream(
            base,
            answer["channel"],
            transport,
            session=session,
            client_tag=args.client_tag,
            token=token,
            use_tickets=args.tickets,
        )
        try:
            return await stream(client, Printer(sys.stdout, args.json), sys.stderr)
        except asyncio.CancelledError:
            await _cancel(session, base, answer["id"], token)
            raise


async def _fetch_chat(
    args: argparse.Namespace,
    base: str,
    body: dict[str, Any],
    token: str | None,
    session: aiohttp.ClientSession,
) -> int:
    """``chat --transport fetch``: one POST starts the chat and streams it."""
    client = open_stream(
        base,
        None,
        "fetch",
        chat=body,
        session=session,
        client_tag=args.client_tag,
        token=token,
        use_tickets=args.tickets,
    )
    assert isinstance(client, FetchClient)

    def announce() -> None:
        # The stream names its chat in its first message, before any event.
        print(f"chat {client.chat_id} on {client.channel} over fetch", file=sys.stderr)
        sys.stderr.flush()

    try:
        return await stream(client, Printer(sys.stdout, args.json), sys.stderr, announce)
    except asyncio.CancelledError:
        # The server would cancel the abandoned chat after its abort grace; do it now.
        if client.chat_id is not None:
            await _cancel(session, base, client.chat_id, token)
        raise


async def _cancel(
    session: aiohttp.ClientSession, base: str, chat_id: str, token: str | None
) -> None:
    """Ctrl-C: stop the generation too, as closing a chat window would."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with asyncio.timeout(2.0):
            await session.delete(f"{base}/api/chats/{chat_id}", headers=_bearer(token))


def _chat_command(args: argparse.Namespace) -> int:
    return _run(_chat(args))


def _add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "chat",
        help="start a simulated chat and print its answer as it streams",
        description="POST /api/chats, then tail the chat's channel: the answer is printed token "
        "by token, the client's statistics (stderr) at the end. Ctrl-C cancels the chat. With "
        "--transport fetch one request does both: POST /api/chats/stream answers with the "
        "chat's events.",
    )
    parser.add_argument("prompt", help="the prompt; the answer is deterministic for prompt+seed")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    _add_stream_options(
        parser, TRANSPORTS, "; fetch: start and stream the chat in one POST /api/chats/stream"
    )
    parser.add_argument("--seed", type=int, default=0, help="answer variant (default 0)")
    parser.add_argument(
        "--ttft-ms", type=float, default=None, help="time to first token (default: server's)"
    )
    parser.add_argument(
        "--token-ms", type=float, default=None, help="delay between tokens (default: server's)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="answer length bound (default: server's)"
    )
    parser.set_defaults(func=_chat_command)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tail`` and ``chat`` on the ``realtime-lab`` parser."""
    _add_tail(sub)
    _add_chat(sub)
