/* WebSocket: one socket; the browser does not resume it, so the pane reconnects with ?after. */

import { Pane } from "./pane.js";
import { wsCloseProblem } from "./pane-errors.js";

export default class WSPane extends Pane {
  // Chromium pools WebSockets apart from the six HTTP/1.1 connections per origin (other browsers
  // may not), and its probe after a refused handshake waits in the page's queue.
  static connections = 0;

  open(after) {
    const url = new URL(
      `/ws/${encodeURIComponent(this.run.channel)}?${this.query(after)}`,
      this.deps.base,
    );
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url);
    this.socket = socket;
    this.m.requests += 1;
    let wasOpen = false;
    socket.onopen = () => {
      wasOpen = true;
      if (this.socket === socket) this.opened();
    };
    socket.onmessage = (event) => {
      if (this.socket === socket) this.frame(event.data);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.ended || !this.active) return;
      // A refused handshake is a bare 1006 to us: the probe asks the server's poll endpoint
      // about the same channel and position (the same access checks, and it holds no stream).
      this.failed(wsCloseProblem(event, { opened: wasOpen, probe: this.probeUrl(after) }));
    };
  }

  /** Where to ask why a handshake from `after` was refused (see pane-errors.js diagnose). */
  probeUrl(after) {
    const query = this.query(after, { limit: "1" }, false);
    return new URL(`/poll/${encodeURIComponent(this.run.channel)}?${query}`, this.deps.base).href;
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
