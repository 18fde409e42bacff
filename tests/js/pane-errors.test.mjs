// realtime_lab/static/pane-errors.js: what a pane does about a failure.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const {
  HttpError,
  RETRY_AFTER_DEFAULT_S,
  diagnose,
  judge,
  needsProbe,
  problemFrom,
  retryAfter,
  wsCloseProblem,
} = await load("pane-errors.js");

/** A fetch() response as far as pane-errors.js reads it. */
function response(status, body = null, headers = {}) {
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
  return {
    status,
    ok: status >= 200 && status < 300,
    headers: { get: (name) => lower[name.toLowerCase()] ?? null },
    json: async () => (body === null ? JSON.parse("<") : body),
  };
}

test("a 4xx answer gives up, with the server's message", () => {
  assert.deepEqual(judge({ status: 404, error: { code: "unknown_channel", message: "no such" } }), {
    action: "give-up",
    end: "error",
    text: "404 no such",
  });
  assert.deepEqual(judge({ status: 400 }), { action: "give-up", end: "error", text: "400 " });
});

test("401 says sign in, 403 says not yours; a telling code is named", () => {
  const unauthenticated = { code: "unauthenticated", message: "sign in: send ..." };
  assert.deepEqual(judge({ status: 401, error: unauthenticated }), {
    action: "give-up",
    end: "unauthenticated",
    text: "401: sign in",
  });
  const line = (status, code) => judge({ status, error: code ? { code } : null }).text;
  assert.equal(line(401), "401: sign in");
  assert.equal(line(401, "token-expired"), "401: sign in (token-expired)");
  assert.deepEqual(judge({ status: 403, error: { code: "forbidden", message: "another's" } }), {
    action: "give-up",
    end: "forbidden",
    text: "403: not yours",
  });
  assert.equal(line(403, "origin-not-allowed"), "403: origin not allowed");
  assert.equal(line(403), "403: refused");
  assert.equal(line(403, "reserved-channel"), "403: refused (reserved-channel)");
});

test("429 waits out Retry-After (or the server's default), and says how long", () => {
  assert.deepEqual(judge({ status: 429, error: { code: "too-many-streams" }, retryAfterS: 7 }), {
    action: "retry",
    text: "429: too many streams, retrying in 7 s",
    delayMs: 7000,
  });
  const bare = judge({ status: 429 });
  assert.equal(bare.delayMs, RETRY_AFTER_DEFAULT_S * 1000);
  assert.equal(bare.text, `429: too many streams, retrying in ${RETRY_AFTER_DEFAULT_S} s`);
});

test("a 5xx answer, a network failure or a closed socket is retried after the pane's pause", () => {
  const retry = (text) => ({ action: "retry", text, delayMs: null });
  assert.deepEqual(judge({ status: 503 }), retry("HTTP 503"));
  assert.deepEqual(judge({ why: "request failed" }), retry("request failed"));
  assert.deepEqual(judge({ why: "closed (1006)" }), retry("closed (1006)"));
  assert.deepEqual(judge({}), retry("request failed"));
});

test("problemFrom: an HttpError keeps its status, error and Retry-After", async () => {
  const err = await HttpError.from(
    response(429, { error: { code: "slow", message: "down" } }, { "Retry-After": "5" }),
  );
  assert.equal(err.message, "HTTP 429");
  assert.deepEqual(problemFrom(err), {
    status: 429,
    error: { code: "slow", message: "down" },
    retryAfterS: 5,
  });
  const bare = await HttpError.from(response(500));
  assert.deepEqual(problemFrom(bare), { status: 500, error: null, retryAfterS: null });
  assert.deepEqual(problemFrom(new TypeError("Failed to fetch")), { why: "request failed" });
});

test("Retry-After: whole seconds only, capped", () => {
  assert.equal(retryAfter(response(429, null, { "Retry-After": " 12 " })), 12);
  assert.equal(retryAfter(response(429, null, { "Retry-After": "99999" })), 300);
  assert.equal(retryAfter(response(429, null, { "Retry-After": "Wed, 21 Oct 2015" })), null);
  assert.equal(retryAfter(response(429)), null);
  assert.equal(retryAfter({}), null);
});

