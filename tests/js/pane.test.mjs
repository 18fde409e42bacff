// realtime_lab/static/pane.js: what every transport pane shares, driven with a stand-in DOM
// and a transport that only records what the pane asks of it.
import assert from "node:assert/strict";
import test from "node:test";

import { fakeRoot } from "./dom.mjs";
import { load } from "./static.mjs";

const { Pane } = await load("pane.js");
const { Clock } = await load("clock.js");
const { ConnectionBudget } = await load("net.js");

class RecordingPane extends Pane {
  constructor(root, deps) {
    super(root, deps);
    this.opens = [];
    this.shuts = [];
  }
  open(after) {
    this.opens.push(after);
  }
  shut(code, reason) {
    this.shuts.push([code, reason]);
  }
}

/** A pane on a fake page, and what it reported to the page. */
function setup({ after = "", mode = "chat", fetch = undefined } = {}) {
  const page = { now: 100, refreshes: 0, ended: [], stats: null };
  const clock = new Clock({ now: () => page.now, origin: 1_000_000 });
  clock.add(0, 0, 5); // server clock 5 ms ahead
  const root = fakeRoot();
  const pane = new RecordingPane(root, {
    clock,
    budget: new ConnectionBudget(),
    refresh: () => (page.refreshes += 1),
    onEnded: (p) => page.ended.push(p.ended),
    fetchStats: async (client) => {
      page.statsFor = client;
      return page.stats;
    },
    options: { pollIntervalMs: () => 250, longpollTimeoutS: () => 25 },
    base: "http://127.0.0.1:8000/",
    fetch,
  });
  const run = { id: "page-1", mode, channel: "chat-1", after, t0: 40 };
  pane.begin(run);
  return { pane, page, root, run };
}

const token = (seq, text, ts = undefined) => ({
  id: `e1-${seq}`,
  type: "token",
  data: { text },
  ts,
});

test("begin opens from the run's position, tagged with the run and transport", () => {
  const { pane, root } = setup();
  assert.deepEqual(pane.opens, [""]);
  assert.equal(pane.tag, "page-1-test");
  assert.equal(pane.state, "connecting");
  assert.equal(root.dataset.state, "connecting");
  assert.equal(root.parts.cut.disabled, false);
  assert.equal(pane.query("e1-4", { timeout: "25" }), "client=page-1-test&timeout=25&after=e1-4");
  assert.equal(pane.query(""), "client=page-1-test");
});

test("tokens in order are shown once, timed against the server clock", () => {
  const { pane, page } = setup();
  pane.opened();
  page.now = 190;
  pane.handle(token(1, "Hel", 1_000_150), 1_000_180); // received at server time 1_000_185
  pane.frame(JSON.stringify(token(2, "lo")));
  assert.equal(pane.textNode.data, "Hello");
  assert.equal(pane.m.tokens, 2);
  assert.equal(pane.m.ttft, 150); // now - run.t0
  assert.deepEqual(pane.m.latencies, [35]);
  assert.deepEqual(pane.m.latencyPoints, [[0.15, 35]]);
  assert.equal(pane.lastId, "e1-2");
  assert.equal(pane.resumeFrom(), "e1-2");
  const s = pane.summary();
  assert.deepEqual([s.gaps, s.duplicates, s.out_of_order, s.resets], [0, 0, 0, 0]);
  assert.equal(s.label, "Test");
});

test("a duplicate is dropped and counted; a late id that fills a gap counts as reordered", () => {
  const { pane } = setup();
  pane.handle(token(1, "a"), 0);
  pane.handle(token(1, "a"), 0);
  pane.handle(token(4, "d"), 0);
  pane.handle(token(2, "b"), 0);
  pane.handle(token(2, "b"), 0); // its gap is filled now: a duplicate
  assert.equal(pane.textNode.data, "ad");
  assert.equal(pane.lastId, "e1-4");
  const s = pane.summary();
  assert.deepEqual([s.gaps, s.duplicates, s.out_of_order], [2, 2, 1]);
  pane.render(s);
  assert.equal(pane.metricEls.integrity.textContent, "2\u2009/\u20092\u2009/\u20091");
  assert.equal(pane.metricEls.integrity.bad, true);
  assert.equal(pane.metricEls.tokens.textContent, "2");
});

