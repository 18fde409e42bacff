/* Realtime Lab dashboard: the page shell, the entry module (`<script type="module">`).
 *
 * Several panes stream the same channel at once, each with the browser's own API. The page's
 * <article class="pane"> elements (one per `PANES` entry in realtime_lab/dashboard.py) name
 * their transport module in `data-module`; this shell imports each one, hands every pane what
 * it may use (clock, connection budget, settings, a refresh callback, a stats fetcher), runs
 * the controls and the "sign in as" box, polls the server's figures and draws the charts,
 * summary and findings.
 *
 * With auth on (`realtime-lab serve --auth-secret`) everything but the ticker needs a user: the
 * "sign in as" box trades a pasted token for the session cookie (session.js), which the panes'
 * fetch, EventSource and WebSocket then all send by themselves. Until then the page asks the
 * server for nothing that would be refused (config, stats).
 *
 * Modules of this page (no build step, no dependencies, nothing from the internet):
 *   clock.js     clocks and the server clock offset   net.js       API calls, connection budget
 *   pane.js      what every transport pane shares     pane-*.js    one module per transport
 *   pane-errors.js  what a pane does on a failure     sequence.js  event-id checking
 *   sse-reader.js   the SSE parser the fetch pane reads its response with
 *   session.js   who the page streams as (the session cookie)
 *   tabs.js      the other tabs: their connections, the limit of six, streams shared
 *   charts.js    canvas charts   summary.js  table, Markdown, JSON   findings.js  explanations
 *   format.js    number formats
 *
 * Cache busting: the page's import map (templates/index.html) maps every module's URL to the
 * same URL with `?v=<version>`, so the modules' plain relative imports fetch new files after
 * an upgrade just as the entry point's own `?v=` does.
 *
 * The test hook `window.lab` is installed only when a test asks for it (`?test=1` in the URL,
 * or `window.__RTL_TEST__ = true` before the page loads).
 */

import { Chart } from "./charts.js";
import { Clock } from "./clock.js";
import { renderFindings } from "./findings.js";
import { fmtBytes, fmtMs } from "./format.js";
import { ConnectionBudget, SideQueue, connectionPlan, createApi, errorText } from "./net.js";
import { Session, describe as describeSession } from "./session.js";
import { cpuPerToken, markdown, renderTable, runSummary } from "./summary.js";
import {
  CHANNEL,
  LIMIT,
  StallMeter,
  StreamShare,
  TabCensus,
  forecast,
  limitApplies,
  pageProtocol,
  protocolName,
} from "./tabs.js";

const STATS_EVERY_MS = 1000;
const CLOCK_EVERY_MS = 10000; // a fresh clock sample at least this often
const FINAL_STATS_DELAY_MS = 400; // the server folds a connection's last bytes in as it closes
const COUNTS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight"];
// The run's status when panes ended refused (pane-errors.js `judge`'s ends).
const REFUSED = {
  unauthenticated: "401: sign in to stream this channel",
  forbidden: "403: this channel is not yours",
};

const $ = (selector, root = document) => root.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const pageId = Math.random().toString(36).slice(2, 8);

// ---- rendering: at most one redraw per 100 ms, however many events come in ---------------------
const ui = {
  timer: null,
  dirty() {
    if (this.timer === null) this.timer = setTimeout(() => this.render(), 100);
  },
  render() {
    this.timer = null;
    render();
  },
};
const refresh = () => ui.dirty();

const clock = new Clock({ onChange: refresh });
const budget = new ConnectionBudget(() => {
  refresh();
  announceSoon();
});

// ---- the other tabs of the origin (tabs.js) ---------------------------------------------------
// How this page came: over HTTP/2 every tab's requests share one connection; over HTTP/1.1 the
// browser opens six per origin for all tabs together, and the tabs tell each other what they hold.
const protocol = pageProtocol();
const bus = typeof BroadcastChannel === "function" ? new BroadcastChannel(CHANNEL) : null;
const share = new StreamShare({
  id: pageId,
  channel: bus,
  locks: (typeof navigator !== "undefined" && navigator.locks) || null,
  onChange: () => {
    announceSoon();
    refresh();
  },
});
/** Whether this tab shares the ticker's streams with the other tabs (one click sets all tabs). */
const sharing = { on: false };
/** Whether this tab has a run on (the other tabs then count its whole plan). */
const running = { on: false };
let census = null; // made once the panes (and their plan) are known
let announceTimer = null;
function announceSoon() {
  // At most one announcement per 50 ms, however fast the short poll takes and gives.
  if (announceTimer !== null || census === null) return;
  announceTimer = setTimeout(() => {
    announceTimer = null;
    census.announce();
  }, 50);
}
const stalls = new StallMeter(); // observing from init(): the requests after the page loaded
// Every request that is not a pane's own stream or poll goes through this one queue (the API
// calls, and the probes that ask why a stream was refused): one connection at most.
const queue = new SideQueue();
const api = createApi({ budget, clock, queue });
const session = new Session(api);
let config = null; // the server's /api/config answer
let configShown = false; // the sliders show the server's settings