test("a WebSocket close: 1013 over the cap is a 429; a bare 1006 before open asks a probe", () => {
  const probe = "http://h/poll/c?limit=1";
  const close = (code, reason, opened) => wsCloseProblem({ code, reason }, { opened, probe });
  const capped = close(1013, "at most 3 open streams", true);
  assert.equal(capped.status, 429);
  assert.equal(judge(capped).text, "429: too many streams, retrying in 5 s");
  // An overflow is ours to resume at once, not a refusal.
  assert.deepEqual(close(1013, "overflow: resume after e1-4", true), {
    why: "closed (1013 overflow: resume after e1-4)",
  });
  assert.deepEqual(close(1006, "", false), { why: "closed (1006)", probe });
  // Open, then cut: a network failure, nothing to ask.
  assert.deepEqual(close(1006, undefined, true), { why: "closed (1006)" });
});

test("diagnose: the probe's status, error and Retry-After replace the hidden ones", async () => {
  const calls = [];
  const budget = {
    now: 0,
    take() {
      this.now += 1;
    },
    give() {
      this.now -= 1;
    },
  };
  const fetch = async (url, init) => {
    calls.push({ url, init, held: budget.now });
    return response(401, { error: { code: "unauthenticated", message: "sign in" } });
  };
  const problem = { why: "the stream failed", probe: "/sse/chat.x?after=e1-3" };
  assert.equal(needsProbe(problem), true);
  const known = await diagnose(problem, { fetch, budget });
  assert.deepEqual(known, {
    why: "the stream failed",
    probe: "/sse/chat.x?after=e1-3",
    status: 401,
    error: { code: "unauthenticated", message: "sign in" },
    retryAfterS: null,
  });
  assert.equal(calls[0].url, "/sse/chat.x?after=e1-3");
  assert.equal(calls[0].init.method, "GET");
  assert.equal(calls[0].init.credentials, "same-origin");
  assert.equal(calls[0].held, 1);
  assert.equal(budget.now, 0);
  assert.equal(calls[0].init.signal.aborted, true); // never left open (a 200 would be a stream)

  const over = await diagnose(problem, {
    fetch: async () =>
      response(429, { error: { code: "too-many-streams" } }, { "retry-after": "2" }),
  });
  assert.deepEqual(judge(over), {
    action: "retry",
    text: "429: too many streams, retrying in 2 s",
    delayMs: 2000,
  });
});

test("diagnose: a probe that would open, fails or hangs leaves a problem to retry", async () => {
  const problem = { why: "closed (1006)", probe: "/poll/c" };
  assert.deepEqual(await diagnose(problem, { fetch: async () => response(200, {}) }), problem);
  const down = async () => {
    throw new TypeError("Failed to fetch");
  };
  assert.deepEqual(await diagnose(problem, { fetch: down }), problem);
  const hang = (url, init) =>
    new Promise((_, reject) => init.signal.addEventListener("abort", () => reject(new Error("x"))));
  assert.deepEqual(await diagnose(problem, { fetch: hang, timeoutMs: 5 }), problem);
  // Nothing to ask: no probe, or the status is known already.
  const never = async () => assert.fail("no probe expected");
  assert.deepEqual(await diagnose({ why: "x" }, { fetch: never }), { why: "x" });
  assert.equal(needsProbe({ status: 404, probe: "/x" }), false);
});

test("diagnose with the page's queue: the probe waits its turn and counts as the queue's", async () => {
  const { ConnectionBudget, QUEUE, SideQueue } = await load("net.js");
  const budget = new ConnectionBudget();
  const queue = new SideQueue();
  let release;
  const busy = queue.run(() => new Promise((resolve) => (release = resolve)));
  const seen = [];
  const fetch = async (url) => {
    seen.push({ url, held: { ...budget.held } });
    return response(403, { error: { code: "forbidden" } });
  };
  const asked = diagnose({ why: "closed (1006)", probe: "/poll/c" }, { fetch, budget, queue });
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(seen, []); // behind the queue's running task
  release();
  await busy;
  assert.equal((await asked).status, 403);
  assert.deepEqual(seen, [{ url: "/poll/c", held: { [QUEUE]: 1 } }]);
  assert.equal(budget.now, 0);
  assert.equal(budget.peaks[QUEUE], 1);
  // Without a queue it is a connection of its own, a "probe".
  await diagnose({ why: "x", probe: "/poll/c" }, { fetch, budget });
  assert.equal(budget.peaks.probe, 1);
});
