/* WebSocket: one socket; the browser does not resume it, so the pane reconnects with ?after. */

import { Pane } from "./pane.js";

export default class WSPane extends Pane {
  open(after) {
    const url = new URL(
      `/ws/${encodeURIComponent(this.run.channel)}?${this.query(after)}`,
      this.deps.base,
    );
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url);
    this.socket = socket;
    this.m.requests += 1;
    socket.onopen = () => {
      if (this.socket === socket) this.opened();
    };
    socket.onmessage = (event) => {
      if (this.socket === socket) this.frame(event.data);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.ended || !this.active) return;
      this.failed({ why: `closed (${event.code}${event.reason ? " " + event.reason : ""})` });
    };
  }

  shut(code = 1000, reason = "") {
    const socket = this.socket;
    if (!socket) return;
    this.socket = null;
    if (socket.readyState === WebSocket.CONNECTING) {
      // Closing a socket that is still connecting makes the browser log an error.
      socket.onopen = () => socket.close(code, reason);
    } else if (socket.readyState === WebSocket.OPEN) {
      socket.close(code, reason);
    }
  }
}