async function readConfig() {
  const res = await api("GET", "/api/config");
  if (!res.ok || !res.json) return null;
  clock.add(res.t0, res.t1, res.json.server_time_ms);
  config = res.json;
  $("#chaos").hidden = !config.chaos;
  return config;
}

/** The server's figures for one pane's client tag; null if it has none (yet). */
async function fetchStats(client) {
  if (session.signedOut) return null; // it would be refused
  const res = await api("GET", `/api/stats?client=${encodeURIComponent(client)}`);
  if (!res.ok || !res.json || !res.json.client) return null;
  // Stats answers carry the server clock too: more samples, a shorter best round trip.
  if (typeof res.json.server_time_ms === "number") {
    clock.add(res.t0, res.t1, res.json.server_time_ms);
  }
  return res.json.client;
}

/** The server process's CPU seconds so far (`/api/stats` `process_cpu_s`); null if out of
 * reach. A run's CPU per token is the change over the run divided by the tokens received. */
async function readCpu() {
  if (session.signedOut) return null;
  try {
    const res = await api("GET", "/api/stats");
    const cpu = res.ok && res.json ? res.json.process_cpu_s : null;
    return typeof cpu === "number" ? cpu : null;
  } catch (err) {
    return null; // unreachable: the run says its CPU was not measured
  }
}

/** The settings the panes read at each use (a slider moved mid-run applies to the next poll). */
const options = {
  pollIntervalMs: () => Number($("#poll-ms").value),
  longpollTimeoutS: () => Number($("#longpoll-s").value),
};

/** One pane per <article class="pane">, of the class its `data-module` exports by default. */
async function loadPanes(deps) {
  const roots = [...document.querySelectorAll("article.pane[data-module]")];
  const classes = await Promise.all(
    roots.map(async (root) => {
      const name = root.dataset.module;
      if (!/^[\w-]+\.js$/.test(name)) throw new Error(`pane module ${name}: not a module here`);
      return (await import(`./${name}`)).default;
    }),
  );
  return roots.map((root, i) => new classes[i](root, deps));
}

const panes = await loadPanes({
  clock,
  budget,
  queue,
  refresh,
  onEnded: () => app.maybeFinished(),
  fetchStats,
  options,
  base: location.href,
  share: {
    // Runs that start at "now" (the ticker): what a follower is relayed is what a new stream
    // would get. A chat is a channel of its own tab.
    wanted: (run) => sharing.on && share.available && run.after === "now",
    join: (name, handlers) => share.join(name, handlers),
  },
});
// The most connections the page can hold at once: within the browser's six, or it says so.
const plan = connectionPlan(panes);
$("#conn-plan").textContent = String(plan.total);
$("#conn-plan").title = Object.entries(plan.parts)
  .map(([name, n]) => `${name} ${n}`)
  .join(", ");
if (!plan.fits) setStatus(`these panes need ${plan.total} connections: more than ${plan.limit}`);
census = new TabCensus({
  id: pageId,
  channel: bus,
  report: () => ({
    held: budget.now,
    plan: followedPlan(),
    running: running.on,
    protocol,
    leads: share.leads,
    sharing: sharing.on,
  }),
  onChange: refresh,
});
window.addEventListener("pagehide", () => census.close());
const charts = {
  latency: new Chart($("#chart-latency"), (v) => `${+v.toFixed(1)}`),
  bytes: new Chart($("#chart-bytes"), (v) => fmtBytes(v)),
};

function setStatus(text) {
  $("#run-status").textContent = text;
}

