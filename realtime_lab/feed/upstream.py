"""A real model behind the lab: chat answers streamed from an OpenAI-compatible upstream.

:class:`UpstreamSource` is a :class:`~realtime_lab.feed.chats.TokenSource`: for each chat it POSTs
``{"model", "messages": [{"role": "user", "content": prompt}], "stream": true, "max_tokens",
"seed"}`` to ``<base URL>/chat/completions`` and yields every ``choices[0].delta.content`` as the
bytes arrive; the chat registry publishes each as a ``token`` event, so every transport relays
the model. The text only ever travels inside the envelope's JSON, so nothing the upstream sends
(``"\\n\\ndata: x"``, a CR) can break the lab's own framing.

The body is parsed with the project's own incremental :class:`~realtime_lab.protocol.sse.SSEDecoder`
rather than a client library's SSE parser (aiohttp-sse-client, httpx-sse): it is the
WHATWG-exact decoder the lab's clients and tests already rely on, fed chunk by chunk.

Every way the upstream can fail ends the chat with an :class:`~realtime_lab.errors.UpstreamError`
(its ``code`` in brackets): the connection is refused or lost before an answer
(``upstream-unreachable``); a 4xx/5xx answer (``upstream-status``; 429 is
``upstream-rate-limited`` and keeps its ``Retry-After``); an in-band ``{"error": ...}`` chunk
(``upstream-error``); the body ends or breaks without ``data: [DONE]`` (``upstream-cut``); a
chunk that is not JSON, not a chat completion chunk, or larger than :data:`MAX_EVENT_BYTES`
(``upstream-invalid-chunk``); no first token within ``ttft_timeout`` seconds of the request
(``upstream-ttft-timeout``); no bytes for ``idle_timeout`` seconds after it
(``upstream-idle-timeout``). Cancelling the chat closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import os
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

import aiohttp

from realtime_lab.errors import UpstreamError
from realtime_lab.feed.chats import Chat
from realtime_lab.protocol.sse import SSEDecoder

__all__ = [
    "API_KEY_ENV",
    "MAX_EVENT_BYTES",
    "READ_CHUNK",
    "UpstreamSource",
    "delta_text",
    "parse_retry_after",
    "upstream_source",
]

#: Bytes read from the upstream per read: bounds what one read holds in memory.
READ_CHUNK: Final = 64 * 1024
#: The most bytes one SSE event (or a run of bytes with no event) may take: an upstream that
#: never ends its event must not make the lab buffer without bound. Counted per read, so the
#: decoder holds at most this plus one :data:`READ_CHUNK` before the chat is ended.
MAX_EVENT_BYTES: Final = 1024 * 1024
#: The most of an error answer's body read for its message.
MAX_ERROR_BODY: Final = 4 * 1024
DONE: Final = "[DONE]"


def _invalid(message: str) -> UpstreamError:
    return UpstreamError(message, "upstream-invalid-chunk")


def delta_text(data: str) -> str | None:
    """The ``choices[0].delta.content`` of one chunk's ``data`` (``None``: the chunk has none).

    Raises:
        UpstreamError: ``upstream-invalid-chunk`` (not JSON, or not a chat completion chunk) or
            ``upstream-error`` (the upstream reported an error in-band); stop reading.
    """
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise _invalid(f"the upstream sent a chunk that is not JSON: {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise _invalid("the upstream sent a chunk that is not a JSON object")
    if "error" in value:
        error = value["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamError(f"the upstream failed mid-answer: {message}", "upstream-error")
    choices = value.get("choices")
    if not isinstance(choices, list):
        raise _invalid("the upstream sent a chunk without a choices array")
    if not choices:  # e.g. the usage chunk
        return None
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        raise _invalid("the upstream sent a chunk whose choices[0].delta is not an object")
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise _invalid("the upstream sent a chunk whose delta.content is not a string")
    return content or None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    ``None`` when the header is absent or malformed; ``now`` (epoch seconds) is for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


async def _status_error(resp: aiohttp.ClientResponse) -> UpstreamError:
    body = b""
    with contextlib.suppress(aiohttp.ClientError, OSError):  # the status says enough then
        body = await resp.content.read(MAX_ERROR_BODY)
    detail = body.decode("utf-8", "replace").strip()
    try:
        error = json.loads(detail).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str):
            detail = message
    except (ValueError, AttributeError):
        pass
    text = f"the upstream answered {resp.status} {resp.reason or ''}".rstrip()
    if detail:
        text += f": {detail[:300]}"
    if resp.status == 429:
        return UpstreamError(
            text,
            "upstream-rate-limited",
            status=429,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )
    return UpstreamError(text, "upstream-status", status=resp.status)


class UpstreamSource:
    """Chat answers from an OpenAI-compatible server at ``base_url`` (e.g. ``.../v1``).

    One ``aiohttp.ClientSession`` for every chat, created on first use (inside the loop) and
    closed by :meth:`close`. Its connection pool is unbounded: the registry already bounds the
    chats running at once, and a chat queued for a pooled connection would burn its TTFT budget.
    ``api_key`` goes out as ``Authorization: Bearer``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "realtime-lab-sim",
        api_key: str | None = None,
        ttft_timeout: float = 30.0,
        idle_timeout: float = 30.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._ttft_timeout = ttft_timeout
        self._idle_timeout = idle_timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UpstreamError("the upstream client is closed", "upstream-unreachable")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                # The deadlines are this class's own (TTFT, idle), not aiohttp's.
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def _body(self, chat: Chat) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": chat.prompt}],
            "stream": True,
            "max_tokens": chat.max_tokens,
            "seed": chat.seed,
        }

    async def tokens(self, chat: Chat) -> AsyncGenerator[str, None]:
        """The upstream's answer to ``chat``, one delta at a time (see the module docstring).

        Raises:
            UpstreamError: the upstream failed; the chat ends in ``error``.
        """
        loop = asyncio.get_running_loop()
        ttft_at = loop.time() + self._ttft_timeout
        session = self._client()
        try:
            async with asyncio.timeout_at(ttft_at):
                resp = await session.post(self.url, json=self._body(chat), headers=self._headers)
        except TimeoutError:
            raise self._ttft_error() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                f"could not reach the upstream at {self.url}: {exc}", "upstream-unreachable"
            ) from exc
        complete = False
        try:
            if resp.status >= 300:
                raise await _status_error(resp)
            kind = resp.headers.get("Content-Type", "")
            if not kind.startswith("text/event-stream"):
                raise _invalid(
                    f"the upstream answered {kind or 'no content type'}, not an SSE stream"
                )
            decoder = SSEDecoder()
            first = True
            pending = 0  # bytes since the last event or comment
            while True:
                try:
                    if first:  # until the first token, only the TTFT deadline counts
                        async with asyncio.timeout_at(ttft_at):
                            chunk = await resp.content.read(READ_CHUNK)
                    else:
                        async with asyncio.timeout(self._idle_timeout):
                            chunk = await resp.content.read(READ_CHUNK)
                except TimeoutError:
                    if first:
                        raise self._ttft_error() from None
                    raise UpstreamError(
                        f"the upstream sent nothing for {self._idle_timeout:g} s",
                        "upstream-idle-timeout",
                    ) from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise UpstreamError(
                        f"the upstream connection broke mid-answer: {exc}", "upstream-cut"
                    ) from exc
                if not chunk:
                    raise UpstreamError(
                        "the upstream ended its answer without data: [DONE]", "upstream-cut"
                    )
                comments = decoder.comments
                events = decoder.feed(chunk)
                pending = 0 if events or decoder.comments != comments else pending + len(chunk)
                if pending > MAX_EVENT_BYTES:
                    raise _invalid(f"the upstream sent an event over {MAX_EVENT_BYTES} bytes")
                for event in events:
                    if event.data == DONE:
                        complete = True
                        return
                    text = delta_text(event.data)
                    if text is not None:
                        first = False
                        yield text
        finally:
            if complete:
                resp.release()  # the answer is whole: the connection may be reused
            else:
                resp.close()  # cancelled or failed: hang up on the upstream now

    def _ttft_error(self) -> UpstreamError:
        return UpstreamError(
            f"the upstream sent no token within {self._ttft_timeout:g} s", "upstream-ttft-timeout"
        )

    async def close(self) -> None:
        """Close the HTTP client (idempotent); chats started afterwards fail."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


#: The environment variable holding the upstream's API key (kept out of flags and /api/config).
API_KEY_ENV: Final = "REALTIME_LAB_UPSTREAM_API_KEY"


def upstream_source(
    url: str,
    *,
    model: str = "realtime-lab-sim",
    ttft_timeout: float = 30.0,
    idle_timeout: float = 30.0,
    environ: Mapping[str, str] | None = None,
) -> UpstreamSource | None:
    """The source for ``--upstream url`` (``None`` when ``url`` is empty: keep the simulation).

    The API key is read from :data:`API_KEY_ENV` in ``environ`` (default ``os.environ``). Pass
    the result as ``ChatRegistry(source=...)``.
    """
    if not url:
        return None
    env = os.environ if environ is None else environ
    return UpstreamSource(
        url,
        model=model,
        api_key=env.get(API_KEY_ENV) or None,
        ttft_timeout=ttft_timeout,
        idle_timeout=idle_timeout,
    )
