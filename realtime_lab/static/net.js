/* The page's own HTTP requests, and how many connections it holds.
 *
 * Connection budget (HTTP/1.1 allows six connections per origin): each pane declares the most
 * connections it holds at once (`static connections` on its class: the SSE, long-poll and fetch
 * streams one each, the short poll one for a moment per poll, the WebSocket none, since Chromium
 * pools WebSockets apart from the six), and every other request (stats, clock samples, buttons)
 * goes through one queue, which holds one. `connectionPlan` adds them up: five for the five panes,
 * within the six. The `ConnectionBudget` counts what the page really holds, by holder, so the
 * header and the summary can show that the plan holds.
 */

/** Connections a browser opens to one origin over HTTP/1.1. */
export const HTTP_LIMIT = 6;

/** The name the side queue's connection is counted under. */
export const QUEUE = "api";

/**
 * The most HTTP/1.1 connections the page can hold at once: each pane's `connections` (the
 * static field of its class; 1 when it has none) and one for the side queue.
 *
 * @param {{key: string, constructor: {connections?: number}}[]} panes
 * @returns {{parts: Object<string, number>, total: number, limit: number, fits: boolean}}
 */
export function connectionPlan(panes, limit = HTTP_LIMIT) {
  const parts = {};
  for (const pane of panes) parts[pane.key] = pane.constructor.connections ?? 1;
  parts[QUEUE] = 1;
  const total = Object.values(parts).reduce((sum, n) => sum + n, 0);
  return { parts, total, limit, fits: total <= limit };
}

/** How many connections the page holds now, and the most it held, in all and by holder. */
export class ConnectionBudget {
  /** @param {() => void} [onChange] called after every change */
  constructor(onChange = () => {}) {
    this.now = 0;
    this.peak = 0;
    this.limit = HTTP_LIMIT;
    /** connections held now, by holder (a pane's key, `QUEUE`, "probe") */
    this.held = {};
    /** the most each holder held at once */
    this.peaks = {};
    this.onChange = onChange;
  }

  /** A connection was opened by `holder`: call `give(holder)` when it closes. */
  take(holder = "page") {
    this.now += 1;
    this.peak = Math.max(this.peak, this.now);
    const held = (this.held[holder] ?? 0) + 1;
    this.held[holder] = held;
    this.peaks[holder] = Math.max(this.peaks[holder] ?? 0, held);
    this.onChange();
  }

  give(holder = "page") {
    this.now = Math.max(0, this.now - 1);
    if (this.held[holder]) this.held[holder] -= 1;
    this.onChange();
  }

  /**
   * Take a connection for `holder`; the function that gives it back, once however often it is
   * called: call it the moment the connection is closed (an abort), and again where the request
   * settles, without counting it twice.
   */
  hold(holder = "page") {
    this.take(holder);
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.give(holder);
    };
  }

  /** One line: who holds connections now ("sse 1, fetch 1, api 1"), or "none". */
  describe() {
    const parts = Object.entries(this.held).filter(([, n]) => n > 0);
    return parts.length ? parts.map(([name, n]) => `${name} ${n}`).join(", ") : "none";
  }
}

/** Runs tasks one after the other: whatever goes through it needs one connection at most. */
export class SideQueue {
  constructor() {
    this.tail = Promise.resolve();
  }

  /** Run `task` (an async function) after every task queued before it; its result. */
  run(task) {
    const result = this.tail.then(task);
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}

/**
 * A JSON API client whose calls go through one `SideQueue` and count against `budget`.
 *
 * The returned `api(method, path, body, headers)` resolves to `{ok, status, json, sent, t0,
 * t1}`: `sent` is the monotonic time the request left, `t0`/`t1` wall times around it (for
 * clock samples). It rejects only when the server is unreachable. Every call carries the
 * page's session cookie (when signed in); `headers` adds to the request's (Authorization).
 */
export function createApi({ budget, clock, queue = new SideQueue(), fetch = globalThis.fetch }) {
  return (method, path, body, headers = {}) =>
    queue.run(async () => {
      budget.take(QUEUE);
      try {
        const init = {
          method,
          cache: "no-store",
          credentials: "same-origin",
          headers: { ...headers },
        };
        if (body !== undefined) {
          init.headers["Content-Type"] = "application/json";
          init.body = JSON.stringify(body);
        }
        const sent = clock.now();
        const t0 = clock.wall();
        const response = await fetch(path, init);
        const t1 = clock.wall();
        const text = await response.text();
        let json = null;
        try {
          json = text ? JSON.parse(text) : null;
        } catch (err) {
          json = null;
        }
        return { ok: response.ok, status: response.status, json, sent, t0, t1 };
      } finally {
        budget.give(QUEUE);
      }
    });
}

/** One line for a failed API answer: "409 code: message", or the status alone. */
export function errorText(res) {
  const error = res && res.json && res.json.error;
  return error ? `${res.status} ${error.code}: ${error.message}` : `HTTP ${res ? res.status : "?"}`;
}