// ---- runs -------------------------------------------------------------------------------------
const app = {
  run: null,
  runs: 0,

  params() {
    return {
      prompt: $("#prompt").value.trim(),
      seed: Math.trunc(Number($("#seed").value) || 0),
      ttft_ms: Number($("#ttft-ms").value),
      token_ms: Number($("#token-ms").value),
      max_tokens: Math.max(1, Math.trunc(Number($("#max-tokens").value) || 1)),
    };
  },

  begin(mode, channel, extra) {
    this.stopAll();
    warnTabs(mode);
    running.on = true;
    announceSoon();
    this.runs += 1;
    const run = {
      id: `${pageId}-${this.runs}`,
      mode,
      channel,
      after: mode === "chat" ? "" : "now",
      t0: extra.t0 ?? clock.now(),
      startedAt: new Date().toISOString(),
      endedAt: null,
      statsFinal: false,
      // The mode its streams were opened with (the switch sets it before the run), and the
      // server's CPU seconds at its start and end.
      compression: config ? config.compression || null : null,
      cpu0: extra.cpu0 ?? null,
      cpu1: null,
      chat: extra.chat || null,
      params: extra.params || null,
      client: {
        poll_interval_ms: options.pollIntervalMs(),
        longpoll_timeout_s: options.longpollTimeoutS(),
      },
    };
    this.run = run;
    if (run.cpu0 === null) {
      readCpu().then((cpu) => {
        run.cpu0 ??= cpu;
      });
    }
    for (const pane of panes) pane.begin(run);
    $("#copy-md").disabled = false;
    $("#download-json").disabled = false;
    const shared = mode === "ticker" && sharing.on && share.available;
    const what = shared ? "the ticker, shared between tabs" : "the ticker";
    setStatus(mode === "chat" ? `streaming chat ${extra.chat.id}` : `streaming ${what}`);
    ui.dirty();
    return run;
  },

  stopAll() {
    for (const pane of panes) pane.stop();
    this.maybeFinished();
  },

  maybeFinished() {
    const run = this.run;
    if (!run || run.endedAt !== null || panes.some((pane) => pane.active)) return;
    run.endedAt = clock.now();
    running.on = false;
    announceSoon();
    const taking = panes.filter((pane) => !pane.skipped); // the fetch pane sits the ticker out
    const done = taking.length > 0 && taking.every((pane) => pane.ended === "done");
    const all = COUNTS[taking.length] ?? String(taking.length);
    const refused = taking.filter((pane) => REFUSED[pane.ended]).map((pane) => pane.ended);
    if (done) setStatus(`done: all ${all} panes finished`);
    else if (refused.length) setStatus(REFUSED[refused[0]]);
    else setStatus("stopped");
    // A 401 while the page thought it was signed in: the cookie expired (or was cleared).
    if (refused.includes("unauthenticated")) readSession();
    setTimeout(() => {
      pollStats(run).then(async () => {
        run.cpu1 = await readCpu();
        run.statsFinal = true;
        ui.dirty();
      });
    }, FINAL_STATS_DELAY_MS);
  },

  async startChat() {
    const params = this.params();
    if (!params.prompt) return;
    if ($("#ticker").checked) {
      $("#ticker").checked = false;
      $("#ticker-rate-label").hidden = true;
    }
    this.stopAll();
    setStatus("starting a chat…");
    const cpu0 = await readCpu(); // before the chat: its generation is part of its cost
    let res;
    try {
      res = await api("POST", "/api/chats", params);
    } catch (err) {
      setStatus("could not reach the server");
      return;
    }
    if (res.status === 401) {
      setStatus("401: sign in to start a chat");
      readSession(); // the page may have thought it was signed in
      return;
    }
    if (!res.ok || !res.json) {
      setStatus(`the server refused the chat: ${errorText(res)}`);
      return;
    }
    this.begin("chat", res.json.channel, { chat: res.json, params, t0: res.sent, cpu0 });
  },

  startTicker() {
    $("#ticker-rate-label").hidden = false;
    this.begin("ticker", "ticker", {});
    if (config && !config.ticker_rate) {
      setStatus("streaming the ticker (its rate is 0: raise it to see tokens)");
    }
  },

  summary() {
    return runSummary({
      run: this.run,
      panes: panes.map((pane) => pane.summary()),
      config,
      clock,
      budget,
      plan,
      tabs: {
        protocol: protocol || null,
        limit_applies: limitApplies(protocol),
        count: census.tabs,
        held_by_all: census.held,
        warning: tabs.warning || null,
        sharing: sharing.on,
        leads: share.leads,
        stalls: stalls.summary(),
      },
    });
  },

  markdown() {
    return markdown(
      this.summary(),
      panes.map((pane) => pane.summary()),
    );
  },
};

