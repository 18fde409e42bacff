// realtime_lab/static/findings.js: the explanations written from a run's numbers.
import assert from "node:assert/strict";
import test from "node:test";

import { RUN, fivePanes, fourPanes, paneSummary } from "./fixtures.mjs";
import { load } from "./static.mjs";

const { findings } = await load("findings.js");
const CONNECTIONS = { peak: 3, limit: 6, plan: { total: 5 } };

test("nothing to say before a run or before any token", () => {
  assert.equal(findings(fourPanes(), null, CONNECTIONS), null);
  const idle = fourPanes().map((s) => ({ ...s, tokens: 0 }));
  assert.equal(findings(idle, RUN, CONNECTIONS), null);
});

test("one sentence per transport, then the rankings, integrity and connections", () => {
  const items = findings(fourPanes(), RUN, CONNECTIONS);
  assert.equal(items.length, 4 + 4);
  assert.equal(
    items[0],
    "<b>Short polling</b> made 200 requests for 40 tokens (5.0 per token) at a 10 ms " +
      "interval: 900 B per token, median latency 3.2 ms. Most of its requests came back " +
      "empty: a short interval buys latency with requests.",
  );
  assert.ok(items[1].startsWith("<b>Long polling</b> made 41 requests (1.02 per token)"), items[1]);
  assert.ok(items[1].endsWith("its cost follows the event rate."), items[1]);
  assert.equal(
    items[2],
    "<b>SSE</b> kept one response open (1 request): 60 B per token, median 2.0 ms.",
  );
  assert.equal(items[3], "<b>WebSocket</b> used 1 handshake: 30 B per token, median 3.2 ms.");
  assert.equal(
    items[4],
    "Cheapest per token on the wire this run: WebSocket 30 B < SSE 60 B < Long poll 300 B < " +
      "Short poll 900 B.",
  );
  assert.ok(items[5].startsWith("Lowest p95 latency: SSE 4.0 ms, "), items[5]);
  assert.equal(items[6], "No gaps, duplicates or reordering on any pane.");
  assert.equal(
    items[7],
    "This page held at most 3 of the 6 HTTP/1.1 connections a browser allows per origin " +
      "(it never needs more than 5); the WebSocket is not counted: Chromium pools WebSockets " +
      "separately.",
  );
  const unplanned = findings(fourPanes(), RUN, { peak: 2, limit: 6 });
  assert.ok(unplanned.at(-1).startsWith("This page held at most 2 of the 6 HTTP/1.1 "));
  assert.ok(unplanned.at(-1).includes("per origin; the WebSocket"), unplanned.at(-1));
});

test("the fetch pane's sentence says it streamed a chat of its own", () => {
  const items = findings(fivePanes(), RUN, CONNECTIONS);
  assert.equal(items.length, 5 + 4);
  assert.equal(
    items[4],
    "<b>Fetch streaming</b> POSTed the prompt and read the answer from the same response " +
      "(1 request): 70 B per token, median 3.2 ms. It streamed a chat of its own, with the " +
      "same prompt and seed.",
  );
  assert.ok(items[5].includes("WebSocket 30 B < SSE 60 B < Fetch 70 B"), items[5]);
});

test("a pane that sat the run out (the fetch pane on the ticker) is left out", () => {
  const panes = fivePanes();
  panes[4] = { ...panes[4], skipped: true, tokens: 0, bytes: null, bytes_per_token: null };
  const items = findings(panes, RUN, CONNECTIONS);
  assert.equal(items.length, 4 + 4);
  assert.equal(
    items.some((item) => item.includes("Fetch")),
    false,
  );
  assert.ok(items[4].startsWith("Cheapest per token"), items[4]); // the others are all priced
  const alone = findings([panes[4]], RUN, CONNECTIONS);
  assert.equal(alone, null);
});

test("polls that collect several tokens, long polls that batch", () => {
  const panes = fourPanes();
  panes[0] = { ...panes[0], requests_server: 10 };
  panes[1] = { ...panes[1], requests_server: 20 };
  const items = findings(panes, RUN, CONNECTIONS);
  assert.ok(
    items[0].endsWith(
      "Each poll collected 4.0 tokens on average: few requests, but a token waits up to one " +
        "interval.",
    ),
    items[0],
  );
  assert.ok(
    items[1].endsWith(
      "answers carried 2.0 tokens each: batching keeps its cost down when the feed is busy.",
    ),
    items[1],
  );
});

test("integrity problems and reconnects are named", () => {
  const panes = fourPanes();
  panes[2] = { ...panes[2], gaps: 2 };
  assert.ok(findings(panes, RUN, CONNECTIONS).includes("Integrity problems: SSE (see the panes)."));
  const resumed = fourPanes().map((s) => ({ ...s, reconnects: 2 }));
  assert.ok(
    findings(resumed, RUN, CONNECTIONS).includes(
      "No gaps, duplicates or reordering on any pane, across 8 reconnects: every transport " +
        "resumed from its last event id.",
    ),
  );
});

test("a transport with no sentence of its own gets the generic one, its label escaped", () => {
  const panes = [...fourPanes(), paneSummary("wt", "WebTransport <x>", { requests_server: 2 })];
  const items = findings(panes, RUN, CONNECTIONS);
  assert.equal(
    items[4],
    "<b>WebTransport &lt;x&gt;</b> made 2 requests for 40 tokens: 100 B per token, median 3.2 ms.",
  );
  assert.ok(
    items[5].startsWith("Cheapest per token on the wire this run: WebSocket 30 B"),
    items[5],
  );
});

test("no price ranking until every pane has its bytes", () => {
  const panes = fourPanes();
  panes[3] = { ...panes[3], bytes_per_token: null };
  const items = findings(panes, RUN, CONNECTIONS);
  assert.equal(
    items.some((item) => item.startsWith("Cheapest")),
    false,
  );
  assert.ok(items[3].includes("? per token"), items[3]);
});