test("a reset re-bases the count and says so", () => {
  const { pane, root } = setup();
  pane.handle(token(1, "a"), 0);
  pane.handle({ id: "e1-9", type: "reset", data: { reason: "trimmed", oldest: "e1-5" } }, 0);
  pane.handle(token(10, "b"), 0);
  assert.equal(pane.textNode.data, "ab");
  assert.equal(pane.lastId, "e1-10");
  assert.match(
    root.parts.note.textContent,
    /^reset \(trimmed\): events may be missing before e1-5/,
  );
  const s = pane.summary();
  assert.deepEqual([s.gaps, s.resets], [0, 1]);
});

test("a message without an event id is shown, not counted", () => {
  const { pane, root } = setup();
  pane.handle({ type: "error", data: { code: "bad_after", message: "no such id" } }, 0);
  assert.equal(root.parts.note.textContent, "server: bad_after no such id");
  pane.frame("not json");
  assert.equal(root.parts.note.textContent, "a message that is not JSON was ignored");
  assert.equal(pane.m.tokens, 0);
  assert.equal(pane.lastId, null);
});

test("the end event finishes the pane and tells the page", () => {
  const { pane, page, root } = setup();
  pane.handle(token(1, "a"), 0);
  pane.handle({ id: "e1-2", type: "end", data: { reason: "done" } }, 0);
  assert.equal(pane.ended, "done");
  assert.equal(pane.active, false);
  assert.equal(pane.state, "closed");
  assert.equal(root.dataset.end, "done");
  assert.deepEqual(page.ended, ["done"]);
  assert.equal(pane.shuts.length, 1);
  pane.handle(token(3, "late"), 0); // nothing after the end
  assert.equal(pane.textNode.data, "a");
});

test("a refused request (4xx) ends the pane, and its line stays", () => {
  const { pane, page, root } = setup();
  pane.failed({ status: 404, error: { message: "no such channel" } });
  assert.equal(pane.ended, "error");
  assert.deepEqual(page.ended, ["error"]);
  assert.equal(root.parts.note.textContent, "404 no such channel"); // not "ended: error"
  assert.equal(root.dataset.end, "error");
});

test("401 and 403 end the pane with what to do next", () => {
  const first = setup();
  first.pane.failed({ status: 401, error: { code: "unauthenticated", message: "sign in: ..." } });
  assert.equal(first.pane.ended, "unauthenticated");
  assert.equal(first.root.parts.note.textContent, "401: sign in");
  assert.equal(first.pane.state, "closed");
  assert.equal(first.pane.summary().end, "unauthenticated");
  const second = setup();
  second.pane.failed({ status: 403, error: { code: "forbidden", message: "another user's" } });
  assert.deepEqual(second.page.ended, ["forbidden"]);
  assert.equal(second.root.parts.note.textContent, "403: not yours");
});

test("a 429 waits its Retry-After, says so, and resumes from the last id", (t) => {
  const timers = [];
  const realSetTimeout = globalThis.setTimeout;
  globalThis.setTimeout = (callback, ms) => timers.push({ callback, ms });
  t.after(() => (globalThis.setTimeout = realSetTimeout));

  const { pane, root } = setup();
  pane.opened();
  pane.handle(token(1, "a"), 0);
  pane.failed({ status: 429, error: { code: "too-many-streams" }, retryAfterS: 3 });
  assert.equal(pane.state, "reconnecting");
  assert.equal(root.parts.note.textContent, "429: too many streams, retrying in 3 s");
  assert.deepEqual(
    timers.map((timer) => timer.ms),
    [3000],
  );
  assert.equal(pane.ended, null);
  timers[0].callback();
  assert.deepEqual(pane.opens, ["", "e1-1"]);
  pane.opened();
  assert.equal(pane.m.reconnects, 1);
  assert.equal(pane.backoffMs, 0);
});

