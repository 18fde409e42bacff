// realtime_lab/static/summary.js: "Download JSON" and "Copy as Markdown".
import assert from "node:assert/strict";
import test from "node:test";

import { RUN, fourPanes, paneSummary } from "./fixtures.mjs";
import { load } from "./static.mjs";

const { COLUMNS, cpuPerToken, markdown, runSummary } = await load("summary.js");

const page = (run, panes) => ({
  run,
  panes,
  config: { heartbeat: 15 },
  clock: { offset: -1.5, rtt: 0.8 },
  budget: { now: 0, peak: 3, limit: 6, peaks: { sse: 1, api: 1, fetch: 1 } },
  plan: { total: 5, parts: { poll: 1, longpoll: 1, sse: 1, ws: 0, fetch: 1, api: 1 } },
  now: new Date("2024-01-01T00:00:05.000Z"),
});

test("runSummary: the run, its state, and each pane without the server's raw figures", () => {
  const summary = runSummary(page(RUN, fourPanes()));
  assert.equal(summary.generated_at, "2024-01-01T00:00:05.000Z");
  assert.deepEqual(summary.run, {
    id: "abc-1",
    mode: "chat",
    channel: "chat-1",
    started_at: "2024-01-01T00:00:00.000Z",
    duration_s: 2.5,
    chat: RUN.params,
    client: RUN.client,
    heartbeat_s: 15,
    compression: null,
    server_cpu: null,
  });
  assert.equal(summary.finished, true);
  assert.equal(summary.stats_final, true);
  assert.deepEqual(summary.clock, { offset_ms: -1.5, rtt_ms: 0.8 });
  assert.deepEqual(summary.connections, {
    now: 0,
    peak: 3,
    limit: 6,
    peak_by_holder: { sse: 1, api: 1, fetch: 1 },
    plan: 5,
    plan_by_holder: { poll: 1, longpoll: 1, sse: 1, ws: 0, fetch: 1, api: 1 },
  });
  assert.deepEqual(Object.keys(summary.panes), ["poll", "longpoll", "sse", "ws"]);
  assert.equal(summary.panes.sse.tokens, 40);
  assert.equal("server" in summary.panes.sse, false);
});

test("runSummary without a plan, and with a skipped pane", () => {
  const skipped = paneSummary("fetch", "Fetch", {
    skipped: true,
    state: "skipped",
    end: null,
    tokens: 0,
  });
  const summary = runSummary({ ...page(RUN, [skipped]), plan: undefined });
  assert.equal(summary.connections.plan, null);
  assert.equal(summary.connections.plan_by_holder, null);
  assert.equal(summary.panes.fetch.skipped, true);
  const lines = markdown(summary, [skipped]).split("\n");
  assert.ok(lines[4].startsWith("| Fetch | skipped |"), lines[4]);
});

test("runSummary keeps what the page knew of the other tabs", () => {
  assert.equal(runSummary(page(RUN, [])).tabs, null);
  const tabs = { protocol: "h2", limit_applies: false, count: 3, stalls: { stalled: 0 } };
  assert.deepEqual(runSummary({ ...page(RUN, []), tabs }).tabs, tabs);
});

test("runSummary before any run", () => {
  const summary = runSummary(page(null, []));
  assert.equal(summary.run, null);
  assert.equal(summary.finished, false);
  assert.equal(summary.stats_final, false);
});

test("runSummary of a run still going: no duration", () => {
  const summary = runSummary(page({ ...RUN, endedAt: null, statsFinal: false }, []));
  assert.equal(summary.run.duration_s, null);
  assert.equal(summary.finished, false);
});

test("markdown: a line about the run, then one row per pane", () => {
  const panes = fourPanes();
  const text = markdown(runSummary(page(RUN, panes)), panes);
  const lines = text.split("\n");
  assert.equal(
    lines[0],
    "Realtime Lab run abc-1 (chat, token pace 80 ms, TTFT 150 ms, seed 3, max 40 tokens; " +
      "short-poll interval 10 ms, long-poll timeout 25 s; compression ?)",
  );
  assert.equal(lines[1], "");
  assert.equal(lines[2], `| ${COLUMNS.map(([, title]) => title).join(" | ")} |`);
  assert.ok(lines[3].startsWith("| --- | ---: |"));
  assert.equal(lines.length, 4 + 4);
  assert.equal(
    lines[4],
    "| Short poll | closed (done) | 152 | 3.2 | 8.8 | 12 | 40 | 0 | 0 | 0 | 0 | 0 | 200 | " +
      "4000 B | 900.0 |",
  );
});

test("markdown of a ticker run, and of a pane with no server figures yet", () => {
  const ticker = { ...RUN, mode: "ticker", params: null };
  const pane = paneSummary("ws", "WebSocket", {
    end: null,
    requests_server: null,
    requests_browser: 2,
    bytes: null,
    bytes_per_token: null,
  });
  const lines = markdown(runSummary(page(ticker, [pane])), [pane]).split("\n");
  assert.ok(
    lines[0].startsWith("Realtime Lab run abc-1 (ticker; short-poll interval 10 ms"),
    lines[0],
  );
  assert.ok(lines[4].startsWith("| WebSocket | closed |"), lines[4]);
  assert.ok(lines[4].endsWith("| 2 | – | – |"), lines[4]);
});

test("the server's CPU per token received: the run's change over the panes' tokens", () => {
  const panes = fourPanes(); // 40 tokens each
  const run = { ...RUN, compression: "connection", cpu0: 1.5, cpu1: 1.516 };
  assert.equal(cpuPerToken({ ...run, cpu1: null }, panes), null);
  const cpu = cpuPerToken(run, panes);
  assert.equal(cpu.tokens, 160);
  assert.ok(Math.abs(cpu.us_per_token - 100) < 1e-6, cpu.us_per_token);
  const summary = runSummary(page(run, panes));
  assert.equal(summary.run.compression, "connection");
  assert.deepEqual(summary.run.server_cpu, cpu);
  const line = markdown(summary, panes).split("\n")[0];
  assert.ok(line.endsWith("; compression connection, server CPU 100.0 µs per token received)"), line);
  const skipped = [...panes, paneSummary("fetch", "Fetch", { skipped: true, tokens: 7 })];
  assert.equal(cpuPerToken(run, skipped).tokens, 160);
  assert.equal(cpuPerToken({ ...run, cpu1: 1.5 }, []).us_per_token, null);
});
