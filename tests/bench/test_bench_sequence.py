"""Both load clients against the shared continuity table (tests/protocol/sequence_cases.json).

The native client (loadclient.c) is served each case as one scripted stream - SSE with the id in
the envelope, SSE with the id only in the ``id:`` field, and WebSocket - then the server ends the
stream and the client reports its tally: ``lost`` is the rule's gaps, ``dup`` its duplicates,
``reordered`` and ``resets`` the same, and ``events`` counts the tokens it delivered (new or
foreign). The asyncio client's ``Client.items`` is fed the same cases as parsed items. Cases that
call ``forget()`` are left out: neither load client ever starts over.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from realtime_lab.bench import loadgen, native
from realtime_lab.bench.wire import Item
from realtime_lab.errors import InvalidCursor
from realtime_lab.protocol.cursor import parse_id
from realtime_lab.protocol.sse import encode_event
from realtime_lab.transports.sse import chunked

from .test_bench_native import SSE_HEAD, Scripted, run_client, trickle, ws_frame, ws_head
from .test_bench_native import pytestmark as needs_a_compiler

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "protocol" / "sequence_cases.json").read_text(encoding="utf-8")
)
STREAMED = [c for c in CASES if not any(e.get("forget") for e in c["events"])]
DELIVERED = ("new", "foreign")


def expected_events(case: dict[str, Any]) -> int:
    """Tokens a load client counts: those it delivers."""
    return sum(
        1
        for event, verdict in zip(case["events"], case["verdicts"], strict=True)
        if not event["reset"] and verdict in DELIVERED
    )


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native.build(directory=tmp_path_factory.mktemp("native")).path


def envelope(event_id: str | None, kind: str) -> str:
    body: dict[str, Any] = {"channel": "t", "type": kind, "data": {}, "ts": time.time() * 1000.0}
    if event_id is not None:
        body = {"channel": "t", "id": event_id, **body}  # the server's key order
    return json.dumps(body, separators=(",", ":"))


def sse_body(case: dict[str, Any], *, id_in_envelope: bool) -> bytes:
    out = b""
    for event in case["events"]:
        kind = "reset" if event["reset"] else "token"
        data = envelope(event["id"] if id_in_envelope else None, kind)
        # Written by hand: encode_event leaves out an empty id, and the table has one.
        block = f"event: {kind}\n" if event["reset"] else ""
        block += f"id: {event['id']}\n"
        out += chunked(block.encode() + encode_event(data))
    return out + b"0\r\n\r\n"  # then the server ends the stream: the client hangs up


def ws_body(case: dict[str, Any]) -> bytes:
    frames = b"".join(
        ws_frame(0x1, envelope(e["id"], "reset" if e["reset"] else "token").encode())
        for e in case["events"]
    )
    return frames + ws_frame(0x8, (1000).to_bytes(2, "big"))


async def run_case(binary: Path, transport: str, case: dict[str, Any]) -> dict[str, Any]:
    """Serve ``case`` to one native client; return its window tally."""
    client = "ws" if transport == "ws" else "sse"
    after = case["after"]
    path = f"/{client}/t?client=x" if after is None else f"/{client}/t?after={after}&client=x"

    async def serve(
        script: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if client == "ws":
            await script.head_then(writer, ws_head(script.request))
            body = ws_body(case)
        else:
            await script.head_then(writer, SSE_HEAD)
            body = sse_body(case, id_in_envelope=transport == "sse")
        await trickle(writer, body, list(range(1, len(body), 97)))

    opened, window, _, script = await run_client(binary, client, serve, path)
    assert opened["clients"] == 1, opened
    assert script.request.startswith(f"GET {path} HTTP/1.1\r\n".encode())
    return window


@needs_a_compiler
@pytest.mark.parametrize("transport", ["sse", "sse-id-field", "ws"])
@pytest.mark.parametrize("case", STREAMED, ids=[c["name"] for c in STREAMED])
async def test_the_native_client_follows_the_table(
    binary: Path, transport: str, case: dict[str, Any]
) -> None:
    window = await run_case(binary, transport, case)
    counts = case["counts"]
    got = {k: window[k] for k in ("lost", "dup", "reordered", "resets", "events", "disconnects")}
    assert got == {
        "lost": counts["gaps"],
        "dup": counts["duplicates"],
        "reordered": counts["reordered"],
        "resets": counts["resets"],
        "events": expected_events(case),
        "disconnects": 1,  # the scripted server ended every stream
    }


# The asyncio load client --------------------------------------------------------------------


def _seq(event_id: str) -> tuple[str | None, int]:
    """What a strict parse of the id gives the load client: (epoch, seq), seq -1 for no id."""
    try:
        cursor = parse_id(event_id)
    except InvalidCursor:
        return None, -1
    return cursor.epoch, cursor.seq


def _fits_the_asyncio_client(case: dict[str, Any]) -> bool:
    # It reads seqs only: one channel life per client, or another that a reset announces. It
    # starts without a position, or at 0 for a chat read from its start.
    if case not in STREAMED or case["after"] not in (None, "", "now", "live", "a-x", "a-0"):
        return False
    epoch = _seq(case["after"] or "")[0]
    for event in case["events"]:
        this = _seq(event["id"])[0]
        if this is not None and not event["reset"] and epoch not in (None, this):
            return False
        if this is not None and (event["reset"] or epoch is None):
            epoch = this
    return True


SEQ_CASES = [c for c in CASES if _fits_the_asyncio_client(c)]


@pytest.mark.parametrize("case", SEQ_CASES, ids=[c["name"] for c in SEQ_CASES])
async def test_the_asyncio_client_follows_the_table(case: dict[str, Any]) -> None:
    tally = loadgen.Tally()
    tally.in_window = True
    from_start = case["after"] == "a-0"
    client = loadgen.SSEClient(tally, "h", "t", "now", "x", 0.0, from_start=from_start)
    items = [
        Item("reset" if e["reset"] else None, _seq(e["id"])[1], 1.0, b"{}") for e in case["events"]
    ]
    client.items(items, now=2.0)
    counts = case["counts"]
    assert (tally.lost, tally.dup, tally.reordered, tally.resets, tally.events) == (
        counts["gaps"],
        counts["duplicates"],
        counts["reordered"],
        counts["resets"],
        expected_events(case),
    )
    assert tally.result(0.0)["reordered"] == counts["reordered"]


async def test_the_asyncio_client_counts_across_batches_and_drops_a_late_end() -> None:
    tally = loadgen.Tally()
    client = loadgen.SSEClient(tally, "h", "t", "now", "x", 0.0)
    client.items([Item(None, 1, 1.0, b""), Item(None, 4, 1.0, b"")], now=2.0)
    client.items([Item(None, 3, 1.0, b""), Item("end", 2, 1.0, b"{}")], now=2.0)
    assert (tally.lost, tally.dup, tally.reordered) == (2, 0, 2)
    assert not client.saw_end  # the end's place had passed (2 < 4): dropped like any event
    client.items([Item("end", 5, 1.0, b"{}")], now=2.0)
    assert client.saw_end