/** Every pane of `run` reads its server figures, one request after the other. */
async function pollStats(run) {
  for (const pane of panes) {
    if (app.run !== run || pane.run !== run) return;
    try {
      await pane.refreshStats();
    } catch (err) {
      return; // the server is unreachable right now; the next round tries again
    }
  }
  ui.dirty();
}

async function background() {
  for (;;) {
    await sleep(STATS_EVERY_MS);
    const run = app.run;
    try {
      if (run && run.endedAt === null) await pollStats(run);
      if (clock.age() > CLOCK_EVERY_MS && !session.signedOut) await readConfig();
    } catch (err) {
      // unreachable server: the panes show it; keep trying
    }
  }
}

function render() {
  const run = app.run;
  // Tests (and people) can tell from the page itself whether the figures are final.
  document.body.dataset.run = !run
    ? "idle"
    : run.statsFinal
      ? "final"
      : run.endedAt !== null
        ? "ended"
        : "running";
  document.body.dataset.runId = run ? run.id : "";
  $("#conn-now").textContent = budget.now;
  $("#conn-now").title = `held now: ${budget.describe()}`;
  $("#conn-peak").textContent = budget.peak;
  renderTabs();
  $("#clock-offset").textContent =
    clock.rtt === null ? "?" : `${fmtMs(clock.offset)} ms (rtt ${fmtMs(clock.rtt)} ms)`;
  const summaries = panes.map((pane) => pane.summary());
  panes.forEach((pane, i) => pane.render(summaries[i]));
  renderTable($("#summary-table"), summaries);
  $("#run-compression").textContent = run ? (run.compression ?? "?") : "–";
  const cpu = run ? cpuPerToken(run, summaries) : null;
  $("#run-cpu").textContent =
    cpu === null ? "–" : cpu.us_per_token === null ? "–" : `${cpu.us_per_token.toFixed(1)} µs`;
  renderFindings($("#findings"), summaries, run, { peak: budget.peak, limit: budget.limit, plan });
  const series = (points) =>
    panes.map((pane) => ({ label: pane.label, color: pane.color, points: points(pane) }));
  charts.latency.draw(
    series((pane) => pane.m.latencyPoints),
    { dots: true },
  );
  charts.bytes.draw(series((pane) => pane.m.bytesPoints));
}

// ---- the other tabs -----------------------------------------------------------------------------
/** Before a run opens its streams: would they take the origin past six? Say so, and offer to
 * share the ticker's streams. */
function warnTabs(mode) {
  census.prune();
  const f = forecast({
    protocol,
    othersHeld: census.othersNeed,
    tabs: census.tabs,
    plan: followedPlan(mode),
  });
  tabs.warning = f.over ? f.text : "";
  tabs.forecast = f;
  const offer = f.over && share.available && !sharing.on;
  let text = tabs.warning;
  if (f.over && mode === "chat") {
    text +=
      ". A chat is a channel of its own tab: run chats in one tab at a time, " +
      "or serve over HTTP/2 (make h2)";
  }
  $("#tabs-warning-text").textContent = text;
  $("#tabs-warning").hidden = !f.over;
  $("#share-offer").hidden = !offer;
}

const tabs = { warning: "", forecast: null };

/** The most connections a run in `mode` holds here: following another tab's ticker streams,
 * only the queue's one. */
function followedPlan(mode = app.run ? app.run.mode : "chat") {
  const shareable = mode === "ticker" && sharing.on && share.available;
  const followed =
    shareable && panes.some((pane) => census.leads(`realtime-lab:${pane.key}:ticker`));
  return followed ? 1 : plan.total;
}

function renderTabs() {
  const applies = limitApplies(protocol);
  const held = census.held;
  $("#tabs-held").textContent = String(held);
  $("#tabs-count").textContent = String(census.tabs);
  $("#tabs-held").classList.toggle("bad", applies && held > LIMIT);
  const name = protocolName(protocol);
  $("#conn-protocol").textContent = applies
    ? `${name}: at most ${LIMIT} per origin, all tabs together`
    : `${name}: one connection for all tabs, no limit of ${LIMIT}`;
  document.body.dataset.protocol = protocol || "unknown";
  const s = stalls.summary();
  $("#stalls").textContent = s.stalled
    ? `${s.stalled} of ${s.requests} requests waited for a connection, ` +
      `longest ${fmtMs(s.longest_ms)} ms`
    : `no request waited for a connection (${s.requests} measured)`;
  $("#stalls").classList.toggle("bad", s.stalled > 0);
  $("#share-tabs").checked = sharing.on;
  $("#share-tabs").disabled = !share.available;
}

