/* What short and long polling share: one GET after another, each carrying the cursor.
 *
 * A subclass says where to ask (`url(after)`), how long to wait between answers
 * (`pauseMs()`) and how long one request may take (`requestTimeoutMs()`).
 */

import { Pane } from "./pane.js";
import { HttpError, problemFrom } from "./pane-errors.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class PollingPane extends Pane {
  open(after) {
    this.cursor = after;
    this.loop(this.gen);
  }

  shut() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  }

  async loop(gen) {
    const { budget, clock } = this.deps;
    while (gen === this.gen && this.active && !this.ended) {
      const controller = new AbortController();
      this.controller = controller;
      let body;
      budget.take(this.key);
      this.m.requests += 1;
      const guard = setTimeout(() => controller.abort(), this.requestTimeoutMs());
      try {
        const response = await fetch(this.url(this.cursor), {
          signal: controller.signal,
          cache: "no-store",
          credentials: "same-origin", // the session cookie, when signed in
        });
        if (!response.ok) throw await HttpError.from(response);
        body = await response.json();
      } catch (err) {
        if (gen !== this.gen || !this.active) return; // cut or stopped: a new loop took over
        this.failed(problemFrom(err));
        return;
      } finally {
        clearTimeout(guard);
        budget.give(this.key);
        if (this.controller === controller) this.controller = null;
      }
      if (gen !== this.gen) return;
      this.opened();
      const received = clock.wall();
      for (const env of body.events) {
        this.handle(env, received);
        if (this.ended) return;
      }
      if (body.cursor) this.cursor = body.cursor;
      const pause = body.more ? 0 : this.pauseMs();
      if (pause > 0) await sleep(pause);
    }
  }

  /** The URL of the next request, from position `after`. */
  url(after) {
    throw new Error(`${this.constructor.name} does not implement url(${after})`);
  }

  /** Milliseconds between an answer with nothing more waiting and the next request. */
  pauseMs() {
    return 0;
  }

  /** Milliseconds after which a request is abandoned (and retried). */
  requestTimeoutMs() {
    return 30000;
  }
}
