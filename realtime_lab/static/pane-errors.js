/* What a pane does when its connection or request fails: the one place that decides.
 *
 * Every transport pane reports a failure as a problem, `{status, error, why}`, to
 * `Pane.failed()`, which asks `judge()` here what to do and what to say. New answers
 * (a sign-in for 401/403, waiting out a 429's Retry-After) belong in `judge()`, as new actions
 * `Pane.failed()` carries out; no transport module needs to change for them.
 */

/** An HTTP error answer, with its JSON body (`{error: {code, message}}`) when it had one. */
export class HttpError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body;
  }

  /** The error for a `fetch()` response that is not ok (reads its body): throw it. */
  static async from(response) {
    const body = await response.json().catch(() => null);
    return new HttpError(response.status, body);
  }
}

/**
 * A problem for `Pane.failed()` from whatever a request threw: an `HttpError` keeps its status
 * and the server's error; anything else is a request that never got an answer.
 */
export function problemFrom(err) {
  if (err instanceof HttpError) {
    return { status: err.status, error: (err.body && err.body.error) || null };
  }
  return { why: "request failed" };
}

/**
 * What to do about a problem: `{action: "give-up", text}` (the server refused this request;
 * asking again would get the same answer) or `{action: "retry", text}` (try again later).
 *
 * @param {{status?: number|null, error?: {code?: string, message?: string}|null,
 *          why?: string}} problem
 *   `status` when an HTTP status is known, `error` the server's JSON error, `why` a description
 *   when there is no status (a network failure, a closed socket).
 */
export function judge({ status = null, error = null, why = null } = {}) {
  if (status !== null && status >= 400 && status < 500) {
    return { action: "give-up", text: `${status} ${error && error.message ? error.message : ""}` };
  }
  return { action: "retry", text: why ?? (status !== null ? `HTTP ${status}` : "request failed") };
}
