// realtime_lab/static/pane-fetch.js: the fetch pane against a fake fetch() whose responses the
// test writes byte by byte (node's own Response and ReadableStream), with the timers in hand.
import assert from "node:assert/strict";
import test from "node:test";

import { fakeRoot } from "./dom.mjs";
import { load } from "./static.mjs";

const { default: FetchPane, DRAIN_MS, STREAM_PATH } = await load("pane-fetch.js");
const { Clock } = await load("clock.js");
const { ConnectionBudget } = await load("net.js");

const encoder = new TextEncoder();
const PARAMS = { prompt: "p", seed: 3, ttft_ms: 10, token_ms: 5, max_tokens: 3 };

/** Let the pane's awaits run (fetch, reads) until nothing is left to do. */
async function settle() {
  for (let i = 0; i < 20; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

/** A fetch() that records each request; the test answers it with `respond` or `stream`. */
function fakeFetch() {
  const calls = [];
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      const call = { url, init, headers: init.headers, body: JSON.parse(init.body) };
      let controller = null;
      call.respond = (status, json, headers = {}) =>
        resolve(
          new Response(json === undefined ? null : JSON.stringify(json), {
            status,
            headers: { "Content-Type": "application/json", ...headers },
          }),
        );
      call.stream = (type = "text/event-stream; charset=utf-8") => {
        const body = new ReadableStream({ start: (c) => (controller = c) });
        resolve(new Response(body, { status: 200, headers: { "Content-Type": type } }));
      };
      call.send = (text) => controller.enqueue(encoder.encode(text));
      call.close = () => controller.close();
      call.cut = () => controller.error(new TypeError("network error"));
      init.signal.addEventListener("abort", () => {
        call.aborted = true;
        const error = new DOMException("The operation was aborted.", "AbortError");
        reject(error);
        if (controller) controller.error(error);
      });
      calls.push(call);
    });
  return { fetch, calls };
}

/** The pane on a fake page, with the timers it sets kept for the test to run. */
function setup(t, { mode = "chat", params = PARAMS, chat = { id: "shared1" } } = {}) {
  const timers = [];
  const realSetTimeout = globalThis.setTimeout;
  const realClearTimeout = globalThis.clearTimeout;
  globalThis.setTimeout = (callback, ms) => timers.push({ callback, ms, cleared: false }) - 1;
  globalThis.clearTimeout = (id) => {
    if (timers[id]) timers[id].cleared = true;
  };
  t.after(() => {
    globalThis.setTimeout = realSetTimeout;
    globalThis.clearTimeout = realClearTimeout;
  });
  const net = fakeFetch();
  const page = { now: 100, ended: [] };
  const root = fakeRoot("fetch", "Fetch");
  const budget = new ConnectionBudget();
  const pane = new FetchPane(root, {
    clock: new Clock({ now: () => page.now, origin: 1_000_000 }),
    budget,
    refresh: () => {},
    onEnded: (p) => page.ended.push(p.ended),
    fetchStats: async () => null,
    options: {},
    base: "http://127.0.0.1:8000/",
    fetch: net.fetch,
  });
  const run = { id: "page-1", mode, channel: "chat.shared1", after: "", t0: 40, params, chat };
  const pending = () => timers.filter((timer) => !timer.cleared && !timer.ran);
  /** Run the one pending timer (a retry or the drain guard); its delay. */
  const fire = async () => {
    const [timer] = pending();
    assert.ok(timer, "no timer pending");
    timer.ran = true;
    timer.callback();
    await settle();
    return timer.ms;
  };
  return { pane, page, root, budget, run, calls: net.calls, pending, fire };
}

const chatBlock = (id) =>
  `retry: 1000\nevent: chat\ndata: ${JSON.stringify({ chat: { id, channel: `chat.${id}` } })}\n\n`;
