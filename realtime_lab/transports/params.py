"""The one validator of numeric parameters, for query strings and JSON bodies alike."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from realtime_lab.protocol.envelope import dumps
from realtime_lab.transports.problems import HTTPProblem

_MISSING: Any = object()


def number(
    value: object,
    name: str,
    low: float,
    high: float,
    *,
    default: float = _MISSING,
    integer: bool = False,
    above_low: bool = False,
    text: bool = False,
) -> float:
    """``value`` (a JSON number, or with ``text`` a query parameter's text) checked against a range.

    ``None`` (and ``""`` for text) stand for "not given": ``default`` when there is one, else an
    error. A JSON string is not a number. With ``above_low`` the range is ``(low, high]``.

    Raises:
        HTTPProblem: 400 ``invalid-parameter`` naming the parameter and the range.
    """
    kind = "an integer" if integer else "a number"
    span = (
        f"more than {low:g} and at most {high:g}" if above_low else f"between {low:g} and {high:g}"
    )
    if value is None or (text and value == ""):
        if default is _MISSING:
            raise HTTPProblem(400, "invalid-parameter", f"{name} is required: {kind} {span}")
        return default
    if text and isinstance(value, str):
        try:
            parsed: float = float(int(value)) if integer else float(value)
        except ValueError as exc:
            raise HTTPProblem(400, "invalid-parameter", f"{name} must be {kind} {span}") from exc
    elif isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        # bool is an int subclass, and true is not a number.
        raise HTTPProblem(400, "invalid-parameter", f"{name} must be {kind} {span}")
    else:
        parsed = float(value)
    # NaN fails every comparison, and so the range check too.
    if not low <= parsed <= high or (above_low and parsed == low):
        raise HTTPProblem(400, "invalid-parameter", f"{name} must be {kind} {span}")
    return parsed


def field(
    source: Mapping[str, Any], name: str, default: float, low: float, high: float, **how: bool
) -> float:
    """``source[name]`` checked by :func:`number` (``how``: ``integer``, ``text``); ``default``
    when absent. ``source`` is a JSON body, or with ``text=True`` a request's query."""
    return number(source.get(name), name, low, high, default=default, **how)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body.

    Raises:
        HTTPProblem: 415 when not ``application/json``, 400 when not a JSON object; aiohttp's
            own 413 when larger than ``max_body``.
    """
    if request.content_type != "application/json":
        raise HTTPProblem(415, "unsupported-media-type", "send Content-Type: application/json")
    raw = await request.read()
    try:
        value = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        raise HTTPProblem(400, "invalid-json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HTTPProblem(400, "invalid-json", "body must be a JSON object")
    try:
        dumps(value)  # NaN, Infinity and lone surrogates parse but could never be sent on
    except (ValueError, UnicodeEncodeError) as exc:
        raise HTTPProblem(400, "invalid-json", f"body is not strict JSON: {exc}") from exc
    return value
