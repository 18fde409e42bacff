// realtime_lab/static/tabs.js: the census of tabs, the forecast, the stall meter, shared streams.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const tabs = await load("tabs.js");
const {
  LIMIT,
  STALE_MS,
  StallMeter,
  StreamShare,
  TabCensus,
  forecast,
  limitApplies,
  pageProtocol,
  protocolName,
  waited,
} = tabs;

/** BroadcastChannels of one origin: a message reaches every other channel, asynchronously. */
function fakeOrigin() {
  const channels = new Set();
  const make = () => {
    const channel = {
      received: [],
      onmessage: null,
      postMessage(data) {
        const copy = structuredClone(data);
        for (const other of channels) {
          if (other !== channel) queueMicrotask(() => other.onmessage && other.onmessage(copy));
        }
      },
      close() {
        channels.delete(channel);
      },
    };
    channels.add(channel);
    return channel;
  };
  return { make };
}

/** navigator.locks for one origin: exclusive, first come first served, abortable. */
function fakeLocks() {
  const queues = new Map();
  const next = (name) => {
    const queue = queues.get(name);
    if (!queue || queue.held || !queue.waiting.length) return;
    const { callback, resolve, reject } = queue.waiting.shift();
    queue.held = true;
    Promise.resolve()
      .then(() => callback({ name }))
      .then(resolve, reject)
      .finally(() => {
        queue.held = false;
        next(name);
      });
  };
  return {
    request(name, options, callback) {
      const queue = queues.get(name) ?? { held: false, waiting: [] };
      queues.set(name, queue);
      return new Promise((resolve, reject) => {
        const entry = { callback, resolve, reject };
        options.signal?.addEventListener("abort", () => {
          const i = queue.waiting.indexOf(entry);
          if (i >= 0) {
            queue.waiting.splice(i, 1);
            reject(new DOMException("aborted", "AbortError"));
          }
        });
        queue.waiting.push(entry);
        next(name);
      });
    },
  };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

test("the page's protocol comes from its navigation entry", () => {
  const perf = (p) => ({ getEntriesByType: (t) => (t === "navigation" ? [{ nextHopProtocol: p }] : []) });
  assert.equal(pageProtocol(perf("h2")), "h2");
  assert.equal(pageProtocol(perf("http/1.1")), "http/1.1");
  assert.equal(pageProtocol({ getEntriesByType: () => [] }), "");
  assert.equal(pageProtocol(undefined), "");
  assert.equal(limitApplies("h2"), false);
  assert.equal(limitApplies("h3"), false);
  assert.equal(limitApplies("http/1.1"), true);
  assert.equal(limitApplies(""), true); // unknown: assume the limit
  assert.equal(protocolName("h2"), "HTTP/2");
  assert.equal(protocolName("http/1.1"), "HTTP/1.1");
  assert.equal(protocolName(""), "?");
});

test("forecast: over six over HTTP/1.1 warns, over HTTP/2 never", () => {
  const fits = forecast({ protocol: "http/1.1", othersHeld: 1, tabs: 2, plan: 5 });
  assert.deepEqual([fits.applies, fits.need, fits.over], [true, 6, false]);
  const over = forecast({ protocol: "http/1.1", othersHeld: 5, tabs: 2, plan: 5 });
  assert.deepEqual([over.need, over.over], [10, true]);
  assert.match(over.text, /^1 other tab of this origin uses up to 5 connections and this run needs up to 5: 10, more than the 6 a browser opens over HTTP\/1\.1/);
  const two = forecast({ protocol: "http/1.1", othersHeld: 1, tabs: 3, plan: 6 });
  assert.match(two.text, /^2 other tabs of this origin use up to 1 connection /);
  const h2 = forecast({ protocol: "h2", othersHeld: 50, tabs: 9, plan: 5 });
  assert.deepEqual([h2.applies, h2.over], [false, false]);
  assert.match(h2.text, /^HTTP\/2: .*does not apply/);
  assert.equal(LIMIT, 6);
});

test("the census adds up every tab's connections and forgets silent tabs", async () => {
  const origin = fakeOrigin();
  let clock = 0;
  const now = () => clock;
  const make = (id, held, extra = {}) => {
    const channel = origin.make();
    const census = new TabCensus({
      id,
      channel,
      now,
      report: () => ({ held: held(), plan: 5, ...extra }),
    });
    channel.onmessage = (m) => census.receive(m);
    return census;
  };
  let aHeld = 2;
  const a = make("a", () => aHeld);
  const b = make("b", () => 3, { running: true });
  const noTimer = () => null;
  a.start(noTimer);
  await settle();
  // b answered a's hello at once; a knows of b before b has started beating.
  assert.equal(a.tabs, 2);
  assert.equal(a.othersHeld, 3);
  assert.equal(a.othersNeed, 5); // b has a run on: its whole plan
  assert.equal(a.held, 5);
  b.start(noTimer);
  await settle();
  assert.equal(b.othersHeld, 2);
  aHeld = 4;
  a.announce();
  await settle();
  assert.equal(b.othersHeld, 4);
  assert.equal(b.othersNeed, 4); // a has no run on: what it holds
  // A tab that stops announcing (crashed) is forgotten after STALE_MS...
  clock += STALE_MS + 1;
  assert.equal(b.prune(), true);
  assert.equal(b.tabs, 1);
  // ...and one that closes says so.
  a.announce();
  await settle();
  assert.equal(b.tabs, 2);
  a.close(() => {});
  await settle();
  assert.equal(b.tabs, 1);
  assert.equal(b.othersHeld, 0);
});

test("waited: the time before the request was sent, less DNS and connecting", () => {
  const entry = {
    fetchStart: 100,
    domainLookupStart: 100,
    domainLookupEnd: 100,
    connectStart: 100,
    connectEnd: 100,
    requestStart: 1100,
  };
  assert.equal(waited(entry), 1000); // a reused connection, free after 1 s
  // A new connection: its TLS handshake is not waiting.
  assert.equal(waited({ ...entry, connectStart: 110, connectEnd: 1090 }), 20);
  assert.equal(waited({ ...entry, requestStart: 0 }), null); // the browser does not say
});

test("the stall meter counts requests that waited, from the page's load on", () => {
  const meter = new StallMeter(100, 50);
  const at = (startTime, wait, name = "https://lab/poll/x", nextHopProtocol = "http/1.1") => ({
    name,
    startTime,
    fetchStart: startTime,
    domainLookupStart: startTime,
    domainLookupEnd: startTime,
    connectStart: startTime,
    connectEnd: startTime,
    requestStart: startTime + wait,
    nextHopProtocol,
  });
  meter.add(at(10, 900, "https://lab/static/pane.js")); // the page's own loading: not counted
  meter.add(at(60, 5));
  meter.add(at(70, 950, "https://lab/api/stats?client=x"));
  meter.add(at(80, 150, "https://lab/poll/x", "h2"));
  assert.deepEqual(meter.summary(), {
    requests: 3,
    stalled: 2,
    longest_ms: 950,
    worst: "/api/stats",
    protocols: { "http/1.1": 2, h2: 1 },
  });
  assert.equal(new StallMeter().observe(null), false); // no PerformanceObserver
});

test("one tab holds a shared stream, the others follow; the next takes over", async () => {
  const origin = fakeOrigin();
  const locks = fakeLocks();
  const tab = (id) => {
    const channel = origin.make();
    const share = new StreamShare({ id, channel, locks });
    channel.onmessage = (m) => share.receive(m);
    const got = [];
    const log = [];
    const handle = share.join("s", {
      lead: () => log.push("lead"),
      follow: (env) => got.push(env.id),
      leader: (from) => log.push(`leader ${from}`),
    });
    return { share, handle, got, log };
  };
  const a = tab("a");
  await settle();
  const b = tab("b");
  const c = tab("c");
  await settle();
  assert.deepEqual(a.log, ["leader a", "lead"]);
  assert.deepEqual([a.share.leads, b.share.leads, c.share.leads], [["s"], [], []]);
  assert.equal(a.share.available, true);

  a.handle.publish({ id: "e-1" });
  a.handle.publish({ id: "e-2" });
  await settle();
  assert.deepEqual(b.got, ["e-1", "e-2"]);
  assert.deepEqual(c.got, ["e-1", "e-2"]);
  assert.deepEqual(b.log, ["leader a"]);
  b.handle.publish({ id: "e-3" }); // a follower relays nothing
  await settle();
  assert.deepEqual(c.got, ["e-1", "e-2"]);

  // The holder goes: the first tab waiting takes the lock and leads; the last follows it.
  a.handle.leave();
  await settle();
  assert.deepEqual(b.log, ["leader a", "leader b", "lead"]);
  assert.deepEqual(b.share.leads, ["s"]);
  b.handle.publish({ id: "e-3" });
  await settle();
  assert.deepEqual(c.got, ["e-1", "e-2", "e-3"]);
  assert.deepEqual(c.log, ["leader a", "leader b"]);
  assert.deepEqual(a.got, []); // left: hears nothing

  // A follower that leaves stops waiting for the lock: when b goes, nobody leads.
  c.handle.leave();
  b.handle.leave();
  await settle();
  assert.deepEqual(c.log, ["leader a", "leader b"]);
  assert.deepEqual([b.share.leads, c.share.leads], [[], []]);
});

test("without Web Locks or a channel, streams are not shared", () => {
  assert.equal(new StreamShare({ id: "a", channel: null, locks: fakeLocks() }).available, false);
  assert.equal(new StreamShare({ id: "a", channel: {}, locks: null }).available, false);
});
