/* The explanations under "What each transport costs": plain-language findings written from
 * the numbers of this run.
 *
 * `findings()` is pure (it returns the items as HTML strings); `renderFindings()` puts them on
 * the page. A transport with no sentence of its own in `SENTENCES` gets the generic one, so a
 * new pane shows up here without a change to this file.
 */

import { escapeHtml, fmtMs } from "./format.js";

const requests = (s) => s.requests_server ?? s.requests_browser;
const perToken = (s) => (s.tokens ? requests(s) / s.tokens : 0);
const bpt = (s) => (s.bytes_per_token === null ? "?" : `${s.bytes_per_token.toFixed(0)} B`);
const p50 = (s) => `${fmtMs(s.latency_ms.p50)} ms`;
const batch = (s) => (perToken(s) ? (1 / perToken(s)).toFixed(1) : "?");
const plural = (n, word) => `${word}${n === 1 ? "" : "s"}`;

/** One sentence per transport, from its summary `s` and the `run`. */
export const SENTENCES = {
  poll: (s, run) =>
    `<b>Short polling</b> made ${requests(s)} requests for ${s.tokens} tokens ` +
    `(${perToken(s).toFixed(1)} per token) at a ${run.client.poll_interval_ms} ms interval: ` +
    `${bpt(s)} per token, median latency ${p50(s)}. ` +
    (perToken(s) > 1
      ? "Most of its requests came back empty: a short interval buys latency with requests."
      : `Each poll collected ${batch(s)} tokens on average: few requests, but a token ` +
        "waits up to one interval."),
  longpoll: (s) =>
    `<b>Long polling</b> made ${requests(s)} requests (${perToken(s).toFixed(2)} per token): ` +
    `${bpt(s)} per token, median ${p50(s)}. ` +
    (perToken(s) > 0.8
      ? "About one answer per token, each paying full HTTP headers: its cost follows the " +
        "event rate."
      : `Tokens came faster than a round trip, so answers carried ${batch(s)} tokens ` +
        "each: batching keeps its cost down when the feed is busy."),
  sse: (s) =>
    `<b>SSE</b> kept one response open (${requests(s)} ${plural(requests(s), "request")}): ` +
    `${bpt(s)} per token, median ${p50(s)}.`,
  ws: (s) =>
    `<b>WebSocket</b> used ${requests(s)} ${plural(requests(s), "handshake")}: ` +
    `${bpt(s)} per token, median ${p50(s)}.`,
  fetch: (s) =>
    `<b>Fetch streaming</b> POSTed the prompt and read the answer from the same response ` +
    `(${requests(s)} ${plural(requests(s), "request")}): ${bpt(s)} per token, ` +
    `median ${p50(s)}. It streamed a chat of its own, with the same prompt and seed.`,
};

/** The sentence for a transport that has none of its own. */
function generic(s) {
  return (
    `<b>${escapeHtml(s.label)}</b> made ${requests(s)} ${plural(requests(s), "request")} for ` +
    `${s.tokens} tokens: ${bpt(s)} per token, median ${p50(s)}.`
  );
}

/**
 * The findings of a run as HTML list items, or null while there is nothing to say (no run,
 * or no token on any pane yet).
 *
 * @param {object[]} summaries the panes' summaries, in page order
 * @param {object|null} run the current run
 * @param {{peak: number, limit: number, plan?: {total: number}}} connections the page's
 *   connection budget, and its plan (net.js connectionPlan)
 */
export function findings(all, run, connections) {
  const summaries = all.filter((s) => !s.skipped); // a pane that sat the run out says nothing
  if (!run || !summaries.some((s) => s.tokens > 0)) return null;
  const items = summaries.map((s) => (SENTENCES[s.transport] ?? generic)(s, run));
  const priced = summaries.filter((s) => s.bytes_per_token !== null);
  if (priced.length === summaries.length) {
    const ranked = [...priced].sort((a, b) => a.bytes_per_token - b.bytes_per_token);
    items.push(
      `Cheapest per token on the wire this run: ${ranked
        .map((s) => `${escapeHtml(s.label)} ${s.bytes_per_token.toFixed(0)} B`)
        .join(" < ")}.`,
    );
  }
  const timed = summaries.filter((s) => s.latency_ms.n > 0);
  if (timed.length) {
    const ranked = [...timed].sort((a, b) => a.latency_ms.p95 - b.latency_ms.p95);
    items.push(
      `Lowest p95 latency: ${ranked
        .map((s) => `${escapeHtml(s.label)} ${fmtMs(s.latency_ms.p95)} ms`)
        .join(", ")}.`,
    );
  }
  const troubled = summaries.filter((s) => s.gaps + s.duplicates + s.out_of_order > 0);
  const reconnected = summaries.filter((s) => s.reconnects > 0);
  items.push(
    troubled.length
      ? `Integrity problems: ${troubled.map((s) => escapeHtml(s.label)).join(", ")} ` +
          "(see the panes)."
      : `No gaps, duplicates or reordering on any pane` +
          (reconnected.length
            ? `, across ${reconnected.reduce((n, s) => n + s.reconnects, 0)} reconnects: ` +
              `every transport resumed from its last event id.`
            : "."),
    `This page held at most ${connections.peak} of the ${connections.limit} HTTP/1.1 ` +
      `connections a browser allows per origin` +
      (connections.plan ? ` (it never needs more than ${connections.plan.total})` : "") +
      `; the WebSocket is not counted: Chromium pools WebSockets separately.`,
  );
  return items;
}

/** Show the findings in `el`; while there are none, leave what it shows. */
export function renderFindings(el, summaries, run, connections) {
  const items = findings(summaries, run, connections);
  if (items) el.innerHTML = `<ul>${items.map((item) => `<li>${item}</li>`).join("")}</ul>`;
}