/** Share the ticker's streams between tabs (`tell`: the user asked here, tell the other tabs). */
function setSharing(on, tell) {
  if (sharing.on === on) return;
  sharing.on = on;
  $("#share-tabs").checked = on;
  if (tell && bus) bus.postMessage({ kind: "share", on, tab: pageId });
  announceSoon();
  // A ticker run joins (or leaves) the share at once: started anew, from "now".
  if (app.run && app.run.mode === "ticker" && app.run.endedAt === null) app.startTicker();
  ui.dirty();
}

$("#share-tabs").addEventListener("change", (event) => setSharing(event.target.checked, true));
$("#share-offer").addEventListener("click", () => {
  setSharing(true, true);
  $("#share-offer").hidden = true;
});

// ---- controls ---------------------------------------------------------------------------------
function bindSlider(id, unit, onChange) {
  const input = $(`#${id}`);
  const output = $(`#${id}-out`);
  const show = () => {
    output.textContent = `${input.value} ${unit}`;
  };
  input.addEventListener("input", show);
  if (onChange) input.addEventListener("change", () => onChange(Number(input.value)));
  show();
  return { input, show };
}

function setSlider(slider, value) {
  if (typeof value !== "number") return;
  slider.input.value = String(value);
  slider.show();
}

async function patchConfig(change, label) {
  try {
    const res = await api("PATCH", "/api/config", change);
    if (res.ok && res.json) {
      config = res.json;
      setStatus(`${label} set`);
    } else {
      setStatus(`could not set ${label}: ${errorText(res)}`);
    }
  } catch (err) {
    setStatus(`could not set ${label}: the server is unreachable`);
  }
}

const sliders = {
  tokenMs: bindSlider("token-ms", "ms"),
  ttftMs: bindSlider("ttft-ms", "ms"),
  pollMs: bindSlider("poll-ms", "ms"),
  longpollS: bindSlider("longpoll-s", "s"),
  heartbeatS: bindSlider("heartbeat-s", "s", (value) =>
    patchConfig({ heartbeat: value }, `heartbeat ${value} s`),
  ),
  tickerRate: bindSlider("ticker-rate", "/s", (value) =>
    patchConfig({ ticker_rate: value }, `ticker rate ${value}/s`),
  ),
};

// The server's compression mode: streams opened from now on use it, open ones keep theirs.
$("#compression").addEventListener("change", async (event) => {
  const mode = event.target.value;
  await patchConfig({ compression: mode }, `compression ${mode} (for the streams opened next)`);
  if (config && config.compression) event.target.value = config.compression; // refused: as it is
});

async function chaos(path, body, label) {
  const status = $("#chaos-status");
  status.textContent = `${label}…`;
  try {
    const res = await api("POST", path, body);
    status.textContent = res.ok ? `${label}: done` : `${label}: ${errorText(res)}`;
  } catch (err) {
    status.textContent = `${label}: the server is unreachable`;
  }
}