/** A fetch() whose answers the test releases one by one. */
function heldFetch() {
  const calls = [];
  const fetch = (url, init) =>
    new Promise((resolve) => calls.push({ url, init, answer: resolve }));
  const answer = async (i, status, body) => {
    calls[i].answer({
      status,
      ok: status >= 200 && status < 300,
      headers: { get: () => null },
      json: async () => body,
    });
    for (let n = 0; n < 5; n += 1) await new Promise((resolve) => setImmediate(resolve));
  };
  return { fetch, calls, answer };
}

test("a stream refused out of sight: the pane asks its probe URL, then says why", async () => {
  const held = heldFetch();
  const { pane, page, root } = setup({ fetch: held.fetch });
  pane.failed({ why: "the stream failed", probe: "/sse/chat-1?after=e1-2" });
  assert.equal(root.parts.note.textContent, "the stream failed; asking the server why…");
  assert.equal(pane.state, "reconnecting");
  assert.equal(held.calls[0].url, "/sse/chat-1?after=e1-2");
  assert.equal(pane.deps.budget.now, 1); // the probe holds a connection while it asks
  await held.answer(0, 403, { error: { code: "forbidden", message: "another user's chat" } });
  assert.equal(pane.ended, "forbidden");
  assert.deepEqual(page.ended, ["forbidden"]);
  assert.equal(root.parts.note.textContent, "403: not yours");
  assert.equal(pane.deps.budget.now, 0);
});

test("a probe's answer is dropped when the pane was stopped or cut meanwhile", async () => {
  const held = heldFetch();
  const stopped = setup({ fetch: held.fetch });
  stopped.pane.failed({ why: "closed (1006)", probe: "http://h/poll/chat-1?limit=1" });
  stopped.pane.stop();
  await held.answer(0, 401, { error: { code: "unauthenticated" } });
  assert.equal(stopped.pane.ended, null);
  assert.equal(stopped.root.parts.note.textContent, "stopped");

  const cut = setup({ fetch: held.fetch });
  cut.pane.opened();
  cut.pane.failed({ why: "closed (1006)", probe: "http://h/poll/chat-1?limit=1" });
  cut.root.parts.cut.listeners.click();
  await held.answer(1, 401, { error: { code: "unauthenticated" } });
  assert.equal(cut.pane.ended, null);
  assert.deepEqual(cut.pane.opens, ["", ""]);
});

test("the query leaves the client tag out of a probe", () => {
  const { pane } = setup();
  assert.equal(pane.query("e1-4", { limit: "1" }, false), "limit=1&after=e1-4");
});

test("a failure is retried from the last id after a growing pause: a reconnect", (t) => {
  const timers = [];
  const realSetTimeout = globalThis.setTimeout;
  globalThis.setTimeout = (callback, ms) => timers.push({ callback, ms });
  t.after(() => (globalThis.setTimeout = realSetTimeout));

  const { pane, root } = setup();
  pane.opened();
  pane.handle(token(1, "a"), 0);
  pane.failed({ status: 503 });
  assert.equal(pane.state, "reconnecting");
  assert.equal(root.parts.note.textContent, "HTTP 503; retrying in 200 ms");
  pane.failed({ why: "request failed" });
  assert.deepEqual(
    timers.map((timer) => timer.ms),
    [200, 400],
  );
  timers[1].callback();
  assert.deepEqual(pane.opens, ["", "e1-1"]);
  pane.opened();
  assert.equal(pane.m.failures, 2);
  assert.equal(pane.m.reconnects, 1);
  assert.equal(root.parts.note.textContent, "reconnected (1); resumed after e1-1");

  pane.stop();
  timers[0].callback(); // a retry from before the stop: ignored
  assert.deepEqual(pane.opens, ["", "e1-1"]);
  assert.equal(root.parts.note.textContent, "stopped");
});

