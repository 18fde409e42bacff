/* The page's own HTTP requests, and how many connections it holds.
 *
 * Connection budget (HTTP/1.1 allows six connections per origin): SSE holds one, the long poll
 * one, the short poll one for a moment per poll, and every other request (stats, clock samples,
 * buttons) goes through one queue, so the page never needs more than four.
 */

/** Connections a browser opens to one origin over HTTP/1.1. */
export const HTTP_LIMIT = 6;

/** How many connections the page holds now, and the most it held. */
export class ConnectionBudget {
  /** @param {() => void} [onChange] called after every change */
  constructor(onChange = () => {}) {
    this.now = 0;
    this.peak = 0;
    this.limit = HTTP_LIMIT;
    this.onChange = onChange;
  }

  /** A connection was opened: call `give()` when it closes. */
  take() {
    this.now += 1;
    this.peak = Math.max(this.peak, this.now);
    this.onChange();
  }

  give() {
    this.now = Math.max(0, this.now - 1);
    this.onChange();
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
      budget.take();
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
        budget.give();
      }
    });
}

/** One line for a failed API answer: "409 code: message", or the status alone. */
export function errorText(res) {
  const error = res && res.json && res.json.error;
  return error ? `${res.status} ${error.code}: ${error.message}` : `HTTP ${res ? res.status : "?"}`;
}