$("#chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  app.startChat();
});
$("#stop").addEventListener("click", () => {
  $("#ticker").checked = false;
  app.stopAll();
});
$("#ticker").addEventListener("change", (event) => {
  if (event.target.checked) app.startTicker();
  else {
    $("#ticker-rate-label").hidden = true;
    app.stopAll();
  }
});
$("#chaos-drop").addEventListener("click", () =>
  chaos("/api/chaos/drop", { transport: "all" }, "drop all connections"),
);
$("#chaos-pause").addEventListener("click", () => {
  const seconds = Number($("#chaos-pause-s").value) || 1;
  chaos("/api/chaos/pause", { seconds }, `pause delivery ${seconds} s`);
});
$("#chaos-fail").addEventListener("click", () => {
  const count = Math.max(1, Math.trunc(Number($("#chaos-fail-n").value) || 1));
  chaos("/api/chaos/fail", { transport: "all", count }, `503 the next ${count} requests`);
});
$("#copy-md").addEventListener("click", async () => {
  const text = app.markdown();
  const area = $("#summary-md");
  area.value = text;
  area.hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    $("#copy-status").textContent = "copied to the clipboard";
  } catch (err) {
    // No clipboard permission (e.g. not a secure origin): leave it selected for Ctrl+C.
    area.focus();
    area.select();
    $("#copy-status").textContent = "select and copy it below (clipboard not available here)";
  }
});
$("#download-json").addEventListener("click", () => {
  const summary = app.summary();
  const blob = new Blob([JSON.stringify(summary, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `realtime-lab-${summary.run ? summary.run.id : "run"}.json`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
});
window.addEventListener("resize", () => ui.dirty());

// ---- session: the "sign in as" box ------------------------------------------------------------
function showSession(text = null) {
  const state = session.state;
  const mode = state.auth === null ? "unknown" : !state.auth ? "off" : state.user ? "in" : "out";
  document.body.dataset.session = mode;
  $("#session-status").textContent = describeSession(state);
  $("#session-note").textContent = text ?? "";
  // Auth off: nothing to sign in to. Signed in: sign out first to change user. Unknown (the
  // server did not answer): as the page was served.
  const box = mode === "out" || (mode === "unknown" && $("#session-form").dataset.auth === "on");
  $("#session-token-label").hidden = !box;
  $("#sign-in").hidden = !box;
  $("#sign-out").hidden = mode !== "in";
}

async function readSession() {
  try {
    await session.read();
  } catch (err) {
    session.state = { ...session.state, auth: null };
  }
  showSession();
}

/** Signed in (or auth is off): read the server's settings now, if they were out of reach. */
async function readSettings() {
  if (session.signedOut) return;
  const first = await readConfig();
  if (!first || configShown) return;
  for (let i = 0; i < 4; i += 1) await readConfig(); // a few round trips: the shortest wins
  setSlider(sliders.tokenMs, first.token_ms);
  setSlider(sliders.ttftMs, first.ttft_ms);
  setSlider(sliders.heartbeatS, first.heartbeat);
  setSlider(sliders.tickerRate, first.ticker_rate);
  if (first.compression) $("#compression").value = first.compression;
  configShown = true;
}

$("#session-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#session-token");
  $("#sign-in").disabled = true;
  try {
    const result = await session.signIn(input.value);
    if (result.ok) input.value = ""; // the cookie holds it now; the page keeps no copy
    showSession(result.ok ? "" : result.text);
    if (result.ok) await readSettings();
  } catch (err) {
    showSession("the server is unreachable");
  } finally {
    $("#sign-in").disabled = false;
  }
  ui.dirty();
});
$("#sign-out").addEventListener("click", async () => {
  // Signing out ends what the page streams as this user (open streams would outlive the cookie).
  $("#ticker").checked = false;
  $("#ticker-rate-label").hidden = true;
  app.stopAll();
  try {
    await session.signOut();
    showSession("signed out");
  } catch (err) {
    showSession("the server is unreachable");
  }
});

// ---- test hook --------------------------------------------------------------------------------
/** Whether a test asked for `window.lab`: `?test=1`, or `window.__RTL_TEST__` set beforehand. */
function testHookWanted() {
  return window.__RTL_TEST__ === true || new URLSearchParams(location.search).get("test") === "1";
}

if (testHookWanted()) {
  // `lab.summary()` is what "Download JSON" saves.
  window.lab = {
    app,
    panes,
    budget,
    plan,
    clock,
    session,
    tabs: {
      protocol,
      census,
      share,
      stalls,
      sharing,
      state: tabs,
      setSharing: (on) => setSharing(on, true),
    },
    summary: () => app.summary(),
    markdown: () => app.markdown(),
  };
}

// ---- start ------------------------------------------------------------------------------------
async function init() {
  try {
    if (bus) {
      bus.addEventListener("message", (event) => {
        const message = event.data;
        census.receive(message);
        share.receive(message);
        if (message && message.kind === "share" && message.tab !== pageId) {
          setSharing(Boolean(message.on), false);
        }
      });
    }
    census.start(); // the other tabs learn of this one, and it of them, at once
    stalls.observe(globalThis.PerformanceObserver, refresh);
    await readSession(); // first: with auth on and nobody signed in, config would be refused
    await readSettings();
    document.body.dataset.ready = "true";
  } catch (err) {
    setStatus("could not reach the server");
  }
  ui.render();
  background();
}

init();
