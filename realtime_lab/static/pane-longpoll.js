/* Long polling: one fetch() the server holds until there is news (or its timeout). */

import { PollingPane } from "./pane-polling.js";

export default class LongPollPane extends PollingPane {
  url(after) {
    const timeout = String(this.deps.options.longpollTimeoutS());
    return `/longpoll/${encodeURIComponent(this.run.channel)}?${this.query(after, { timeout })}`;
  }

  pauseMs() {
    return 0;
  }

  requestTimeoutMs() {
    // The server answers by its timeout at the latest: allow it that, and a slow network.
    return (this.deps.options.longpollTimeoutS() + 15) * 1000;
  }
}
