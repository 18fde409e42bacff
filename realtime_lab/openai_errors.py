"""Errors of the ``/v1`` (OpenAI-compatible) API, in OpenAI's shape.

Every error answer under ``/v1`` is ``{"error": {"message", "type", "param", "code"}}``, the
body OpenAI's clients read ``.message``, ``.type``, ``.param`` and ``.code`` from (``param`` and
``code`` are ``null`` when there is nothing to say). The rest of the server keeps its own
``{"error": {"code", "message"}}``; :func:`openai_error_shape` rewrites, for ``/v1`` paths only,
whatever answered there: an :class:`OpenAIProblem`, a shared helper's
:class:`~realtime_lab.transports.problems.HTTPProblem` (bad JSON, auth, limits), or aiohttp's
own 404, 405, 413 and 500.

``type`` follows the HTTP status, as the official clients pick their exception class by status:

=====  ========================  ===================================
400    ``invalid_request_error``  ``openai.BadRequestError``
401    ``authentication_error``   ``openai.AuthenticationError``
403    ``permission_error``       ``openai.PermissionDeniedError``
404    ``not_found_error``        ``openai.NotFoundError``
409    ``conflict_error``         ``openai.ConflictError``
429    ``rate_limit_error``       ``openai.RateLimitError``
5xx    ``server_error``           ``openai.InternalServerError``
=====  ========================  ===================================

(other 4xx: ``invalid_request_error``). ``code`` is the server's own error code with ``_`` for
``-`` (``invalid-json`` becomes ``invalid_json``), so logs and answers still match.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import hdrs, web

from realtime_lab.protocol.envelope import dumps
from realtime_lab.transports.keys import SETTINGS_KEY
from realtime_lab.transports.problems import HTTPProblem

#: Where the OpenAI-compatible API lives.
PREFIX: Final = "/v1"

_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (see the module docstring)."""
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def openai_error(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The error object as OpenAI sends it: the body of an answer, or an SSE ``data:`` payload."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIProblem(HTTPProblem):
    """An error answered in OpenAI's shape; raise it from a ``/v1`` handler.

    Args:
        status: the HTTP status; it also gives ``type`` unless one is passed.
        message: for humans: what was wrong and how to fix the request.
        param: the request field at fault, as a path (``messages[0].content[1].type``).
        code: a short machine-readable reason, snake_case (``model_not_found``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.type = type or error_type(status)
        super().__init__(status, code or self.type, message, headers=headers)
        self.param = param
        self.text = dumps(openai_error(message, type=self.type, param=param, code=code)).decode()


def _snake(code: str) -> str:
    return code.replace("-", "_")


def _describe(request: web.BaseRequest, response: web.Response) -> tuple[str, str | None]:
    """``(message, code)`` for an error answer that was not made in OpenAI's shape."""
    if isinstance(response, HTTPProblem):
        return response.message, _snake(response.code)
    status = response.status
    if status == 404:
        return (
            f"no such endpoint: {request.method} {request.path} (this server's OpenAI-compatible"
            " API serves POST /v1/chat/completions, GET /v1/models and GET /v1/models/{model})",
            "unknown_url",
        )
    if status == 405:
        allowed = getattr(response, "allowed_methods", None) or response.headers.get(
            hdrs.ALLOW, ""
        ).split(",")
        return (
            f"{request.method} is not allowed on {request.path}; use "
            + " or ".join(sorted(m.strip() for m in allowed if m.strip())),
            "method_not_allowed",
        )
    if status == 413:
        limit = request.app[SETTINGS_KEY].max_body if isinstance(request, web.Request) else None
        return (
            "the request body is too large"
            + (f": this server accepts at most {limit} bytes" if limit else ""),
            "body_too_large",
        )
    if status >= 500:
        return "the server failed to answer this request; try again", "internal_error"
    return response.reason or f"HTTP {status}", None


async def openai_error_shape(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: answer every ``/v1`` error in OpenAI's shape.

    Register it once on the application (:func:`realtime_lab.openai_api.setup` does). Whether
    it runs before or after :func:`~realtime_lab.transports.problems.json_errors` does not
    matter: it writes the whole body, from the response's status and, for an ``HTTPProblem``,
    its message and code. Headers (``Retry-After``, ``Allow``) are kept.
    """
    path = request.path
    if (
        response.status < 400
        or not (path == PREFIX or path.startswith(PREFIX + "/"))
        or isinstance(response, OpenAIProblem)
        # A stream that is already under way reports its errors in-band (see openai_api).
        or not isinstance(response, web.Response)
    ):
        return
    message, code = _describe(request, response)
    param = response.extra.get("param") if isinstance(response, HTTPProblem) else None
    body = dumps(openai_error(message, type=error_type(response.status), param=param, code=code))
    response.body = body
    response.content_type = "application/json"
    response.headers[hdrs.CONTENT_LENGTH] = str(len(body))  # set already, for the old body
