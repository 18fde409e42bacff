"""``/v1``: the simulated LLM behind an OpenAI-compatible API (what the official clients speak).

Routes (:func:`setup` adds them): ``POST /v1/chat/completions``, ``GET /v1/models`` and
``GET /v1/models/{model}``. One model is listed, :data:`MODEL_ID`; chat completions answer for
any ``model`` name and echo it back, so a client configured for another model works unchanged.

Requests: ``messages`` (roles ``system``, ``developer``, ``user``, ``assistant``, ``tool``,
``function``) with ``content`` a string, an array of ``{"type": "text", "text": ...}`` parts
(other part types are refused with 400 and ``param`` naming the part), or ``null`` on an
``assistant`` message. The prompt is the last message's text; ``usage.prompt_tokens`` counts the
words of every message. ``seed`` (64-bit integer) picks the answer, ``max_completion_tokens``
(or the older ``max_tokens``, 1 to 5000) bounds it, ``stop`` (a string or up to 4) ends it
before the first occurrence of one (the sequence itself is not sent), ``stream`` and
``stream_options.include_usage`` work as OpenAI's; ``n`` may only be 1; other fields
(``temperature``, ``tools``, ...) are accepted and ignored. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (:mod:`realtime_lab.openai_errors`).

How an answer ends:

- ``finish_reason: "stop"``: the answer ended by itself, or at a ``stop`` sequence (the
  generation is stopped there; the chat then shows ``cancelled`` in ``/api/chats``).
- ``finish_reason: "length"``: ``max_completion_tokens`` / ``max_tokens`` (or the server's
  ``max_tokens`` setting when the request gives none) cut the answer short.
- The client closes the stream (or hangs up on a non-streaming request): the generation is
  cancelled at once; nobody is left to tell.
- The generation is cancelled by someone else (``DELETE /api/chats/{id}``, server shutdown) or
  fails: OpenAI has no ``finish_reason`` for that, and a cut answer must not look complete. A
  stream ends with ``data: {"error": {"type": "server_error", "code": "generation_cancelled"}}``
  (or ``"generation_failed"``) and no ``[DONE]``, which the ``openai`` package raises as
  ``openai.APIError`` (``.code``, ``.type``, ``.body``); a non-streaming request gets the same
  error object with status 503 (cancelled) or 500 (failed): ``openai.InternalServerError``,
  which the clients retry by default (the answer is deterministic, so a retry gets all of it).

Streams are SSE with LF line ends (aiohttp-sse's default is CRLF, which code splitting on
``"\\n\\n"`` cannot read): ``data: {chat.completion.chunk}`` per token, a last chunk with the
``finish_reason``, with ``include_usage`` a chunk with ``"choices": []`` and ``usage`` (every
other chunk then has ``"usage": null``), and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp_sse import sse_response

from realtime_lab.bus import Bus
from realtime_lab.config import Settings
from realtime_lab.errors import LimitReached
from realtime_lab.feed.chats import Chat
from realtime_lab.feed.llm import answer_tokens
from realtime_lab.openai_errors import OpenAIProblem, openai_error, openai_error_shape
from realtime_lab.protocol.envelope import END, TOKEN, Event, dumps
from realtime_lab.transports.access import Handler, identity_of
from realtime_lab.transports.chatstart import MAX_PROMPT
from realtime_lab.transports.keys import BUS_KEY, CHATS_KEY, SETTINGS_KEY
from realtime_lab.transports.params import field, json_body
from realtime_lab.transports.problems import HTTPProblem, json_response, limit_problem

#: The one model ``/v1/models`` lists (and the ``model`` echoed when a request names none).
MODEL_ID: Final = "realtime-lab-sim"
#: When the model was "created": fixed, as the simulated model never changes (2025-01-01).
MODEL_CREATED: Final = 1_735_689_600
MAX_COMPLETION_TOKENS: Final = 5000
#: OpenAI's limit on ``stop`` sequences.
MAX_STOP: Final = 4
ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_INT64: Final = (-(2**63), 2**63 - 1)


def setup(app: web.Application, guard: Callable[[Handler], Handler]) -> None:
    """Add the ``/v1`` routes (each wrapped in ``guard``), and the hook that answers every
    ``/v1`` error in OpenAI's shape."""
    r = app.router
    r.add_post("/v1/chat/completions", guard(openai_chat_completions))
    r.add_get("/v1/models", guard(list_models))
    r.add_get("/v1/models/{model:.+}", guard(retrieve_model))
    app.on_response_prepare.append(openai_error_shape)


