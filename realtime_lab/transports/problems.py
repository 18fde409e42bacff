"""Error answers: the one JSON shape every endpoint uses, and the log line for each."""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import hdrs, web

from realtime_lab.auth import redact
from realtime_lab.errors import BusError, LimitReached
from realtime_lab.protocol.envelope import dumps

log = logging.getLogger("realtime_lab.server")


class HTTPProblem(web.HTTPException):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status.

    Raise it from a handler: aiohttp answers with it as it answers any ``HTTPException``, and
    :func:`json_errors` logs it. (Errors are answered without a middleware on purpose: a
    middleware keeps a frame alive for the whole life of every SSE and WebSocket connection.)
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.status_code = status
        super().__init__(
            headers=headers,
            body=None,
            text=dumps(error_body(code, message, **extra)).decode(),
            content_type="application/json",
        )
        self.code = code
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message


def limit_problem(exc: LimitReached) -> HTTPProblem:
    """The HTTP answer to a bound that was reached (429 with ``Retry-After``, 413, 507), or to
    a bus backend that does not answer (503 with ``Retry-After``)."""
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(int(exc.retry_after + 0.999), 1))}
    return HTTPProblem(exc.status, exc.code, str(exc), headers=headers)


def bus_problem(exc: BusError | LimitReached) -> HTTPProblem:
    """The HTTP answer to a bus failure or refusal: :func:`limit_problem`'s, else a 503."""
    if isinstance(exc, LimitReached):
        return limit_problem(exc)
    return HTTPProblem(503, "bus-unavailable", str(exc))


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error shape every endpoint uses."""
    return {"error": {"code": code, "message": message, **extra}}


def json_response(value: Any, status: int = 200, **headers: str) -> web.Response:
    """A compact UTF-8 JSON response."""
    return web.Response(
        body=dumps(value), status=status, content_type="application/json", headers=headers
    )


_AIOHTTP_CODES: Final = {
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
}


async def json_errors(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: log every error answer; give aiohttp's own a JSON body too.

    aiohttp answers unknown paths (404), wrong methods (405), oversized bodies (413) and crashes
    (500) with plain text; they get the same ``{"error": {...}}`` shape as ours.
    """
    if response.status < 400:
        return
    if isinstance(response, HTTPProblem):
        log.warning(
            "%s %s -> %d %s: %s",
            request.method,
            redact(request.path_qs),  # never a ticket or token in the log
            response.status,
            response.code,
            response.message,
        )
        return
    path = redact(request.path_qs)
    log.warning("%s %s -> %d %s", request.method, path, response.status, response.reason)
    if isinstance(response, web.Response) and response.content_type == "text/plain":
        code = _AIOHTTP_CODES.get(response.status, "http-error")
        body = dumps(error_body(code, response.text or response.reason))
        response.body = body
        response.content_type = "application/json"
        response.headers[hdrs.CONTENT_LENGTH] = str(len(body))  # set already, for the text