const tokenBlock = (chat, seq, text) =>
  `id: ${chat}-${seq}\ndata: ${JSON.stringify({ id: `${chat}-${seq}`, type: "token", data: { text }, ts: 1 })}\n\n`;
const endBlock = (chat, seq, reason = "done") =>
  `event: end\nid: ${chat}-${seq}\ndata: ${JSON.stringify({ id: `${chat}-${seq}`, type: "end", data: { reason } })}\n\n`;

test("one POST with the run's chat, read as SSE to the end and to the response's close", async (t) => {
  const { pane, page, root, budget, run, calls, pending, fire } = setup(t);
  pane.begin(run);
  assert.equal(calls.length, 1);
  const [call] = calls;
  assert.equal(call.url, `${STREAM_PATH}?client=page-1-fetch`);
  assert.equal(call.init.method, "POST");
  assert.deepEqual(call.body, PARAMS);
  assert.equal(call.headers["Last-Event-ID"], undefined);
  assert.equal(call.headers.Accept, "text/event-stream");
  assert.equal(call.headers["Content-Type"], "application/json");
  assert.equal(call.init.credentials, "same-origin");
  assert.deepEqual([budget.now, budget.held.fetch, pane.m.requests], [1, 1, 1]);

  call.stream();
  await settle();
  assert.equal(pane.state, "open");
  page.now = 160;
  // Cut anywhere: the chat block and a token split across writes, CRLF line ends.
  const wire = (chatBlock("c9") + tokenBlock("c9", 1, "Hel")).replaceAll("\n", "\r\n");
  call.send(wire.slice(0, 25));
  call.send(wire.slice(25, 130));
  call.send(wire.slice(130));
  await settle();
  assert.equal(pane.chatId, "c9");
  assert.equal(root.parts.note.textContent, "own chat c9: same prompt, seed and text as shared1");
  assert.match(root.parts.note.title, /same prompt and seed, so the same text/);
  assert.equal(pane.textNode.data, "Hel");
  assert.equal(pane.m.ttft, 60); // from this pane's own POST (sent at 100), not the run's t0
  assert.equal(pane.lastEventId, "c9-1");
  assert.equal(pane.retryMs, 1000);

  call.send(tokenBlock("c9", 2, "lo") + endBlock("c9", 3));
  await settle();
  assert.equal(pane.textNode.data, "Hello");
  assert.deepEqual(page.ended, ["done"]);
  assert.equal(pane.state, "closed");
  // Not aborted: the server closes after the end, and its last bytes count.
  assert.equal(call.aborted, undefined);
  assert.equal(budget.now, 1);
  assert.deepEqual(
    pending().map((timer) => timer.ms),
    [DRAIN_MS],
  );
  call.close();
  await settle();
  assert.equal(budget.now, 0);
  assert.deepEqual(pending(), []); // the drain guard was cleared
  assert.equal(calls.length, 1);
  assert.deepEqual(pane.chatsNamed, ["c9"]);
  const s = pane.summary();
  assert.deepEqual([s.tokens, s.gaps, s.duplicates, s.requests_browser], [2, 0, 0, 1]);
  void fire;
});

test("a response that does not close after the end is aborted after DRAIN_MS", async (t) => {
  const { pane, budget, run, calls, fire } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("c1") + endBlock("c1", 1));
  await settle();
  assert.equal(pane.ended, "done");
  assert.equal(await fire(), DRAIN_MS);
  assert.equal(calls[0].aborted, true);
  assert.equal(budget.now, 0);
  assert.equal(calls.length, 1); // no retry after the end
});

