/* Short polling: fetch() on a timer. */

import { PollingPane } from "./pane-polling.js";

export default class ShortPollPane extends PollingPane {
  url(after) {
    return `/poll/${encodeURIComponent(this.run.channel)}?${this.query(after)}`;
  }

  pauseMs() {
    return this.deps.options.pollIntervalMs();
  }

  requestTimeoutMs() {
    return 30000;
  }
}