# Models ------------------------------------------------------------------------------------------


def model_object() -> dict[str, Any]:
    """The simulated model, as ``/v1/models`` describes it."""
    return {"id": MODEL_ID, "object": "model", "created": MODEL_CREATED, "owned_by": "realtime-lab"}


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the one simulated model."""
    return json_response({"object": "list", "data": [model_object()]})


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: the simulated model, or 404 ``model_not_found``."""
    name = request.match_info["model"]
    if name != MODEL_ID:
        raise OpenAIProblem(
            404,
            f"the model {name!r} does not exist; this server has one model, {MODEL_ID!r}",
            param="model",
            code="model_not_found",
        )
    return json_response(model_object())


# Requests ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    model: str
    prompt: str
    prompt_tokens: int
    seed: int
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _invalid(param: str, message: str, code: str = "invalid_parameter") -> OpenAIProblem:
    return OpenAIProblem(400, message, param=param, code=code)


def _content_text(message: dict[str, Any], where: str) -> str:
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _invalid(f"{where}.role", f"{where}.role must be one of {', '.join(sorted(ROLES))}")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":  # e.g. a message that only carried tool calls
            return ""
        raise _invalid(f"{where}.content", f"{where}.content is required for role {role!r}")
    if not isinstance(content, list):
        raise _invalid(
            f"{where}.content", f"{where}.content must be a string or an array of text parts"
        )
    if not content:
        raise _invalid(f"{where}.content", f"{where}.content must not be an empty array")
    texts: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _invalid(at, f"{at} must be an object such as {{'type': 'text', 'text': ...}}")
        kind = part.get("type")
        if kind != "text":
            raise _invalid(
                f"{at}.type",
                f"{at}.type is {kind!r}: this server only reads text parts ('type': 'text')",
                code="unsupported_content",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{at}.text", f"{at}.text must be a string")
        texts.append(text)
    # Parts are separate pieces of text: joined without a separator, words could run together.
    return "\n".join(texts)


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    try:
        return int(field(body, name, default, low, high, integer=True))
    except HTTPProblem as exc:
        raise _invalid(name, exc.message) from None


def _seed(body: dict[str, Any]) -> int:
    # Not field(): it goes through float, which would round a 64-bit seed to another one.
    seed = body.get("seed")
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not _INT64[0] <= seed <= _INT64[1]:
        raise _invalid("seed", "seed must be an integer (64-bit)")
    return seed


def _stop(value: object) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else value
    if value is None:
        return ()
    if (
        not isinstance(stops, list | tuple)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _invalid("stop", f"stop must be a non-empty string or up to {MAX_STOP} of them")
    return tuple(stops)


def parse_request(body: dict[str, Any], settings: Settings) -> CompletionRequest:
    """Validate a chat completion request body; start the chat from the result.

    Raises:
        OpenAIProblem: 400 ``invalid_request_error`` with ``param`` naming the field at fault.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty array of {role, content} objects")
    texts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}]", f"messages[{i}] must be a {{role, content}} object")
        texts.append(_content_text(message, f"messages[{i}]"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", "model must be a string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "stream must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("stream_options", "stream_options is only allowed with stream: true")
        usage = options.get("include_usage") if isinstance(options, dict) else None
        if not isinstance(options, dict) or not isinstance(usage, bool | None):
            raise _invalid(
                "stream_options", "stream_options must be an object like {'include_usage': true}"
            )
        include_usage = bool(usage)
    if body.get("n") not in (None, 1):
        raise _invalid("n", "n must be 1: this server generates one choice")
    # max_completion_tokens replaced max_tokens in OpenAI's API; either is honoured.
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    return CompletionRequest(
        model=model or MODEL_ID,
        prompt=texts[-1][:MAX_PROMPT] or " ",
        prompt_tokens=sum(len(text.split()) for text in texts),
        seed=_seed(body),
        max_tokens=_integer(
            body, limit or "max_tokens", settings.max_tokens, 1, MAX_COMPLETION_TOKENS
        ),
        stop=_stop(body.get("stop")),
        stream=bool(stream),
        include_usage=include_usage,
    )


# Answers -----------------------------------------------------------------------------------------


class StopScanner:
    """Cuts a text that arrives piece by piece before the first ``stop`` sequence.

    Text that could still turn out to be the start of a stop sequence is held back until the
    next piece tells; :meth:`flush` releases it when the answer ends without one.
    """

    __slots__ = ("_held", "_longest", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """``(text to send now, whether a stop sequence was reached)``; stop feeding after one."""
        text = self._held + piece
        found = [at for stop in self._stops if (at := text.find(stop)) >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        # Nothing before the held text can start a match: only the longest suffix of the text
        # that begins some stop sequence can still become one.
        keep = 0
        for size in range(min(len(text), self._longest - 1), 0, -1):
            if any(stop.startswith(text[-size:]) for stop in self._stops):
                keep = size
                break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The text held back, which no stop sequence completed: send it."""
        held, self._held = self._held, ""
        return held


@dataclass(slots=True)
class Outcome:
    """How an answer ended, filled in by :func:`answer_deltas`."""

    #: ``"stop"`` or ``"length"`` when the answer is complete, else ``None``.
    finish_reason: str | None = None
    #: Why it is not: ``"cancelled"`` or ``"error"`` (``None`` while complete).
    failure: str | None = None
    completion_tokens: int = 0


def was_cut(chat: Chat, simulated: bool = True) -> bool:
    """Whether the answer would have gone on past ``chat.max_tokens`` (OpenAI's ``length``)."""
    if len(chat.parts) < chat.max_tokens:
        return False
    if not simulated:
        # A real model's answer cannot be asked again: it stopped at the limit, so it was cut.
        return True
    # The simulated answer is deterministic and a shorter limit gives a prefix of it: one token
    # more than the limit shows whether there was more to say.
    more = answer_tokens(chat.prompt, chat.seed, max_tokens=chat.max_tokens + 1)
    return len(more) > chat.max_tokens


async def answer_deltas(
    bus: Bus, chat: Chat, stops: Sequence[str], outcome: Outcome, *, simulated: bool = True
) -> AsyncGenerator[str, None]:
    """The answer's text as it is generated, cut at a stop sequence; then read ``outcome``.

    Iterate it inside ``contextlib.aclosing`` so the subscription ends with the iteration.
    """
    scanner = StopScanner(stops)
    # The whole chat fits in the queue (max_tokens tokens and the end), so this subscriber is
    # never ended for falling behind, however slowly its client reads.
    async with bus.subscribe(chat.channel, maxsize=chat.max_tokens + 2) as events:
        async for event in events:
            if event.type == TOKEN:
                outcome.completion_tokens += 1
                text, stopped = scanner.feed(event.data["text"])
                if text:
                    yield text
                if stopped:
                    outcome.finish_reason = "stop"
                    return
            elif event.type == END:
                if event.data.get("reason") != "done":
                    outcome.failure = (
                        "cancelled" if event.data.get("reason") == "cancelled" else "error"
                    )
                    return
                rest = scanner.flush()
                if rest:
                    yield rest
                outcome.finish_reason = "length" if was_cut(chat, simulated) else "stop"
                return
    outcome.failure = "error"  # the subscription ended without the chat's end


def _failure(outcome: Outcome) -> tuple[int, str, str]:
    """``(status, code, message)`` for an answer that did not complete."""
    if outcome.failure == "cancelled":
        return (
            503,
            "generation_cancelled",
            "the generation was cancelled before it finished (the chat was cancelled, or the"
            " server is shutting down); the answer is incomplete: send the request again",
        )
    return 500, "generation_failed", "the generation failed; send the request again"


def _usage(request: CompletionRequest, outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": request.prompt_tokens + outcome.completion_tokens,
    }


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the simulated LLM (see the module docstring).

    With ``"stream": true`` the answer is SSE chunks and ``data: [DONE]``; without it, one
    ``chat.completion``.
    """
    settings, chats = request.app[SETTINGS_KEY], request.app[CHATS_KEY]
    params = parse_request(await json_body(request), settings)
    identity = identity_of(request)
    try:
        chat = chats.start(
            params.prompt,
            seed=params.seed,
            ttft_ms=settings.ttft_ms,
            token_ms=settings.token_ms,
            max_tokens=params.max_tokens,
            **({} if identity is None else {"owner": identity.user}),
        )
    except LimitReached as exc:
        raise limit_problem(exc) from None  # 429 with Retry-After, in OpenAI's shape
    try:
        if params.stream:
            return await _stream(request, chat, params)
        return await _complete(request, chat, params)
    finally:
        # Stopped at a stop sequence, or the client hung up: nobody reads the rest.
        if chat.status == "running":
            chats.cancel(chat.id)


async def _complete(
    request: web.Request, chat: Chat, params: CompletionRequest
) -> web.StreamResponse:
    outcome = Outcome()
    deltas = answer_deltas(
        request.app[BUS_KEY],
        chat,
        params.stop,
        outcome,
        simulated=not request.app[SETTINGS_KEY].upstream,
    )
    async with contextlib.aclosing(deltas):
        text = "".join([delta async for delta in deltas])
    if outcome.finish_reason is None:
        status, code, message = _failure(outcome)
        raise OpenAIProblem(status, message, code=code)
    return json_response(
        {
            "id": f"chatcmpl-{chat.id}",
            "object": "chat.completion",
            "created": int(chat.created),
            "model": params.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": outcome.finish_reason,
                }
            ],
            "usage": _usage(params, outcome),
        }
    )


def _data(payload: bytes) -> bytes:
    """One SSE event of one ``data:`` line (compact JSON has no line break)."""
    return b"data: " + payload + b"\n\n"


class CompletionStream:
    """Writes one chat's events to one streaming completion as OpenAI chunks, as they come.

    A bus sink (the hub calls :meth:`deliver` for each event of the chat, history first): each
    token is framed here and written to the socket in the same call, no queue and no task
    switch per token (the endpoint once cost twice the SSE transport's CPU per token through a
    subscription and ``EventSourceResponse.send``). The response itself is aiohttp-sse's, for
    its headers, pings and end. Await :attr:`done`; :attr:`outcome` says how the answer ended.
    """

    __slots__ = (
        "_chunked",
        "_prefix",
        "_scanner",
        "_simulated",
        "_socket",
        "_suffix",
        "chat",
        "done",
        "head",
        "outcome",
        "params",
    )

    def __init__(
        self,
        socket: Any,
        chat: Chat,
        params: CompletionRequest,
        *,
        simulated: bool,
        chunked: bool = True,
    ) -> None:
        self._socket = socket
        self._chunked = chunked  # HTTP/1.1: the body is chunked, and written here chunk by chunk
        self.chat = chat
        self.params = params
        self.outcome = Outcome()
        self._scanner = StopScanner(params.stop) if params.stop else None
        self._simulated = simulated
        head = {
            "id": f"chatcmpl-{chat.id}",
            "object": "chat.completion.chunk",
            "created": int(chat.created),
            "model": params.model,
        }
        self.head = head
        # With include_usage OpenAI sends "usage": null on every chunk but the last. A token's
        # chunk is this prefix, the JSON string of its text, this suffix.
        tail = ',"usage":null' if params.include_usage else ""
        self._prefix = b"data: " + dumps(head)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        self._suffix = ('},"logprobs":null,"finish_reason":null}]' + tail + "}\n\n").encode()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def chunk(self, delta: dict[str, str], finish: str | None = None) -> bytes:
        """One ``chat.completion.chunk``, as JSON."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {**self.head, "choices": [choice]}
        if self.params.include_usage:
            body["usage"] = None
        return dumps(body)

    def _content(self, text: str) -> bytes:
        return self._prefix + dumps(text) + self._suffix

    def deliver(self, event: Event) -> None:
        if self.done.done():
            return
        if event.type == TOKEN:
            self.outcome.completion_tokens += 1
            text = event.data["text"]
            if self._scanner is None:
                self._write(self._content(text))
                return
            text, stopped = self._scanner.feed(text)
            out = self._content(text) if text else b""
            if stopped:
                self.outcome.finish_reason = "stop"
                self._write(out + self._closing())
                self.done.set_result(None)
            elif out:
                self._write(out)
        elif event.type == END:
            if event.data.get("reason") != "done":
                self.outcome.failure = (
                    "cancelled" if event.data.get("reason") == "cancelled" else "error"
                )
                self._write(self._failed())
            else:
                rest = self._scanner.flush() if self._scanner is not None else ""
                self.outcome.finish_reason = (
                    "length" if was_cut(self.chat, self._simulated) else "stop"
                )
                self._write((self._content(rest) if rest else b"") + self._closing())
            self.done.set_result(None)

    def close(self, reason: str) -> None:
        """The channel ended under the stream (bus closing): the answer is cut."""
        if not self.done.done():
            self.outcome.failure = "error"
            self._write(self._failed())
            self.done.set_result(None)

    def _closing(self) -> bytes:
        out = _data(self.chunk({}, self.outcome.finish_reason))
        if self.params.include_usage:
            usage = {**self.head, "choices": [], "usage": _usage(self.params, self.outcome)}
            out += _data(dumps(usage))
        return out + _data(b"[DONE]")

    def _failed(self) -> bytes:
        # Too late for a status: the error goes in-band, where OpenAI's clients look for it.
        _, code, message = _failure(self.outcome)
        return _data(dumps(openai_error(message, type="server_error", code=code)))

    def _write(self, payload: bytes) -> None:
        socket = self._socket
        if socket is None or socket.is_closing():
            if not self.done.done():
                self.done.set_result(None)  # the client is gone: the handler cancels the chat
            return
        # Between aiohttp's own head and end of the response, as the SSE transport writes.
        socket.write(b"%x\r\n%s\r\n" % (len(payload), payload) if self._chunked else payload)


async def _stream(
    request: web.Request, chat: Chat, params: CompletionRequest
) -> web.StreamResponse:
    # allow_all_methods: aiohttp-sse answers anything but GET with 405 by default, and OpenAI's
    # API is a POST. sep: LF, as the rest of the server frames SSE.
    async with sse_response(request, sep="\n", allow_all_methods=True) as stream:
        writer = CompletionStream(
            request.transport,
            chat,
            params,
            simulated=not request.app[SETTINGS_KEY].upstream,
            chunked=request.version >= (1, 1),
        )
        await stream.send(writer.chunk({"role": "assistant", "content": ""}).decode())
        attachment = await request.app[BUS_KEY].attach(chat.channel, None, writer)
        try:
            await writer.done
        finally:
            attachment.detach()
    return stream