test("a cut stream is sent again with Last-Event-ID, and continues the same chat", async (t) => {
  const { pane, page, root, run, calls, fire } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("c2") + tokenBlock("c2", 1, "a") + tokenBlock("c2", 2, "b"));
  calls[0].send('id: c2-3\ndata: {"half'); // the next event, cut off: not delivered
  await settle();
  calls[0].cut();
  await settle();
  assert.equal(pane.state, "reconnecting");
  assert.equal(root.parts.note.textContent, "request failed; retrying in 200 ms");
  assert.equal(await fire(), 200);

  assert.equal(calls.length, 2);
  assert.equal(calls[1].headers["Last-Event-ID"], "c2-2");
  assert.deepEqual(calls[1].body, PARAMS); // the same POST
  calls[1].stream();
  await settle();
  assert.equal(root.parts.note.textContent, "reconnected (1); resumed after c2-2");
  // The resumed response names the chat again (no id), then goes on after c2-2.
  calls[1].send(chatBlock("c2"));
  await settle();
  assert.equal(pane.lastEventId, "c2-2"); // the chat event kept the position
  calls[1].send(tokenBlock("c2", 3, "c") + endBlock("c2", 4));
  calls[1].close();
  await settle();
  assert.equal(pane.textNode.data, "abc");
  assert.deepEqual(page.ended, ["done"]);
  assert.deepEqual(pane.chatsNamed, ["c2", "c2"]);
  const s = pane.summary();
  assert.deepEqual([s.gaps, s.duplicates, s.reconnects, s.failures], [0, 0, 1, 1]);
  assert.equal(pane.chatId, "c2");
});

test("a stream the server closes before the end is resumed too; the pause stops at retry:", async (t) => {
  const { pane, root, run, calls, fire } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send("retry: 300\n" + chatBlock("c3").replace("retry: 1000\n", ""));
  calls[0].send(tokenBlock("c3", 1, "a"));
  calls[0].close();
  await settle();
  assert.equal(
    root.parts.note.textContent,
    "the stream closed before the chat ended; retrying in 200 ms",
  );
  assert.equal(pane.retryMs, 300);
  const delays = [await fire()];
  for (let i = 1; i < 4; i += 1) {
    calls[i].respond(503, { error: { code: "chaos-unavailable", message: "injected" } });
    await settle();
    assert.equal(calls[i].headers["Last-Event-ID"], "c3-1");
    delays.push(await fire());
  }
  assert.deepEqual(delays, [200, 300, 300, 300]); // within the server's abort grace
});

test("a cut before the chat event has no id: the retry starts a new chat", async (t) => {
  const { pane, run, calls, fire } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send("retry: 1000\nevent: chat\n"); // its data never came
  calls[0].cut();
  await settle();
  await fire();
  assert.equal(calls[1].headers["Last-Event-ID"], undefined);
  assert.equal(pane.chatId, null);
});

test("named but no event yet: the resume starts from the chat's beginning, <id>-0", async (t) => {
  const { pane, run, calls, root } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("c4"));
  await settle();
  root.parts.cut.listeners.click(); // "cut connection"
  await settle();
  assert.equal(calls[0].aborted, true);
  assert.equal(calls[1].headers["Last-Event-ID"], "c4-0");
  assert.equal(root.parts.note.textContent, "cut; resuming after c4-0");
});

test("refusals: 401 ends the pane; 429 waits its Retry-After and sends the POST again", async (t) => {
  const first = setup(t);
  first.pane.begin(first.run);
  first.calls[0].respond(401, { error: { code: "unauthenticated", message: "sign in" } });
  await settle();
  assert.equal(first.pane.ended, "unauthenticated");
  assert.equal(first.root.parts.note.textContent, "401: sign in");
  assert.equal(first.budget.now, 0);

  const second = setup(t);
  second.pane.begin(second.run);
  second.calls[0].respond(429, { error: { code: "too-many-streams" } }, { "Retry-After": "3" });
  await settle();
  assert.equal(second.root.parts.note.textContent, "429: too many streams, retrying in 3 s");
  assert.equal(second.pane.state, "reconnecting");
  assert.equal(await second.fire(), 3000);
  assert.equal(second.calls.length, 2);
  assert.deepEqual(second.calls[1].body, PARAMS);

  const third = setup(t, { params: null, chat: { id: "alices" } });
  third.pane.begin(third.run);
  third.calls[0].respond(403, { error: { code: "forbidden", message: "not yours" } });
  await settle();
  assert.deepEqual(
    [third.pane.ended, third.root.parts.note.textContent],
    ["forbidden", "403: not yours"],
  );
});