test("cut drops the connection and opens again from the last id", () => {
  const { pane, root } = setup();
  pane.opened();
  pane.handle(token(1, "a"), 0);
  const gen = pane.gen;
  root.parts.cut.listeners.click();
  assert.equal(pane.gen, gen + 1);
  assert.deepEqual(pane.shuts.at(-1), [4000, "cut by the dashboard"]);
  assert.deepEqual(pane.opens, ["", "e1-1"]);
  assert.equal(root.parts.note.textContent, "cut; resuming after e1-1");
  pane.opened();
  assert.equal(pane.m.reconnects, 1);
});

test("the server's figures for this pane's client, as they come", async () => {
  const { pane, page } = setup();
  page.stats = { bytes: 1234, requests: 3 };
  page.now = 1040;
  await pane.refreshStats();
  assert.equal(page.statsFor, "page-1-test");
  assert.deepEqual(pane.m.bytesPoints, [
    [0, 0],
    [1, 1234],
  ]);
  pane.handle(token(1, "a"), 0);
  const s = pane.summary();
  assert.deepEqual([s.bytes, s.requests_server, s.bytes_per_token], [1234, 3, 1234]);
  page.stats = null;
  await pane.refreshStats();
  assert.equal(pane.m.bytesPoints.length, 2);
});

test("the ticker keeps only the end of its text", () => {
  const { pane } = setup({ after: "now", mode: "ticker" });
  pane.handle(token(7, "x".repeat(5000)), 0);
  pane.handle(token(8, "y".repeat(2000)), 0);
  assert.equal(pane.textNode.length, 3000);
  assert.ok(pane.textNode.data.endsWith("y".repeat(2000)));
  assert.equal(pane.summary().gaps, 0); // a live start: the first id opens the run
});

test("a pane that cannot stream a run sits it out: skipped, closed, saying why", () => {
  class ChatOnly extends RecordingPane {
    unsupported(run) {
      return run.mode === "chat" ? null : "chats only";
    }
  }
  const page = { ended: [] };
  const root = fakeRoot();
  const pane = new ChatOnly(root, {
    clock: new Clock({ now: () => 0, origin: 0 }),
    budget: new ConnectionBudget(),
    refresh: () => {},
    onEnded: (p) => page.ended.push(p.ended),
  });
  pane.begin({ id: "page-2", mode: "ticker", channel: "ticker", after: "now", t0: 0 });
  assert.deepEqual(pane.opens, []);
  assert.deepEqual([pane.skipped, pane.active, pane.state], [true, false, "closed"]);
  assert.equal(root.parts.note.textContent, "chats only");
  assert.equal(root.parts.cut.disabled, true);
  assert.deepEqual([pane.summary().state, pane.summary().skipped], ["skipped", true]);
  pane.stop(); // nothing to stop, nothing said
  assert.equal(root.parts.note.textContent, "chats only");
  assert.deepEqual(page.ended, []);
  pane.begin({ id: "page-3", mode: "chat", channel: "chat-1", after: "", t0: 0 });
  assert.deepEqual([pane.skipped, pane.active, pane.opens], [false, true, [""]]);
  assert.equal(pane.summary().state, "connecting");
});

test("the growing pause stops at maxBackoffMs()", (t) => {
  const timers = [];
  const realSetTimeout = globalThis.setTimeout;
  globalThis.setTimeout = (callback, ms) => timers.push(ms);
  t.after(() => (globalThis.setTimeout = realSetTimeout));
  const { pane } = setup();
  pane.maxBackoffMs = () => 700;
  for (let i = 0; i < 4; i += 1) pane.failed({ why: "request failed" });
  assert.deepEqual(timers, [200, 400, 700, 700]);
});

test("time to first token counts from the pane's own t0 when it sent the prompt itself", () => {
  const { pane, page } = setup();
  pane.t0 = 70; // its own POST left at 70; the run's t0 is 40
  page.now = 190;
  pane.handle(token(1, "a"), 0);
  assert.equal(pane.m.ttft, 120);
  pane.begin({ id: "page-2", mode: "chat", channel: "chat-1", after: "", t0: 40 });
  assert.equal(pane.t0, null); // a new run forgets it
});
