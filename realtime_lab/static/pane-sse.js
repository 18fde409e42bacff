/* Server-Sent Events: one EventSource, which reconnects by itself with Last-Event-ID. */

import { Pane } from "./pane.js";

export default class SSEPane extends Pane {
  open(after) {
    const { budget } = this.deps;
    const source = new EventSource(this.url(after));
    this.source = source;
    budget.take(this.key);
    this.m.requests += 1;
    const mine = (handler) => (event) => {
      if (this.source === source) handler(event);
    };
    source.onopen = mine(() => this.opened());
    source.onmessage = mine((event) => this.frame(event.data));
    source.addEventListener(
      "end",
      mine((event) => this.frame(event.data)),
    );
    source.addEventListener(
      "reset",
      mine((event) => this.frame(event.data)),
    );
    source.addEventListener(
      "error",
      mine((event) => {
        if (event instanceof MessageEvent) {
          // The server's own `event: error` (it fell behind): the browser reconnects next.
          let data = {};
          try {
            data = JSON.parse(event.data);
          } catch (err) {
            data = {};
          }
          this.note(`server: ${data.code || "error"}, resuming after ${data.last_id || "?"}`);
          return;
        }
        if (this.ended) return;
        if (source.readyState === EventSource.CLOSED) {
          // The browser gave up (an HTTP error status it does not show us): ask the server
          // what it was, then reconnect ourselves with ?after, or say why not.
          this.shut();
          this.failed({
            why: "the stream failed",
            probe: this.url(this.resumeFrom(), false),
          });
        } else {
          // The browser reconnects by itself after `retry:` ms, sending Last-Event-ID.
          this.m.requests += 1;
          this.reconnecting();
        }
      }),
    );
  }

  /** The stream's URL from `after`; `tagged` false for a probe (see Pane.query). */
  url(after, tagged = true) {
    return `/sse/${encodeURIComponent(this.run.channel)}?${this.query(after, {}, tagged)}`;
  }

  shut() {
    if (this.source) {
      this.source.close();
      this.source = null;
      this.deps.budget.give(this.key);
    }
  }
}