test("a chat the page did not start is followed from its start, Last-Event-ID <id>-0", async (t) => {
  const { pane, run, calls, root } = setup(t, { params: null, chat: { id: "abc" } });
  pane.begin(run);
  assert.equal(calls[0].headers["Last-Event-ID"], "abc-0");
  assert.deepEqual(calls[0].body, {});
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("abc") + tokenBlock("abc", 1, "x"));
  await settle();
  assert.equal(
    root.parts.note.textContent,
    "chat abc, followed from its start (Last-Event-ID abc-0)",
  );
  assert.equal(pane.t0, null); // it sent no prompt: its TTFT counts from the run's start
});

test("Stop aborts the request at once and says the server cancels the chat", async (t) => {
  const { pane, root, budget, run, calls, pending } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("c5") + tokenBlock("c5", 1, "a"));
  await settle();
  pane.stop();
  assert.equal(calls[0].aborted, true);
  assert.equal(budget.now, 0); // given back when aborted, not when the read rejects
  assert.equal(
    root.parts.note.textContent,
    "stopped: request aborted, so the server cancels chat c5",
  );
  await settle();
  assert.deepEqual([calls.length, pending().length, pane.ended], [1, 0, null]);
  assert.equal(budget.now, 0);
});

test("the ticker is no chat: the pane sits it out and asks nothing", async (t) => {
  const { pane, root, run, calls } = setup(t, { mode: "ticker", params: null, chat: null });
  pane.begin({ ...run, channel: "ticker", after: "now" });
  assert.equal(calls.length, 0);
  assert.equal(pane.skipped, true);
  assert.match(root.parts.note.textContent, /^not on the ticker/);
});

test("an answer that is not an event stream ends the pane; so does a 204", async (t) => {
  const html = setup(t);
  html.pane.begin(html.run);
  html.calls[0].stream("text/html");
  await settle();
  assert.equal(html.pane.ended, "error");
  assert.equal(html.root.parts.note.textContent, "HTTP 200, not an event stream (text/html)");
  assert.equal(html.budget.now, 0);

  const empty = setup(t);
  empty.pane.begin(empty.run);
  empty.calls[0].respond(204);
  await settle();
  assert.equal(empty.pane.ended, "error");
  assert.match(empty.root.parts.note.textContent, /^204: /);
});

test("the server's error event is shown; the stream's close then resumes", async (t) => {
  const { pane, root, run, calls, fire } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("c6") + tokenBlock("c6", 1, "a"));
  calls[0].send('event: error\ndata: {"code": "overflow", "last_id": "c6-1"}\n\n');
  await settle();
  assert.equal(root.parts.note.textContent, "server: overflow, resuming after c6-1");
  calls[0].close();
  await settle();
  await fire();
  assert.equal(calls[1].headers["Last-Event-ID"], "c6-1");
});

test("a resume that names another chat is reported, and counted as a gap", async (t) => {
  const { pane, root, run, calls, fire } = setup(t);
  pane.begin(run);
  calls[0].stream();
  await settle();
  calls[0].send(chatBlock("c7") + tokenBlock("c7", 1, "a"));
  calls[0].cut();
  await settle();
  await fire();
  calls[1].stream();
  await settle();
  calls[1].send(chatBlock("zz") + tokenBlock("zz", 1, "b"));
  await settle();
  assert.deepEqual(pane.chatsNamed, ["c7", "zz"]);
  assert.equal(pane.chatId, "c7");
  assert.equal(pane.summary().gaps, 1);
  assert.equal(root.parts.note.textContent, "the server resumed chat zz, not c7");
});
