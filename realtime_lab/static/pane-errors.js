/* What a pane does when its connection or request fails: the one place that decides.
 *
 * Every transport pane reports a failure as a problem, `{status, error, why, retryAfterS,
 * probe}`, to `Pane.failed()`, which asks `judge()` here what to do and what to say: give up
 * with a clear line (401: sign in, 403: not yours, another 4xx), wait out a 429's Retry-After,
 * or retry after a growing pause.
 *
 * `fetch` shows a refused request's status; `EventSource` and `WebSocket` never do (an error
 * event, a close 1006). For those the transport names a `probe` URL, and `diagnose()` asks the
 * server itself: one short `GET` of that URL, whose status (and JSON error, and Retry-After)
 * stands in for the one the browser kept to itself. Without an answer (the server is down, the
 * probe timed out) the problem stays one to retry.
 */

import { QUEUE } from "./net.js";

/** Milliseconds a probe may take before the failure is taken as a network one. */
export const PROBE_TIMEOUT_MS = 3000;
/** Seconds to wait after a 429 that names no Retry-After (the server's own default). */
export const RETRY_AFTER_DEFAULT_S = 5;
/** Retry-After values beyond this are capped: a dashboard pane should not sleep for hours. */
export const RETRY_AFTER_MAX_S = 300;

/** An HTTP error answer, with its JSON body (`{error: {code, message}}`) when it had one. */
export class HttpError extends Error {
  constructor(status, body, retryAfterS = null) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.retryAfterS = retryAfterS;
  }

  /** The error for a `fetch()` response that is not ok (reads its body): throw it. */
  static async from(response) {
    const body = await response.json().catch(() => null);
    return new HttpError(response.status, body, retryAfter(response));
  }
}

/** A response's `Retry-After` in seconds (a number of seconds only), or null. */
export function retryAfter(response) {
  const raw = response.headers && response.headers.get ? response.headers.get("Retry-After") : null;
  if (raw === null || raw === undefined || !/^\s*\d+\s*$/.test(raw)) return null;
  return Math.min(Number(raw), RETRY_AFTER_MAX_S);
}

/**
 * A problem for `Pane.failed()` from whatever a request threw: an `HttpError` keeps its status,
 * the server's error and Retry-After; anything else is a request that never got an answer.
 */
export function problemFrom(err) {
  if (err instanceof HttpError) {
    return {
      status: err.status,
      error: (err.body && err.body.error) || null,
      retryAfterS: err.retryAfterS ?? null,
    };
  }
  return { why: "request failed" };
}

/**
 * The problem a WebSocket's close event stands for.
 *
 * A close 1013 ("try again later") whose reason is not an overflow's is the server's answer to
 * one stream too many: a 429 the browser can see. A socket that closed 1006 without ever
 * opening was (most likely) refused at the handshake: `probe` is where to ask why.
 *
 * @param {{code: number, reason?: string}} event the close event
 * @param {{opened: boolean, probe?: string|null}} how whether the socket opened; a probe URL
 */
export function wsCloseProblem(event, { opened, probe = null }) {
  const reason = event.reason || "";
  const why = `closed (${event.code}${reason ? " " + reason : ""})`;
  if (event.code === 1013 && !reason.startsWith("overflow")) {
    return { status: 429, error: { code: "too-many-streams", message: reason }, why };
  }
  if (!opened && event.code === 1006 && probe) return { why, probe };
  return { why };
}

/** Whether `problem` needs `diagnose()` before `judge()` can say what it is. */
export function needsProbe(problem) {
  return Boolean(problem && problem.probe) && (problem.status ?? null) === null;
}

/**
 * `problem` with the status the server gives its `probe` URL now: `GET` it (with the page's
 * cookie), read the status, the JSON error and Retry-After, and drop the connection. A probe
 * answered 2xx/3xx, or not answered within `timeoutMs`, leaves the problem as it was (retry).
 *
 * With a `queue` (net.js `SideQueue`, the page's one queue for its own requests) the probe waits
 * its turn there and counts as the queue's connection: a WebSocket pane's probe is an HTTP
 * request, which its socket (outside Chromium's six) is not, and must not take a seventh.
 *
 * @param {object} problem a problem with a `probe` URL (see `needsProbe`)
 * @param {{fetch?: Function, budget?: {take(h): void, give(h): void},
 *          queue?: {run(task): Promise}, timeoutMs?: number}} deps
 */
