// Pane summaries (what Pane.summary() returns) and a run, for the summary and findings tests.

/** A pane summary with plausible figures; `over` replaces any of them. */
export function paneSummary(transport, label, over = {}) {
  return {
    transport,
    label,
    state: "closed",
    end: "done",
    tokens: 40,
    text_length: 200,
    ttft_ms: 152.4,
    latency_ms: { p50: 3.2, p95: 8.75, max: 12.2, n: 40 },
    gaps: 0,
    duplicates: 0,
    out_of_order: 0,
    resets: 0,
    reconnects: 0,
    failures: 0,
    requests_browser: 1,
    requests_server: 1,
    bytes: 4000,
    bytes_per_token: 100,
    server: { bytes: 4000, requests: 1 },
    ...over,
  };
}

export const RUN = {
  id: "abc-1",
  mode: "chat",
  channel: "chat-1",
  after: "",
  t0: 1000,
  startedAt: "2024-01-01T00:00:00.000Z",
  endedAt: 3500,
  statsFinal: true,
  params: { prompt: "p", seed: 3, ttft_ms: 150, token_ms: 80, max_tokens: 40 },
  client: { poll_interval_ms: 10, longpoll_timeout_s: 25 },
};

export function fourPanes() {
  return [
    paneSummary("poll", "Short poll", {
      requests_browser: 200,
      requests_server: 200,
      bytes_per_token: 900,
    }),
    paneSummary("longpoll", "Long poll", {
      requests_browser: 41,
      requests_server: 41,
      bytes_per_token: 300,
    }),
    paneSummary("sse", "SSE", {
      bytes_per_token: 60,
      latency_ms: { p50: 2, p95: 4, max: 5, n: 40 },
    }),
    paneSummary("ws", "WebSocket", { bytes_per_token: 30 }),
  ];
}

/** The four panes and the fetch pane (its own chat: one request, SSE framing). */
export function fivePanes() {
  return [...fourPanes(), paneSummary("fetch", "Fetch", { bytes_per_token: 70 })];
}
