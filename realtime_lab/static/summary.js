/* The summary of a run: the table under the charts, "Copy as Markdown" and "Download JSON".
 *
 * Everything is computed from the panes' own summaries (`Pane.summary()`), so the three always
 * agree; only `renderTable` touches the DOM.
 */

import { fmtBytes, fmtMs, fmtNum } from "./format.js";

/** The table's columns: [key, title, cell(paneSummary) -> text]. */
export const COLUMNS = [
  ["transport", "transport", (p) => p.label],
  ["state", "state", (p) => (p.end ? `${p.state} (${p.end})` : p.state)],
  ["ttft", "TTFT ms", (p) => fmtMs(p.ttft_ms)],
  ["p50", "p50 ms", (p) => fmtMs(p.latency_ms.p50)],
  ["p95", "p95 ms", (p) => fmtMs(p.latency_ms.p95)],
  ["max", "max ms", (p) => fmtMs(p.latency_ms.max)],
  ["tokens", "tokens", (p) => String(p.tokens)],
  ["gaps", "gaps", (p) => String(p.gaps)],
  ["dups", "dups", (p) => String(p.duplicates)],
  ["ooo", "out of order", (p) => String(p.out_of_order)],
  ["resets", "resets", (p) => String(p.resets)],
  ["reconnects", "reconnects", (p) => String(p.reconnects)],
  ["requests", "requests", (p) => fmtNum(p.requests_server ?? p.requests_browser)],
  ["bytes", "bytes", (p) => fmtBytes(p.bytes)],
  ["bpt", "bytes/token", (p) => fmtNum(p.bytes_per_token, 1)],
];

/**
 * The server's CPU over a run per token its panes received: `{cpu_s, tokens, us_per_token}`,
 * or null before the run's last figures (or when the server's CPU was out of reach). It is the
 * whole process's CPU: every pane's stream, the chat's generation, the page's own calls, and
 * whatever else the server did meanwhile (another tab's run counts too).
 */
export function cpuPerToken(run, panes) {
  if (!run || typeof run.cpu0 !== "number" || typeof run.cpu1 !== "number") return null;
  const tokens = panes.reduce((sum, pane) => sum + (pane.skipped ? 0 : pane.tokens), 0);
  const cpu = Math.max(0, run.cpu1 - run.cpu0);
  return { cpu_s: cpu, tokens, us_per_token: tokens ? (cpu * 1e6) / tokens : null };
}

/**
 * What "Download JSON" saves (and the test hook's `lab.summary()` returns).
 *
 * @param {object} page
 *   run     the current run, or null
 *   panes   the panes' summaries, in page order
 *   config  the server's /api/config answer, or null
 *   clock   {offset, rtt}
 *   budget  {now, peak, limit, peaks}: connections held (net.js ConnectionBudget)
 *   plan    optional: net.js connectionPlan of the panes ({total, parts})
 */
export function runSummary({
  run,
  panes,
  config,
  clock,
  budget,
  plan = null,
  tabs = null,
  now = new Date(),
}) {
  const out = {
    generated_at: now.toISOString(),
    run: run && {
      id: run.id,
      mode: run.mode,
      channel: run.channel,
      started_at: run.startedAt,
      duration_s: run.endedAt !== null ? (run.endedAt - run.t0) / 1000 : null,
      chat: run.params,
      client: run.client,
      heartbeat_s: config ? config.heartbeat : null,
      compression: run.compression ?? null,
      server_cpu: cpuPerToken(run, panes),
    },
    finished: Boolean(run && run.endedAt !== null),
    stats_final: Boolean(run && run.statsFinal),
    clock: { offset_ms: clock.offset, rtt_ms: clock.rtt },
    connections: {
      now: budget.now,
      peak: budget.peak,
      limit: budget.limit,
      peak_by_holder: { ...(budget.peaks || {}) },
      plan: plan ? plan.total : null,
      plan_by_holder: plan ? { ...plan.parts } : null,
    },
    // The other tabs of the origin and the protocol (tabs.js): what the connection figures
    // were measured beside.
    tabs: tabs ? { ...tabs } : null,
    panes: {},
  };
  for (const pane of panes) {
    const { server, ...rest } = pane; // the server's raw figures stay out of the file
    out.panes[pane.transport] = rest;
  }
  return out;
}

/** "Copy as Markdown": a line about the run, then the table, one row per pane. */
export function markdown(summary, panes) {
  const rows = panes.map((pane) => COLUMNS.map(([, , cell]) => cell(pane)));
  const head = COLUMNS.map(([, title]) => title);
  const line = (cells) => `| ${cells.join(" | ")} |`;
  const run = summary.run;
  const lines = [];
  if (run) {
    const what =
      run.mode === "chat"
        ? `chat, token pace ${run.chat.token_ms} ms, TTFT ${run.chat.ttft_ms} ms, ` +
          `seed ${run.chat.seed}, max ${run.chat.max_tokens} tokens`
        : "ticker";
    const cpu = run.server_cpu;
    const cost =
      `compression ${run.compression ?? "?"}` +
      (cpu && cpu.us_per_token !== null
        ? `, server CPU ${fmtNum(cpu.us_per_token, 1)} µs per token received`
        : "");
    lines.push(
      `Realtime Lab run ${run.id} (${what}; short-poll interval ` +
        `${run.client.poll_interval_ms} ms, long-poll timeout ${run.client.longpoll_timeout_s} s; ` +
        `${cost})`,
      "",
    );
  }
  lines.push(line(head), line(head.map((_, i) => (i === 0 ? "---" : "---:"))));
  for (const row of rows) lines.push(line(row));
  return lines.join("\n");
}

/** Fill the summary <table> (its head once, then one row per pane). */
export function renderTable(table, panes) {
  if (!table.tHead.rows.length) {
    const row = table.tHead.insertRow();
    for (const [key, title] of COLUMNS) {
      const th = document.createElement("th");
      th.textContent = title;
      th.dataset.col = key;
      row.appendChild(th);
    }
  }
  const body = table.tBodies[0];
  panes.forEach((s, i) => {
    const row = body.rows[i] || body.insertRow();
    row.dataset.transport = s.transport;
    COLUMNS.forEach(([key, , cell], j) => {
      const td = row.cells[j] || row.insertCell();
      td.dataset.col = key;
      td.textContent = cell(s);
    });
  });
}