export async function diagnose(
  problem,
  { fetch = globalThis.fetch, budget = null, queue = null, timeoutMs = PROBE_TIMEOUT_MS } = {},
) {
  if (!needsProbe(problem)) return problem;
  const ask = () => probe(problem, { fetch, budget, holder: queue ? QUEUE : "probe", timeoutMs });
  return queue ? queue.run(ask) : ask();
}

async function probe(problem, { fetch, budget, holder, timeoutMs }) {
  const controller = new AbortController();
  const guard = setTimeout(() => controller.abort(), timeoutMs);
  if (budget) budget.take(holder);
  try {
    const response = await fetch(problem.probe, {
      method: "GET",
      credentials: "same-origin",
      cache: "no-store",
      signal: controller.signal,
    });
    if (response.ok || response.status < 400) return problem; // it would open now: retry
    const body = await response.json().catch(() => null);
    return {
      ...problem,
      status: response.status,
      error: (body && body.error) || null,
      retryAfterS: retryAfter(response),
    };
  } catch (err) {
    return problem; // no answer: a network failure, to retry
  } finally {
    clearTimeout(guard);
    controller.abort(); // a probe that was answered with a stream must not stay open
    if (budget) budget.give(holder);
  }
}

/**
 * What a 401 and a 403 mean for the person in front of the pane: how the pane ends, its line
 * for each code it knows, and for any other code (which it then names: token-expired says more
 * than the status).
 */
const REFUSALS = {
  401: {
    end: "unauthenticated",
    codes: { unauthenticated: "401: sign in" },
    other: "401: sign in",
  },
  403: {
    end: "forbidden",
    codes: { forbidden: "403: not yours", "origin-not-allowed": "403: origin not allowed" },
    other: "403: refused",
  },
};

function refusalText(refusal, code) {
  if (!code) return refusal.other;
  return refusal.codes[code] ?? `${refusal.other} (${code})`;
}

/**
 * What to do about a problem:
 *   `{action: "give-up", end, text}`  the server refused this request and asking again would get
 *       the same answer: end the pane (`end`: "unauthenticated", "forbidden" or "error") and
 *       show `text`;
 *   `{action: "retry", text, delayMs}`  try again after `delayMs` (a 429's Retry-After; `text`
 *       says so already), or after the pane's own growing pause when `delayMs` is null (the
 *       pane adds how long to `text`).
 *
 * @param {{status?: number|null, error?: {code?: string, message?: string}|null,
 *          why?: string, retryAfterS?: number|null}} problem
 *   `status` when an HTTP status is known, `error` the server's JSON error, `why` a description
 *   when there is no status (a network failure, a closed socket), `retryAfterS` a 429's wait.
 */
export function judge({ status = null, error = null, why = null, retryAfterS = null } = {}) {
  const code = (error && error.code) || null;
  if (status === 429) {
    const seconds = retryAfterS ?? RETRY_AFTER_DEFAULT_S;
    const what = !code || code === "too-many-streams" ? "too many streams" : code;
    return {
      action: "retry",
      text: `429: ${what}, retrying in ${seconds} s`,
      delayMs: seconds * 1000,
    };
  }
  const refusal = REFUSALS[status];
  if (refusal) return { action: "give-up", end: refusal.end, text: refusalText(refusal, code) };
  if (status !== null && status >= 400 && status < 500) {
    const message = error && error.message ? error.message : "";
    return { action: "give-up", end: "error", text: `${status} ${message}` };
  }
  return {
    action: "retry",
    text: why ?? (status !== null ? `HTTP ${status}` : "request failed"),
    delayMs: null,
  };
}
