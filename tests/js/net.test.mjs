// realtime_lab/static/net.js: the side queue, the connection budget, the JSON API client.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const net = await load("net.js");
const { ConnectionBudget, SideQueue, connectionPlan, createApi, errorText } = net;
const { Clock } = await load("clock.js");

test("the side queue runs one task at a time, in order, past failures", async () => {
  const queue = new SideQueue();
  const log = [];
  let release;
  const first = queue.run(
    () =>
      new Promise((resolve) => {
        log.push("first starts");
        release = resolve;
      }),
  );
  const second = queue.run(async () => {
    log.push("second starts");
    throw new Error("boom");
  });
  const third = queue.run(async () => log.push("third starts"));
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(log, ["first starts"]);
  release();
  await first;
  await assert.rejects(second, /boom/);
  await third;
  assert.deepEqual(log, ["first starts", "second starts", "third starts"]);
});

test("the budget counts connections and keeps the peak", () => {
  let changes = 0;
  const budget = new ConnectionBudget(() => (changes += 1));
  budget.take();
  budget.take();
  budget.give();
  budget.give();
  budget.give(); // never below zero
  assert.deepEqual([budget.now, budget.peak, budget.limit, changes], [0, 2, 6, 5]);
  assert.deepEqual(budget.peaks, { page: 2 }); // no holder named: the page's
});

test("api: JSON in and out, one connection held while it runs", async () => {
  const budget = new ConnectionBudget();
  const seen = [];
  const fetch = async (path, init) => {
    seen.push({ path, init, held: budget.now });
    return { ok: false, status: 409, text: async () => '{"error": {"code": "c", "message": "m"}}' };
  };
  const api = createApi({ budget, clock: new Clock({ now: () => 3, origin: 10 }), fetch });
  const res = await api("POST", "/api/x", { a: 1 });
  assert.deepEqual(res, {
    ok: false,
    status: 409,
    json: { error: { code: "c", message: "m" } },
    sent: 3,
    t0: 13,
    t1: 13,
  });
  assert.equal(seen[0].held, 1);
  assert.equal(seen[0].init.body, '{"a":1}');
  assert.equal(seen[0].init.headers["Content-Type"], "application/json");
  assert.equal(budget.now, 0);
  assert.equal(errorText(res), "409 c: m");
});

test("api: a body that is not JSON is null; an unreachable server rejects", async () => {
  const budget = new ConnectionBudget();
  const clock = new Clock({ now: () => 0, origin: 0 });
  const text = createApi({
    budget,
    clock,
    fetch: async () => ({ ok: true, status: 200, text: async () => "<html>" }),
  });
  assert.equal((await text("GET", "/x")).json, null);
  const down = createApi({
    budget,
    clock,
    fetch: async () => {
      throw new TypeError("Failed to fetch");
    },
  });
  await assert.rejects(down("GET", "/x"), TypeError);
  assert.equal(budget.now, 0);
  assert.equal(errorText({ status: 502, json: null }), "HTTP 502");
  assert.equal(errorText(undefined), "HTTP ?");
});

test("api: the page's cookie on every call, and headers of the caller's own", async () => {
  const seen = [];
  const fetch = async (path, init) => {
    seen.push(init);
    return { ok: true, status: 200, text: async () => "{}" };
  };
  const api = createApi({
    budget: new ConnectionBudget(),
    clock: new Clock({ now: () => 0, origin: 0 }),
    fetch,
  });
  const headers = { Authorization: "Bearer t" };
  await api("POST", "/api/session", undefined, headers);
  await api("GET", "/api/session");
  assert.equal(seen[0].credentials, "same-origin");
  assert.deepEqual(seen[0].headers, { Authorization: "Bearer t" });
  assert.equal(seen[0].body, undefined);
  assert.deepEqual(seen[1].headers, {}); // the token went once, and is not kept
  assert.deepEqual(headers, { Authorization: "Bearer t" }); // the caller's object is untouched
});

test("the budget counts by holder; hold() gives back once however often it is called", () => {
  const { QUEUE } = net;
  const budget = new ConnectionBudget();
  budget.take("sse");
  const release = budget.hold("fetch");
  budget.take(QUEUE);
  assert.deepEqual(budget.held, { sse: 1, fetch: 1, [QUEUE]: 1 });
  assert.equal(budget.describe(), "sse 1, fetch 1, api 1");
  release();
  release(); // the abort, then the request settling: one connection, given back once
  assert.deepEqual([budget.now, budget.held.fetch], [2, 0]);
  budget.give("sse");
  budget.give(QUEUE);
  budget.give("fetch"); // nothing held: stays at zero
  assert.deepEqual([budget.now, budget.peak, budget.describe()], [0, 3, "none"]);
  assert.deepEqual(budget.peaks, { sse: 1, fetch: 1, [QUEUE]: 1 });
});

test("the connection plan: each pane's connections and the queue's one, against the six", () => {
  const pane = (key, connections) => ({ key, constructor: { connections } });
  const five = [pane("poll", 1), pane("longpoll", 1), pane("sse", 1), pane("ws", 0), pane("fetch")];
  assert.deepEqual(connectionPlan(five), {
    parts: { poll: 1, longpoll: 1, sse: 1, ws: 0, fetch: 1, api: 1 },
    total: 5,
    limit: 6,
    fits: true,
  });
  const greedy = [...five, pane("sse2", 1), pane("sse3", 1)];
  assert.deepEqual([connectionPlan(greedy).total, connectionPlan(greedy).fits], [7, false]);
});

test("the panes' classes declare what the plan adds up: five for the five panes", async () => {
  globalThis.document ??= { createTextNode: () => ({}) };
  const classes = await Promise.all(
    ["pane-poll.js", "pane-longpoll.js", "pane-sse.js", "pane-ws.js", "pane-fetch.js"].map(
      async (name) => (await load(name)).default,
    ),
  );
  const keys = ["poll", "longpoll", "sse", "ws", "fetch"];
  const plan = connectionPlan(classes.map((cls, i) => ({ key: keys[i], constructor: cls })));
  assert.deepEqual(plan.parts, { poll: 1, longpoll: 1, sse: 1, ws: 0, fetch: 1, api: 1 });
  assert.equal(plan.total, 5);
  assert.equal(plan.fits, true);
});
