/* Realtime Lab dashboard.
 *
 * Four panes stream the same channel at once, each with the browser's own API: fetch() on a timer
 * (short polling), one waiting fetch() (long polling), EventSource (SSE) and WebSocket. Every pane
 * checks the event ids itself ("<epoch>-<seq>", seq +1 per event): a jump is a gap, an id at or
 * below the last one is a duplicate and is dropped, a `reset` event re-bases the count.
 *
 * Connection budget (HTTP/1.1 allows six connections per origin): SSE holds one, the long poll
 * one, the short poll one for a moment per poll, and every other request (stats, clock samples,
 * buttons) goes through one queue (`side`), so the page never needs more than four.
 *
 * No build step, no dependencies: the charts are drawn on plain canvases.
 */
"use strict";

(() => {
  const HTTP_LIMIT = 6;
  const MAX_SAMPLES = 5000; // latency samples kept per pane (percentiles over the last ones)
  const MAX_POINTS = 2000; // chart points kept per series
  const MAX_TEXT = 6000; // characters kept in a pane on the never-ending ticker
  const COLORS = { poll: "#d9480f", longpoll: "#7048e8", sse: "#1971c2", ws: "#2f9e44" };
  const LABELS = { poll: "Short poll", longpoll: "Long poll", sse: "SSE", ws: "WebSocket" };

  const $ = (selector, root = document) => root.querySelector(selector);
  const wallNow = () => performance.timeOrigin + performance.now();
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const pageId = Math.random().toString(36).slice(2, 8);

  // ---- connection budget --------------------------------------------------------------------
  const budget = {
    now: 0,
    peak: 0,
    take() {
      this.now += 1;
      this.peak = Math.max(this.peak, this.now);
      ui.dirty();
    },
    give() {
      this.now = Math.max(0, this.now - 1);
      ui.dirty();
    },
  };

  // Every request that is not a pane's own goes through this queue: one connection at most.
  let sideTail = Promise.resolve();
  function side(task) {
    const result = sideTail.then(task);
    sideTail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }

  /** A JSON API call through the side queue: {ok, status, json, sent, received, t0, t1}. */
  function api(method, path, body) {
    return side(async () => {
      budget.take();
      try {
        const init = { method, cache: "no-store", headers: {} };
        if (body !== undefined) {
          init.headers["Content-Type"] = "application/json";
          init.body = JSON.stringify(body);
        }
        const sent = performance.now();
        const t0 = wallNow();
        const response = await fetch(path, init);
        const t1 = wallNow();
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

  function errorText(res) {
    const error = res && res.json && res.json.error;
    return error ? `${res.status} ${error.code}: ${error.message}` : `HTTP ${res ? res.status : "?"}`;
  }

  // ---- clock offset (server minus browser), NTP-style ----------------------------------------
  const clock = {
    offset: 0,
    rtt: null,
    samples: [],
    lastSample: 0,
    /** Keep the sample with the shortest round trip: its midpoint is the least uncertain. */
    add(t0, t1, serverMs) {
      this.samples.push({ offset: serverMs - (t0 + t1) / 2, rtt: t1 - t0 });
      if (this.samples.length > 20) this.samples.shift();
      const best = this.samples.reduce((a, b) => (b.rtt < a.rtt ? b : a));
      this.offset = best.offset;
      this.rtt = best.rtt;
      this.lastSample = performance.now();
      ui.dirty();
    },
    /** Server time (ms) for a browser wall-clock time. */
    server(browserMs) {
      return browserMs + this.offset;
    },
  };

  let config = null;

  async function readConfig() {
    const res = await api("GET", "/api/config");
    if (!res.ok || !res.json) return null;
    clock.add(res.t0, res.t1, res.json.server_time_ms);
    config = res.json;
    $("#chaos").hidden = !config.chaos;
    return config;
  }

  // ---- id arithmetic ------------------------------------------------------------------------
  function parseId(id) {
    if (typeof id !== "string") return null;
    const dash = id.lastIndexOf("-");
    if (dash <= 0) return null;
    const seq = Number(id.slice(dash + 1));
    return Number.isSafeInteger(seq) ? { epoch: id.slice(0, dash), seq } : null;
  }

  function percentile(sorted, p) {
    if (!sorted.length) return null;
    const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
    return sorted[rank];
  }

  class HttpError extends Error {
    constructor(status, body) {
      super(`HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  // ---- panes --------------------------------------------------------------------------------
  class Pane {
    constructor(root) {
      this.root = root;
      this.key = root.dataset.transport;
      this.stateEl = $("[data-role=state]", root);
      this.answerEl = $("[data-role=answer]", root);
      this.noteEl = $("[data-role=note]", root);
      this.cutEl = $("[data-role=cut]", root);
      this.metricEls = {};
      for (const dd of root.querySelectorAll("[data-metric]")) {
        this.metricEls[dd.dataset.metric] = dd;
      }
      this.cutEl.addEventListener("click", () => this.cut());
      this.gen = 0;
      this.active = false;
      this.run = null;
      this.tag = null;
      this.state = "closed";
      this.clear();
    }

    clear() {
      this.m = {
        tokens: 0,
        gaps: 0,
        duplicates: 0,
        outOfOrder: 0,
        resets: 0,
        reconnects: 0,
        requests: 0,
        failures: 0,
        ttft: null,
        latencies: [],
        latencyPoints: [],
        bytesPoints: [[0, 0]],
        server: null,
      };
      this.epoch = null;
      this.seq = 0;
      this.lastId = null;
      this.cursor = null;
      this.missing = new Set();
      this.ended = null;
      this.wasDown = false;
      this.backoffMs = 0;
      this.textNode = document.createTextNode("");
      this.answerEl.replaceChildren(this.textNode);
      this.noteEl.textContent = "";
      this.root.dataset.end = "";
    }

    /** Start streaming `run.channel` from `run.after` ("" = all history, "now" = new only). */
    begin(run) {
      this.stop();
      this.clear();
      this.run = run;
      this.tag = `${run.id}-${this.key}`;
      this.active = true;
      this.gen += 1;
      this.cutEl.disabled = false;
      this.setState("connecting");
      this.open(this.resumeFrom());
    }

    resumeFrom() {
      return this.lastId ?? this.cursor ?? this.run.after;
    }

    query(after, extra = {}) {
      const params = new URLSearchParams({ client: this.tag, ...extra });
      if (after) params.set("after", after);
      return params.toString();
    }

    stop() {
      if (!this.active) return;
      this.active = false;
      this.gen += 1;
      this.shut();
      this.cutEl.disabled = true;
      this.setState("closed");
      if (!this.ended) this.note("stopped");
    }

    /** "cut connection": drop our own connection and resume from the last id we hold. */
    cut() {
      if (!this.active || this.ended) return;
      this.gen += 1;
      this.shut(4000, "cut by the dashboard");
      this.wasDown = true;
      this.setState("reconnecting");
      this.note(`cut; resuming after ${this.resumeFrom() || "the start"}`);
      this.open(this.resumeFrom());
    }

    /** A failure: try again after a growing pause, from the last id. */
    retryLater(why) {
      this.wasDown = true;
      this.m.failures += 1;
      this.setState("reconnecting");
      this.backoffMs = Math.min(this.backoffMs ? this.backoffMs * 2 : 200, 5000);
      if (why) this.note(`${why}; retrying in ${this.backoffMs} ms`);
      const gen = this.gen;
      setTimeout(() => {
        if (gen === this.gen && this.active && !this.ended) this.open(this.resumeFrom());
      }, this.backoffMs);
    }

    /** The connection (or a poll) succeeded. */
    opened() {
      if (this.wasDown) {
        this.m.reconnects += 1;
        this.wasDown = false;
        this.note(`reconnected (${this.m.reconnects}); resumed after ${this.resumeFrom() || "the start"}`);
      }
      this.backoffMs = 0;
      if (this.state !== "open") this.setState("open");
    }

    giveUp(message) {
      this.note(message);
      this.finish("error");
    }

    setState(state) {
      this.state = state;
      this.root.dataset.state = state;
      this.stateEl.textContent = state;
      ui.dirty();
    }

    note(text) {
      this.noteEl.textContent = text;
      this.noteEl.title = text;
    }

    /** One envelope off the wire (a JSON string). */
    frame(text, received = wallNow()) {
      let envelope;
      try {
        envelope = JSON.parse(text);
      } catch (err) {
        this.note("a message that is not JSON was ignored");
        return;
      }
      this.handle(envelope, received);
    }

    handle(env, received) {
      if (this.ended || !env || typeof env !== "object") return;
      const id = parseId(env.id);
      if (id === null) {
        // Not an event of the channel: an error about this connection (WebSocket).
        const data = env.data || {};
        this.note(`server: ${data.code || env.type || "message"} ${data.message || ""}`.trim());
        return;
      }
      if (env.type === "reset") {
        // History could not reach back to our position: say so and count from here.
        this.m.resets += 1;
        const data = env.data || {};
        this.note(`reset (${data.reason}): events may be missing before ${data.oldest || "now"}`);
        this.epoch = id.epoch;
        this.seq = id.seq;
        this.lastId = env.id;
        this.missing.clear();
        ui.dirty();
        return;
      }
      if (this.epoch === null) {
        if (this.run.after === "" && id.seq > 1) this.countGap(1, id.seq - 1, id.epoch);
      } else if (id.epoch !== this.epoch) {
        this.m.gaps += 1; // a new channel life without a reset: something was lost unsaid
        this.missing.clear();
      } else if (id.seq <= this.seq) {
        const key = `${id.epoch}-${id.seq}`;
        if (this.missing.delete(key)) this.m.outOfOrder += 1;
        else this.m.duplicates += 1;
        ui.dirty();
        return; // dropped: the text already holds it, or its place has passed
      } else if (id.seq > this.seq + 1) {
        this.countGap(this.seq + 1, id.seq - 1, id.epoch);
      }
      this.epoch = id.epoch;
      this.seq = id.seq;
      this.lastId = env.id;
      if (env.type === "token") {
        this.token(env, received);
      } else if (env.type === "end") {
        const reason = (env.data && env.data.reason) || "done";
        this.finish(reason);
      } else if (env.type === "error") {
        const data = env.data || {};
        this.note(`error event: ${data.code || ""} ${data.message || ""}`);
      }
      ui.dirty();
    }

    countGap(first, last, epoch) {
      this.m.gaps += last - first + 1;
      for (let seq = first; seq <= last && this.missing.size < 1000; seq += 1) {
        this.missing.add(`${epoch}-${seq}`);
      }
    }

    token(env, received) {
      const text = (env.data && env.data.text) || "";
      this.textNode.appendData(text);
      if (this.textNode.length > MAX_TEXT && this.run.mode === "ticker") {
        this.textNode.deleteData(0, this.textNode.length - MAX_TEXT / 2);
      }
      this.m.tokens += 1;
      if (this.m.ttft === null) this.m.ttft = performance.now() - this.run.t0;
      if (typeof env.ts === "number") {
        const latency = clock.server(received) - env.ts;
        this.m.latencies.push(latency);
        if (this.m.latencies.length > MAX_SAMPLES) this.m.latencies.shift();
        const t = (performance.now() - this.run.t0) / 1000;
        this.m.latencyPoints.push([t, latency]);
        if (this.m.latencyPoints.length > MAX_POINTS) this.m.latencyPoints.shift();
      }
      this.scrollPending = true;
    }

    finish(reason) {
      if (this.ended) return;
      this.ended = reason;
      this.active = false;
      this.gen += 1;
      this.shut();
      this.cutEl.disabled = true;
      this.root.dataset.end = reason;
      this.setState("closed");
      if (reason !== "done") this.note(`ended: ${reason}`);
      app.paneEnded(this);
    }

    latency() {
      const sorted = [...this.m.latencies].sort((a, b) => a - b);
      return {
        p50: percentile(sorted, 50),
        p95: percentile(sorted, 95),
        max: sorted.length ? sorted[sorted.length - 1] : null,
        n: sorted.length,
      };
    }

    summary() {
      const server = this.m.server;
      const bytes = server ? server.bytes : null;
      return {
        transport: this.key,
        label: LABELS[this.key],
        state: this.state,
        end: this.ended,
        tokens: this.m.tokens,
        text_length: this.textNode.length,
        ttft_ms: this.m.ttft,
        latency_ms: this.latency(),
        gaps: this.m.gaps,
        duplicates: this.m.duplicates,
        out_of_order: this.m.outOfOrder,
        resets: this.m.resets,
        reconnects: this.m.reconnects,
        failures: this.m.failures,
        requests_browser: this.m.requests,
        requests_server: server ? server.requests : null,
        bytes,
        bytes_per_token: bytes !== null && this.m.tokens ? bytes / this.m.tokens : null,
        server,
      };
    }
  }

  /** Short and long polling share the loop; they differ in the endpoint and the pause. */
  class PollPane extends Pane {
    open(after) {
      this.cursor = after;
      this.loop(this.gen);
    }

    shut() {
      if (this.controller) this.controller.abort();
      this.controller = null;
    }

    async loop(gen) {
      while (gen === this.gen && this.active && !this.ended) {
        const controller = new AbortController();
        this.controller = controller;
        let body;
        budget.take();
        this.m.requests += 1;
        const guard = setTimeout(() => controller.abort(), this.requestTimeoutMs());
        try {
          const response = await fetch(this.url(this.cursor), {
            signal: controller.signal,
            cache: "no-store",
          });
          if (!response.ok) {
            const detail = await response.json().catch(() => null);
            throw new HttpError(response.status, detail);
          }
          body = await response.json();
        } catch (err) {
          if (gen !== this.gen || !this.active) return; // cut or stopped: a new loop took over
          if (err instanceof HttpError && err.status >= 400 && err.status < 500) {
            const error = err.body && err.body.error;
            this.giveUp(`${err.status} ${error ? error.message : ""}`);
            return;
          }
          const why = err instanceof HttpError ? `HTTP ${err.status}` : "request failed";
          this.retryLater(why);
          return;
        } finally {
          clearTimeout(guard);
          budget.give();
          if (this.controller === controller) this.controller = null;
        }
        if (gen !== this.gen) return;
        this.opened();
        const received = wallNow();
        for (const env of body.events) {
          this.handle(env, received);
          if (this.ended) return;
        }
        if (body.cursor) this.cursor = body.cursor;
        const pause = body.more ? 0 : this.pauseMs();
        if (pause > 0) await sleep(pause);
      }
    }
  }

  class ShortPollPane extends PollPane {
    url(after) {
      return `/poll/${encodeURIComponent(this.run.channel)}?${this.query(after)}`;
    }
    pauseMs() {
      return Number($("#poll-ms").value);
    }
    requestTimeoutMs() {
      return 30000;
    }
  }

  class LongPollPane extends PollPane {
    url(after) {
      const timeout = $("#longpoll-s").value;
      return `/longpoll/${encodeURIComponent(this.run.channel)}?${this.query(after, { timeout })}`;
    }
    pauseMs() {
      return 0;
    }
    requestTimeoutMs() {
      return (Number($("#longpoll-s").value) + 15) * 1000;
    }
  }

  class SSEPane extends Pane {
    open(after) {
      const source = new EventSource(
        `/sse/${encodeURIComponent(this.run.channel)}?${this.query(after)}`,
      );
      this.source = source;
      budget.take();
      this.m.requests += 1;
      const mine = (handler) => (event) => {
        if (this.source === source) handler(event);
      };
      source.onopen = mine(() => this.opened());
      source.onmessage = mine((event) => this.frame(event.data));
      source.addEventListener("end", mine((event) => this.frame(event.data)));
      source.addEventListener("reset", mine((event) => this.frame(event.data)));
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
          this.wasDown = true;
          if (source.readyState === EventSource.CLOSED) {
            // The browser gave up (an HTTP error status): reconnect ourselves, with ?after.
            this.shut();
            this.retryLater("the stream failed");
          } else {
            // The browser reconnects by itself after `retry:` ms, sending Last-Event-ID.
            this.m.requests += 1;
            this.setState("reconnecting");
          }
        }),
      );
    }

    shut() {
      if (this.source) {
        this.source.close();
        this.source = null;
        budget.give();
      }
    }
  }

  class WSPane extends Pane {
    open(after) {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const path = `/ws/${encodeURIComponent(this.run.channel)}?${this.query(after)}`;
      const socket = new WebSocket(`${scheme}//${location.host}${path}`);
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
        this.retryLater(`closed (${event.code}${event.reason ? " " + event.reason : ""})`);
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

  // ---- charts (plain canvas) ----------------------------------------------------------------
  function niceStep(span, ticks) {
    const raw = span / Math.max(ticks, 1);
    const power = 10 ** Math.floor(Math.log10(raw || 1));
    const scaled = raw / power;
    return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * power;
  }

  class Chart {
    constructor(canvas, format) {
      this.canvas = canvas;
      this.format = format;
    }

    draw(series, { dots = false } = {}) {
      const canvas = this.canvas;
      const ratio = window.devicePixelRatio || 1;
      const width = canvas.clientWidth;
      const height = canvas.clientHeight;
      if (!width || !height) return;
      if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
        canvas.width = Math.round(width * ratio);
        canvas.height = Math.round(height * ratio);
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      ctx.font = "11px system-ui, sans-serif";
      const left = 52;
      const right = 8;
      const top = 20;
      const bottom = 18;
      const plotW = width - left - right;
      const plotH = height - top - bottom;

      let xMax = 1;
      let yMin = 0;
      let yMax = 0;
      for (const s of series) {
        for (const [x, y] of s.points) {
          if (x > xMax) xMax = x;
          if (y > yMax) yMax = y;
          if (y < yMin) yMin = y;
        }
      }
      const yStep = niceStep(yMax - yMin || 1, 4);
      yMax = Math.max(yStep, Math.ceil(yMax / yStep) * yStep);
      yMin = Math.floor(yMin / yStep) * yStep;
      const xStep = niceStep(xMax, 6);
      xMax = Math.ceil(xMax / xStep) * xStep;
      const px = (x) => left + (x / xMax) * plotW;
      const py = (y) => top + plotH - ((y - yMin) / (yMax - yMin)) * plotH;

      ctx.strokeStyle = "#e3e7ec";
      ctx.fillStyle = "#5f6b7a";
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (let y = yMin; y <= yMax + yStep / 2; y += yStep) {
        ctx.beginPath();
        ctx.moveTo(left, Math.round(py(y)) + 0.5);
        ctx.lineTo(left + plotW, Math.round(py(y)) + 0.5);
        ctx.stroke();
        ctx.fillText(this.format(y), left - 6, py(y));
      }
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      for (let x = 0; x <= xMax + xStep / 2; x += xStep) {
        ctx.fillText(`${+x.toFixed(2)}s`, px(x), top + plotH + 4);
      }

      let legendX = left;
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      for (const s of series) {
        ctx.fillStyle = s.color;
        ctx.fillRect(legendX, 6, 10, 10);
        ctx.fillStyle = "#1d232b";
        ctx.fillText(s.label, legendX + 14, 11);
        legendX += ctx.measureText(s.label).width + 30;
      }

      let any = false;
      for (const s of series) {
        if (!s.points.length) continue;
        any = true;
        ctx.strokeStyle = s.color;
        ctx.fillStyle = s.color;
        ctx.lineWidth = 1.5;
        ctx.globalAlpha = dots ? 0.45 : 1;
        ctx.beginPath();
        s.points.forEach(([x, y], i) => (i ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
        ctx.stroke();
        if (dots) {
          ctx.globalAlpha = 0.9;
          for (const [x, y] of s.points) ctx.fillRect(px(x) - 1.5, py(y) - 1.5, 3, 3);
        }
        ctx.globalAlpha = 1;
      }
      if (!any) {
        ctx.fillStyle = "#8a94a3";
        ctx.textAlign = "center";
        ctx.fillText("no data yet", left + plotW / 2, top + plotH / 2);
      }
    }
  }

  // ---- formatting ---------------------------------------------------------------------------
  function fmtMs(value) {
    if (value === null || value === undefined) return "–";
    return Math.abs(value) < 10 ? value.toFixed(1) : String(Math.round(value));
  }
  function fmtBytes(value) {
    if (value === null || value === undefined) return "–";
    if (value < 10000) return `${Math.round(value)} B`;
    if (value < 10e6) return `${(value / 1024).toFixed(1)} kB`;
    return `${(value / 1048576).toFixed(1)} MB`;
  }
  function fmtNum(value, digits = 0) {
    return value === null || value === undefined ? "–" : value.toFixed(digits);
  }

  const COLUMNS = [
    ["transport", "transport", (p) => p.label],
    ["state", "state", (p) => (p.end ? `${p.state} (${p.end})` : p.state)],
    ["ttft", "TTFT ms", (p) => fmtMs(p.ttft_ms)],
    ["p50", "p50 ms", (p) => fmtMs(p.latency_ms.p50)],
    ["p95", "p95 ms", (p) => fmtMs(p.latency_ms.p95)],
    ["max", "max ms", (p) => fmtMs(p.latency_ms.max)],
    ["tokens", "tokens", (p) => String(p.tokens)],
    ["gaps", "gaps", (p) => String(p.gaps)],
    ["dups", "dups", (p) => String(p.duplicates)],
    ["ooo", "out of order", (p) => String(p.out_of_order)],
    ["resets", "resets", (p) => String(p.resets)],
    ["reconnects", "reconnects", (p) => String(p.reconnects)],
    ["requests", "requests", (p) => fmtNum(p.requests_server ?? p.requests_browser)],
    ["bytes", "bytes", (p) => fmtBytes(p.bytes)],
    ["bpt", "bytes/token", (p) => fmtNum(p.bytes_per_token, 1)],
  ];

  // ---- the page -----------------------------------------------------------------------------
  const panes = [
    new ShortPollPane($("#pane-poll")),
    new LongPollPane($("#pane-longpoll")),
    new SSEPane($("#pane-sse")),
    new WSPane($("#pane-ws")),
  ];
  const charts = {
    latency: new Chart($("#chart-latency"), (v) => `${+v.toFixed(1)}`),
    bytes: new Chart($("#chart-bytes"), (v) => fmtBytes(v)),
  };

  const app = {
    run: null,
    runs: 0,

    params() {
      return {
        prompt: $("#prompt").value.trim(),
        seed: Math.trunc(Number($("#seed").value) || 0),
        ttft_ms: Number($("#ttft-ms").value),
        token_ms: Number($("#token-ms").value),
        max_tokens: Math.max(1, Math.trunc(Number($("#max-tokens").value) || 1)),
      };
    },

    begin(mode, channel, extra) {
      this.stopAll();
      this.runs += 1;
      const run = {
        id: `${pageId}-${this.runs}`,
        mode,
        channel,
        after: mode === "chat" ? "" : "now",
        t0: extra.t0 ?? performance.now(),
        startedAt: new Date().toISOString(),
        endedAt: null,
        statsFinal: false,
        chat: extra.chat || null,
        params: extra.params || null,
        client: {
          poll_interval_ms: Number($("#poll-ms").value),
          longpoll_timeout_s: Number($("#longpoll-s").value),
        },
      };
      this.run = run;
      for (const pane of panes) pane.begin(run);
      $("#copy-md").disabled = false;
      $("#download-json").disabled = false;
      setStatus(mode === "chat" ? `streaming chat ${extra.chat.id}` : "streaming the ticker");
      ui.dirty();
      return run;
    },

    stopAll() {
      for (const pane of panes) pane.stop();
      this.maybeFinished();
    },

    paneEnded() {
      this.maybeFinished();
    },

    maybeFinished() {
      const run = this.run;
      if (!run || run.endedAt !== null || panes.some((pane) => pane.active)) return;
      run.endedAt = performance.now();
      const ended = panes.every((pane) => pane.ended === "done");
      setStatus(ended ? "done: all four panes finished" : "stopped");
      // The server folds a connection's last bytes in as it closes: read them once settled.
      setTimeout(() => {
        pollStats(run).then(() => {
          run.statsFinal = true;
          ui.dirty();
        });
      }, 400);
    },

    async startChat() {
      const params = this.params();
      if (!params.prompt) return;
      if ($("#ticker").checked) {
        $("#ticker").checked = false;
        $("#ticker-rate-label").hidden = true;
      }
      this.stopAll();
      setStatus("starting a chat…");
      let res;
      try {
        res = await api("POST", "/api/chats", params);
      } catch (err) {
        setStatus("could not reach the server");
        return;
      }
      if (!res.ok || !res.json) {
        setStatus(`the server refused the chat: ${errorText(res)}`);
        return;
      }
      this.begin("chat", res.json.channel, { chat: res.json, params, t0: res.sent });
    },

    startTicker() {
      $("#ticker-rate-label").hidden = false;
      this.begin("ticker", "ticker", {});
      if (config && !config.ticker_rate) {
        setStatus("streaming the ticker (its rate is 0: raise it to see tokens)");
      }
    },

    summary() {
      const run = this.run;
      const out = {
        generated_at: new Date().toISOString(),
        run: run && {
          id: run.id,
          mode: run.mode,
          channel: run.channel,
          started_at: run.startedAt,
          duration_s: run.endedAt !== null ? (run.endedAt - run.t0) / 1000 : null,
          chat: run.params,
          client: run.client,
          heartbeat_s: config ? config.heartbeat : null,
        },
        finished: Boolean(run && run.endedAt !== null),
        stats_final: Boolean(run && run.statsFinal),
        clock: { offset_ms: clock.offset, rtt_ms: clock.rtt },
        connections: { now: budget.now, peak: budget.peak, limit: HTTP_LIMIT },
        panes: {},
      };
      for (const pane of panes) {
        const s = pane.summary();
        delete s.server;
        out.panes[pane.key] = s;
      }
      return out;
    },

    markdown() {
      const summary = this.summary();
      const rows = panes.map((pane) => COLUMNS.map(([, , cell]) => cell(pane.summary())));
      const head = COLUMNS.map(([, title]) => title);
      const line = (cells) => `| ${cells.join(" | ")} |`;
      const run = summary.run;
      const lines = [];
      if (run) {
        const what =
          run.mode === "chat"
            ? `chat, token pace ${run.chat.token_ms} ms, TTFT ${run.chat.ttft_ms} ms, ` +
              `seed ${run.chat.seed}, max ${run.chat.max_tokens} tokens`
            : "ticker";
        lines.push(
          `Realtime Lab run ${run.id} (${what}; short-poll interval ` +
            `${run.client.poll_interval_ms} ms, long-poll timeout ${run.client.longpoll_timeout_s} s)`,
          "",
        );
      }
      lines.push(line(head), line(head.map((_, i) => (i === 0 ? "---" : "---:"))));
      for (const row of rows) lines.push(line(row));
      return lines.join("\n");
    },
  };

  function setStatus(text) {
    $("#run-status").textContent = text;
  }

  async function pollStats(run) {
    for (const pane of panes) {
      if (app.run !== run || pane.run !== run) return;
      let res;
      try {
        res = await api("GET", `/api/stats?client=${encodeURIComponent(pane.tag)}`);
      } catch (err) {
        return; // the server is unreachable right now; the next round tries again
      }
      if (!res.ok || !res.json || !res.json.client) continue;
      // Stats answers carry the server clock too: more samples, a shorter best round trip.
      if (typeof res.json.server_time_ms === "number") {
        clock.add(res.t0, res.t1, res.json.server_time_ms);
      }
      pane.m.server = res.json.client;
      const t = (performance.now() - run.t0) / 1000;
      pane.m.bytesPoints.push([t, res.json.client.bytes]);
      if (pane.m.bytesPoints.length > MAX_POINTS) pane.m.bytesPoints.shift();
    }
    ui.dirty();
  }

  async function background() {
    for (;;) {
      await sleep(1000);
      const run = app.run;
      try {
        if (run && run.endedAt === null) await pollStats(run);
        if (performance.now() - clock.lastSample > 10000) await readConfig();
      } catch (err) {
        // unreachable server: the panes show it; keep trying
      }
    }
  }

  // ---- rendering ----------------------------------------------------------------------------
  const ui = {
    timer: null,
    dirty() {
      if (this.timer === null) this.timer = setTimeout(() => this.render(), 100);
    },
    render() {
      this.timer = null;
      const run = app.run;
      // Tests (and people) can tell from the page itself whether the figures are final.
      document.body.dataset.run = !run
        ? "idle"
        : run.statsFinal
          ? "final"
          : run.endedAt !== null
            ? "ended"
            : "running";
      $("#conn-now").textContent = budget.now;
      $("#conn-peak").textContent = budget.peak;
      $("#clock-offset").textContent =
        clock.rtt === null ? "?" : `${fmtMs(clock.offset)} ms (rtt ${fmtMs(clock.rtt)} ms)`;
      const summaries = panes.map((pane) => pane.summary());
      panes.forEach((pane, i) => renderPane(pane, summaries[i]));
      renderSummary(summaries);
      renderFindings(summaries);
      charts.latency.draw(
        panes.map((pane) => ({
          label: LABELS[pane.key],
          color: COLORS[pane.key],
          points: pane.m.latencyPoints,
        })),
        { dots: true },
      );
      charts.bytes.draw(
        panes.map((pane) => ({
          label: LABELS[pane.key],
          color: COLORS[pane.key],
          points: pane.m.bytesPoints,
        })),
      );
    },
  };

  function renderPane(pane, s) {
    const set = (name, text, bad = false) => {
      const el = pane.metricEls[name];
      if (!el) return;
      el.textContent = text;
      el.classList.toggle("bad", bad);
    };
    const lat = s.latency_ms;
    set("ttft", s.ttft_ms === null ? "–" : `${fmtMs(s.ttft_ms)} ms`);
    const slash = "\u2009/\u2009"; // thin spaces: the figures stay readable in a narrow pane
    set("latency", lat.n ? [lat.p50, lat.p95, lat.max].map(fmtMs).join(slash) + " ms" : "–");
    set("tokens", String(s.tokens));
    set(
      "integrity",
      [s.gaps, s.duplicates, s.out_of_order].join(slash),
      s.gaps + s.duplicates + s.out_of_order > 0,
    );
    set("resets", String(s.resets), s.resets > 0);
    set("reconnects", String(s.reconnects));
    set("requests", `${s.requests_browser}${slash}${s.requests_server ?? "–"}`);
    set("bytes", fmtBytes(s.bytes));
    set("bpt", s.bytes_per_token === null ? "–" : `${s.bytes_per_token.toFixed(1)} B`);
    if (pane.scrollPending) {
      pane.scrollPending = false;
      pane.answerEl.scrollTop = pane.answerEl.scrollHeight;
    }
  }

  function renderSummary(summaries) {
    const table = $("#summary-table");
    if (!table.tHead.rows.length) {
      const row = table.tHead.insertRow();
      for (const [key, title] of COLUMNS) {
        const th = document.createElement("th");
        th.textContent = title;
        th.dataset.col = key;
        row.appendChild(th);
      }
    }
    const body = table.tBodies[0];
    summaries.forEach((s, i) => {
      const row = body.rows[i] || body.insertRow();
      row.dataset.transport = s.transport;
      COLUMNS.forEach(([key, , cell], j) => {
        const td = row.cells[j] || row.insertCell();
        td.dataset.col = key;
        td.textContent = cell(s);
      });
    });
  }

  /** Plain-language findings, written from the numbers of this run. */
  function renderFindings(summaries) {
    const el = $("#findings");
    const run = app.run;
    const by = Object.fromEntries(summaries.map((s) => [s.transport, s]));
    if (!run || !summaries.some((s) => s.tokens > 0)) return;
    const items = [];
    const perToken = (s) => (s.tokens ? (s.requests_server ?? s.requests_browser) / s.tokens : 0);
    const bpt = (s) => (s.bytes_per_token === null ? "?" : `${s.bytes_per_token.toFixed(0)} B`);
    const p50 = (s) => `${fmtMs(s.latency_ms.p50)} ms`;
    const poll = by.poll;
    const longpoll = by.longpoll;
    const sse = by.sse;
    const ws = by.ws;
    const batch = (s) => (perToken(s) ? (1 / perToken(s)).toFixed(1) : "?");
    items.push(
      `<b>Short polling</b> made ${poll.requests_server ?? poll.requests_browser} requests for ` +
        `${poll.tokens} tokens (${perToken(poll).toFixed(1)} per token) at a ` +
        `${run.client.poll_interval_ms} ms interval: ${bpt(poll)} per token, median latency ` +
        `${p50(poll)}. ` +
        (perToken(poll) > 1
          ? "Most of its requests came back empty: a short interval buys latency with requests."
          : `Each poll collected ${batch(poll)} tokens on average: few requests, but a token ` +
            "waits up to one interval."),
      `<b>Long polling</b> made ${longpoll.requests_server ?? longpoll.requests_browser} requests ` +
        `(${perToken(longpoll).toFixed(2)} per token): ${bpt(longpoll)} per token, median ` +
        `${p50(longpoll)}. ` +
        (perToken(longpoll) > 0.8
          ? "About one answer per token, each paying full HTTP headers: its cost follows the " +
            "event rate."
          : `Tokens came faster than a round trip, so answers carried ${batch(longpoll)} tokens ` +
            "each: batching keeps its cost down when the feed is busy."),
      `<b>SSE</b> kept one response open (${sse.requests_server ?? sse.requests_browser} ` +
        `request${(sse.requests_server ?? sse.requests_browser) === 1 ? "" : "s"}): ` +
        `${bpt(sse)} per token, median ${p50(sse)}.`,
      `<b>WebSocket</b> used ${ws.requests_server ?? ws.requests_browser} handshake` +
        `${(ws.requests_server ?? ws.requests_browser) === 1 ? "" : "s"}: ${bpt(ws)} per token, ` +
        `median ${p50(ws)}.`,
    );
    const priced = summaries.filter((s) => s.bytes_per_token !== null);
    if (priced.length === 4) {
      const ranked = [...priced].sort((a, b) => a.bytes_per_token - b.bytes_per_token);
      items.push(
        `Cheapest per token on the wire this run: ${ranked
          .map((s) => `${s.label} ${s.bytes_per_token.toFixed(0)} B`)
          .join(" < ")}.`,
      );
    }
    const timed = summaries.filter((s) => s.latency_ms.n > 0);
    if (timed.length) {
      const ranked = [...timed].sort((a, b) => a.latency_ms.p95 - b.latency_ms.p95);
      items.push(
        `Lowest p95 latency: ${ranked
          .map((s) => `${s.label} ${fmtMs(s.latency_ms.p95)} ms`)
          .join(", ")}.`,
      );
    }
    const troubled = summaries.filter((s) => s.gaps + s.duplicates + s.out_of_order > 0);
    const reconnected = summaries.filter((s) => s.reconnects > 0);
    items.push(
      troubled.length
        ? `Integrity problems: ${troubled.map((s) => s.label).join(", ")} (see the panes).`
        : `No gaps, duplicates or reordering on any pane` +
            (reconnected.length
              ? `, across ${reconnected.reduce((n, s) => n + s.reconnects, 0)} reconnects: ` +
                `every transport resumed from its last event id.`
              : "."),
      `This page held at most ${budget.peak} of the ${HTTP_LIMIT} HTTP/1.1 connections a browser ` +
        `allows per origin (the WebSocket is not counted: Chromium pools WebSockets separately).`,
    );
    el.innerHTML = `<ul>${items.map((item) => `<li>${item}</li>`).join("")}</ul>`;
  }

  // ---- controls -----------------------------------------------------------------------------
  function bindSlider(id, unit, onChange) {
    const input = $(`#${id}`);
    const output = $(`#${id}-out`);
    const show = () => {
      output.textContent = `${input.value} ${unit}`;
    };
    input.addEventListener("input", show);
    if (onChange) input.addEventListener("change", () => onChange(Number(input.value)));
    show();
    return { input, show };
  }

  async function patchConfig(change, label) {
    try {
      const res = await api("PATCH", "/api/config", change);
      if (res.ok && res.json) {
        config = res.json;
        setStatus(`${label} set`);
      } else {
        setStatus(`could not set ${label}: ${errorText(res)}`);
      }
    } catch (err) {
      setStatus(`could not set ${label}: the server is unreachable`);
    }
  }

  const sliders = {
    tokenMs: bindSlider("token-ms", "ms"),
    ttftMs: bindSlider("ttft-ms", "ms"),
    pollMs: bindSlider("poll-ms", "ms"),
    longpollS: bindSlider("longpoll-s", "s"),
    heartbeatS: bindSlider("heartbeat-s", "s", (value) =>
      patchConfig({ heartbeat: value }, `heartbeat ${value} s`),
    ),
    tickerRate: bindSlider("ticker-rate", "/s", (value) =>
      patchConfig({ ticker_rate: value }, `ticker rate ${value}/s`),
    ),
  };

  function setSlider(slider, value) {
    if (typeof value !== "number") return;
    slider.input.value = String(value);
    slider.show();
  }

  async function chaos(path, body, label) {
    const status = $("#chaos-status");
    status.textContent = `${label}…`;
    try {
      const res = await api("POST", path, body);
      status.textContent = res.ok ? `${label}: done` : `${label}: ${errorText(res)}`;
    } catch (err) {
      status.textContent = `${label}: the server is unreachable`;
    }
  }

  $("#chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    app.startChat();
  });
  $("#stop").addEventListener("click", () => {
    $("#ticker").checked = false;
    app.stopAll();
  });
  $("#ticker").addEventListener("change", (event) => {
    if (event.target.checked) app.startTicker();
    else {
      $("#ticker-rate-label").hidden = true;
      app.stopAll();
    }
  });
  $("#chaos-drop").addEventListener("click", () =>
    chaos("/api/chaos/drop", { transport: "all" }, "drop all connections"),
  );
  $("#chaos-pause").addEventListener("click", () => {
    const seconds = Number($("#chaos-pause-s").value) || 1;
    chaos("/api/chaos/pause", { seconds }, `pause delivery ${seconds} s`);
  });
  $("#chaos-fail").addEventListener("click", () => {
    const count = Math.max(1, Math.trunc(Number($("#chaos-fail-n").value) || 1));
    chaos("/api/chaos/fail", { transport: "all", count }, `503 the next ${count} requests`);
  });
  $("#copy-md").addEventListener("click", async () => {
    const markdown = app.markdown();
    const area = $("#summary-md");
    area.value = markdown;
    area.hidden = false;
    try {
      await navigator.clipboard.writeText(markdown);
      $("#copy-status").textContent = "copied to the clipboard";
    } catch (err) {
      // No clipboard permission (e.g. not a secure origin): leave it selected for Ctrl+C.
      area.focus();
      area.select();
      $("#copy-status").textContent = "select and copy it below (clipboard not available here)";
    }
  });
  $("#download-json").addEventListener("click", () => {
    const summary = app.summary();
    const blob = new Blob([JSON.stringify(summary, null, 2)], { type: "application/json" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `realtime-lab-${summary.run ? summary.run.id : "run"}.json`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  });
  window.addEventListener("resize", () => ui.dirty());

  // For the browser tests and the curious: `lab.summary()` is what "Download JSON" saves.
  window.lab = { app, panes, budget, clock, summary: () => app.summary(), markdown: () => app.markdown() };

  async function init() {
    try {
      // A few round trips for the clock offset; the shortest one wins.
      const first = await readConfig();
      for (let i = 0; i < 4; i += 1) await readConfig();
      if (first) {
        setSlider(sliders.tokenMs, first.token_ms);
        setSlider(sliders.ttftMs, first.ttft_ms);
        setSlider(sliders.heartbeatS, first.heartbeat);
        setSlider(sliders.tickerRate, first.ticker_rate);
      }
      document.body.dataset.ready = "true";
    } catch (err) {
      setStatus("could not reach the server");
    }
    ui.render();
    background();
  }

  init();
})();
