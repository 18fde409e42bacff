"""CORS for the allowed origins only (``--allowed-origins``), with ``aiohttp-cors``.

Why the library: preflight answers, the per-origin match and the credentials header are what it
does, and it does them without a middleware (a preflight handler per resource and an
``on_response_prepare`` hook), which matters here: a middleware would stay on every stream's
stack. What it does not do is ``Vary: Origin``, which a cache in front needs so that one origin's
answer is not served to another: :func:`_vary` adds it.
"""

from __future__ import annotations

from typing import Final

import aiohttp_cors
from aiohttp import hdrs, web

from realtime_lab.auth import normalize_origin

#: Request headers a cross-origin page may send (the preflight answers them).
ALLOW_HEADERS: Final = ("Authorization", "Content-Type", "Last-Event-ID")
#: Response headers a cross-origin page may read.
EXPOSE_HEADERS: Final = ("Retry-After", "Location")


def setup_cors(app: web.Application, origins: list[str]) -> None:
    """Answer CORS for ``origins`` (exact match, credentials allowed) on every route but static.

    Any other origin gets no CORS headers, so the browser keeps the answer from its page.
    Call after every route is added.
    """
    allowed = [o for o in (normalize_origin(x.rstrip("/")) for x in origins) if o is not None]
    if not allowed:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=True,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        allow_methods="*",
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in allowed})
    for route in list(app.router.routes()):
        if isinstance(route.resource, web.StaticResource):
            continue
        cors.add(route)
    app.on_response_prepare.append(_vary)


async def _vary(request: web.BaseRequest, response: web.StreamResponse) -> None:
    if hdrs.ORIGIN in request.headers and "Origin" not in response.headers.get(hdrs.VARY, ""):
        response.headers.add(hdrs.VARY, "Origin")
