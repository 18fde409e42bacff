/* The part every transport pane shares: lifecycle, event checking, figures, display.
 *
 * A transport module exports (as default) a subclass that implements two methods:
 *
 *   open(after)          connect (or start polling) from position `after`; report each
 *                        envelope with `this.frame(text)` or `this.handle(envelope, received)`,
 *                        a working connection with `this.opened()`, a failure with
 *                        `this.failed(problem)` (see pane-errors.js);
 *   shut(code, reason)   drop the connection now (code/reason: a WebSocket close frame).
 *
 * and may say, as `static connections`, the most HTTP/1.1 connections it holds at once (1 unless
 * it says otherwise; net.js `connectionPlan` adds them up against the browser's six), and, with
 * `unsupported(run)`, that it cannot stream a run (the pane then sits it out, `skipped`).
 *
 * Shared between tabs (tabs.js StreamShare, when `deps.share.wanted(run)`): the pane joins the
 * share instead of connecting; the tab that holds the stream's lock connects (`open`) and relays
 * each event it accepts, the others `handle` the relayed ones and hold no connection. A pane
 * class that cannot be shared says `static shareable = false`.
 *
 * `this.gen` changes whenever the pane cuts, stops or finishes: a callback that captured an
 * older value belongs to a connection the pane no longer wants, and must do nothing.
 *
 * Every pane checks the event ids itself with a `Sequence` ("<epoch>-<seq>", seq +1 per
 * event): a jump is a gap, an id at or below the last one is a duplicate (or a late one) and is
 * dropped, a `reset` event re-bases the count.
 */

import { SLASH, fmtBytes, fmtMs, percentile } from "./format.js";
import { diagnose, judge, needsProbe } from "./pane-errors.js";
import { Sequence, parseId } from "./sequence.js";

export const MAX_SAMPLES = 5000; // latency samples kept per pane (percentiles over the last ones)
export const MAX_POINTS = 2000; // chart points kept per series
export const MAX_TEXT = 6000; // characters kept in a pane on the never-ending ticker

export class Pane {
  /** The most HTTP/1.1 connections a pane of this class holds at once (net.js connectionPlan). */
  static connections = 1;

  /** Whether panes of this class may follow a stream another tab holds (tabs.js). */
  static shareable = true;

  /**
   * @param {HTMLElement} root the pane's <article> (data-transport, data-label, data-color)
   * @param {object} deps what the pane may use; it reaches for nothing else on the page:
   *   clock       Clock (clock.js): now(), wall(), server(wallMs)
   *   budget      ConnectionBudget (net.js): take(key) per connection opened, give(key) per
   *               closed (or hold(key), which returns the give)
   *   refresh()   the figures changed: redraw soon
   *   onEnded(pane)  the pane finished (its `ended` says why)
   *   fetchStats(client)  async: the server's figures for a client tag, or null; rejects
   *               when the server is unreachable
   *   options     the user's settings, read at each use: pollIntervalMs(), longpollTimeoutS()
   *   base        the page's URL, to build absolute (ws:) URLs from
   *   fetch       optional: the fetch() the pane's own requests use (probes, and the
   *               transports that run on fetch and take it from here); globalThis.fetch if absent
   *   queue       optional: the page's SideQueue (net.js), which probes wait their turn in
   *   share       optional: {wanted(run), join(name, handlers)}: streams shared between tabs
   *               (tabs.js StreamShare)
   */
  constructor(root, deps) {
    this.root = root;
    this.deps = deps;
    this.key = root.dataset.transport;
    this.label = root.dataset.label || this.key;
    this.color = root.dataset.color || "#5f6b7a";
    this.stateEl = root.querySelector("[data-role=state]");
    this.answerEl = root.querySelector("[data-role=answer]");
    this.noteEl = root.querySelector("[data-role=note]");
    this.cutEl = root.querySelector("[data-role=cut]");
    this.metricEls = {};
    for (const dd of root.querySelectorAll("[data-metric]")) {
      this.metricEls[dd.dataset.metric] = dd;
    }
    this.cutEl.addEventListener("click", () => this.cut());
    this.gen = 0;
    this.active = false;
    this.relay = null; // the StreamShare handle while the run is shared between tabs
    this.following = false; // another tab holds the stream; its events are relayed to us
    this.run = null;
    this.tag = null;
    this.state = "closed";
    this.clear();
  }

  clear(after = null) {
    this.m = {
      tokens: 0,
      reconnects: 0,
      requests: 0,
      failures: 0,
      ttft: null,
      latencies: [],
      latencyPoints: [],
      bytesPoints: [[0, 0]],
      server: null,
    };
    this.sequence = new Sequence(after);
    this.lastId = null;
    this.cursor = null;
    this.ended = null;
    this.skipped = false;
    this.t0 = null; // when this pane sent its prompt, if it sent one itself (else the run's t0)
    this.wasDown = false;
    this.backoffMs = 0;
    this.scrollPending = false;
    this.textNode = document.createTextNode("");
    this.answerEl.replaceChildren(this.textNode);
    this.noteEl.textContent = "";
    this.root.dataset.end = "";
  }

  /** Start streaming `run.channel` from `run.after` ("" = all history, "now" = new only). */
  begin(run) {
    this.stop();
    this.clear(run.after);
    this.run = run;
    this.tag = `${run.id}-${this.key}`;
    const why = this.unsupported(run);
    if (why) {
      this.skipped = true;
      this.setState("closed");
      this.note(why);
      return;
    }
    this.active = true;
    this.gen += 1;
    this.cutEl.disabled = false;
    this.setState("connecting");
    const share = this.deps.share;
    if (share && this.constructor.shareable && share.wanted(run)) this.joinShare(run);
    else this.open(this.resumeFrom());
  }

  /** Stream `run` shared with the other tabs: connect only while this tab holds the lock. */
  joinShare(run) {
    const gen = this.gen;
    const mine = () => gen === this.gen && this.active && !this.ended;
    this.following = true;
    this.cutEl.disabled = true; // nothing to cut while another tab holds the stream
    this.note("shared: waiting for the tab that holds the stream");
    this.relay = this.deps.share.join(`realtime-lab:${this.key}:${run.channel}`, {
      lead: () => {
        if (!mine()) return;
        this.following = false;
        this.cutEl.disabled = false;
        this.note("shared: this tab holds the stream and relays its events to the other tabs");
        this.open(this.resumeFrom()); // after the last event relayed to us: nothing lost
      },
      follow: (env) => {
        if (!mine() || !this.following) return;
        // Across a handover the new holder may relay again what the old one did: not a
        // duplicate of the stream, only of the relay.
        const id = parseId(env && env.id);
        const last = parseId(this.lastId);
        if (id && last && id.epoch === last.epoch && id.seq <= last.seq) return;
        if (this.state !== "open") this.setState("open");
        this.handle(env, this.deps.clock.wall());
      },
      leader: (tab) => {
        if (mine() && this.following) {
          this.note(`shared: relayed from tab ${tab}, which holds the stream (none held here)`);
        }
      },
    });
  }

  leaveShare() {
    if (this.relay) this.relay.leave();
    this.relay = null;
    this.following = false;
  }

  resumeFrom() {
    return this.lastId ?? this.cursor ?? this.run.after;
  }

  /** Why this pane cannot stream `run` (it then sits the run out), or null: it can. */
  unsupported(run) {
    return null;
  }

  /**
   * The query string of a transport URL: our client tag, `after`, and `extra`. A probe
   * (`tagged` false) goes without the tag: it is not one of this pane's requests, and the
   * server's figures for the pane must not count it.
   */
  query(after, extra = {}, tagged = true) {
    const params = new URLSearchParams({ ...(tagged ? { client: this.tag } : {}), ...extra });
    if (after) params.set("after", after);
    return params.toString();
  }

  stop() {
    if (!this.active) return;
    this.active = false;
    this.gen += 1;
    this.shut();
    this.leaveShare();
    this.cutEl.disabled = true;
    this.setState("closed");
    if (!this.ended) this.note("stopped");
  }

  /** "cut connection": drop our own connection and resume from the last id we hold. */
  cut() {
    if (!this.active || this.ended || this.following) return; // a follower holds nothing to cut
    this.gen += 1;
    this.shut(4000, "cut by the dashboard");
    this.wasDown = true;
    this.setState("reconnecting");
    this.note(`cut; resuming after ${this.resumeFrom() || "the start"}`);
    this.open(this.resumeFrom());
  }

  /**
   * The connection or a request failed: every transport reports it here, and only here is it
   * decided (pane-errors.js `judge`) and shown. Call it once per failure, with the connection
   * already shut. A problem with a `probe` URL (EventSource and WebSocket, which never show a
   * refused request's status) is first taken to the server to learn its status: the pane says
   * so meanwhile, and a cut, a stop or an end in between wins over the answer.
   */
  failed(problem) {
    if (!needsProbe(problem)) {
      this.settle(problem);
      return;
    }
    const gen = this.gen;
    this.setState("reconnecting");
    this.note(`${problem.why || "the connection failed"}; asking the server why…`);
    const { fetch, budget, queue } = this.deps;
    diagnose(problem, { fetch, budget, queue }).then((known) => {
      if (gen === this.gen && this.active && !this.ended) this.settle(known);
    });
  }

  /** Carry out `judge`'s verdict on a problem whose status is known (or will not be). */
  settle(problem) {
    const verdict = judge(problem);
    if (verdict.action === "give-up") {
      this.finish(verdict.end, verdict.text); // the verdict's line stays, not "ended: ..."
    } else {
      this.retryLater(verdict.text, verdict.delayMs);
    }
  }

  /**
   * Try again from the last id: after `delayMs` when given (`why` then says how long: a 429's
   * Retry-After), else after a growing pause (which is added to `why`).
   */
  retryLater(why, delayMs = null) {
    this.wasDown = true;
    this.m.failures += 1;
    this.setState("reconnecting");
    let wait = delayMs;
    if (wait === null) {
      this.backoffMs = Math.min(this.backoffMs ? this.backoffMs * 2 : 200, this.maxBackoffMs());
      wait = this.backoffMs;
      if (why) this.note(`${why}; retrying in ${wait} ms`);
    } else if (why) {
      this.note(why);
    }
    const gen = this.gen;
    setTimeout(() => {
      if (gen === this.gen && this.active && !this.ended) this.open(this.resumeFrom());
    }, wait);
  }

  /** The longest pause between two retries (the growing pause stops growing there). */
  maxBackoffMs() {
    return 5000;
  }

  /** The connection (or a poll) succeeded. */
  opened() {
    if (this.wasDown) {
      this.m.reconnects += 1;
      this.wasDown = false;
      this.note(
        `reconnected (${this.m.reconnects}); resumed after ${this.resumeFrom() || "the start"}`,
      );
    }
    this.backoffMs = 0;
    if (this.state !== "open") this.setState("open");
  }

  /** The connection dropped and the browser is reconnecting by itself (EventSource). */
  reconnecting() {
    this.wasDown = true;
    this.setState("reconnecting");
  }

  setState(state) {
    this.state = state;
    this.root.dataset.state = state;
    this.stateEl.textContent = state;
    this.deps.refresh();
  }

  /** The one line under the answer: what last happened to the connection. */
  note(text) {
    this.noteEl.textContent = text;
    this.noteEl.title = text;
  }

  /** One envelope off the wire (a JSON string). */
  frame(text, received = this.deps.clock.wall()) {
    let envelope;
    try {
      envelope = JSON.parse(text);
    } catch (err) {
      this.note("a message that is not JSON was ignored");
      return;
    }
    this.handle(envelope, received);
  }

  /** One parsed envelope, received at wall time `received`. */
  handle(env, received) {
    if (this.ended || !env || typeof env !== "object") return;
    const verdict =
      typeof env.id === "string" ? this.sequence.observe(env.id, env.type === "reset") : "foreign";
    if (verdict === "foreign") {
      // Not an event of the channel: an error about this connection (WebSocket).
      const data = env.data || {};
      this.note(`server: ${data.code || env.type || "message"} ${data.message || ""}`.trim());
      return;
    }
    if (verdict === "duplicate" || verdict === "reordered") {
      this.deps.refresh();
      return; // dropped: the text already holds it, or its place has passed
    }
    this.lastId = env.id;
    if (this.relay && !this.following) this.relay.publish(env); // to the tabs that follow
    if (verdict === "reset") {
      // History could not reach back to our position: say so and count from here.
      const data = env.data || {};
      this.note(`reset (${data.reason}): events may be missing before ${data.oldest || "now"}`);
      this.deps.refresh();
      return;
    }
    if (env.type === "token") {
      this.token(env, received);
    } else if (env.type === "end") {
      const reason = (env.data && env.data.reason) || "done";
      this.finish(reason);
    } else if (env.type === "error") {
      const data = env.data || {};
      this.note(`error event: ${data.code || ""} ${data.message || ""}`);
    }
    this.deps.refresh();
  }

  token(env, received) {
    const { clock } = this.deps;
    const text = (env.data && env.data.text) || "";
    this.textNode.appendData(text);
    if (this.textNode.length > MAX_TEXT && this.run.mode === "ticker") {
      this.textNode.deleteData(0, this.textNode.length - MAX_TEXT / 2);
    }
    this.m.tokens += 1;
    if (this.m.ttft === null) this.m.ttft = clock.now() - (this.t0 ?? this.run.t0);
    if (typeof env.ts === "number") {
      const latency = clock.server(received) - env.ts;
      this.m.latencies.push(latency);
      if (this.m.latencies.length > MAX_SAMPLES) this.m.latencies.shift();
      const t = (clock.now() - this.run.t0) / 1000;
      this.m.latencyPoints.push([t, latency]);
      if (this.m.latencyPoints.length > MAX_POINTS) this.m.latencyPoints.shift();
    }
    this.scrollPending = true;
  }

  /** End the pane for `reason` ("done", "cancelled", "unauthenticated", ...); `why` is the
   * line to show (by default "ended: <reason>", and nothing for "done"). */
  finish(reason, why = null) {
    if (this.ended) return;
    this.ended = reason;
    this.active = false;
    this.gen += 1;
    this.shut();
    this.leaveShare();
    this.cutEl.disabled = true;
    this.root.dataset.end = reason;
    this.setState("closed");
    if (why) this.note(why);
    else if (reason !== "done") this.note(`ended: ${reason}`);
    this.deps.onEnded(this);
  }

  /** Read the server's figures for this pane's client (bytes, requests). Rejects when the
   * server is unreachable: the caller tries again later. */
  async refreshStats() {
    const run = this.run;
    const client = await this.deps.fetchStats(this.tag);
    if (!client || this.run !== run) return;
    this.m.server = client;
    const t = (this.deps.clock.now() - run.t0) / 1000;
    this.m.bytesPoints.push([t, client.bytes]);
    if (this.m.bytesPoints.length > MAX_POINTS) this.m.bytesPoints.shift();
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
    const seq = this.sequence;
    return {
      transport: this.key,
      label: this.label,
      state: this.skipped ? "skipped" : this.state,
      skipped: this.skipped,
      end: this.ended,
      tokens: this.m.tokens,
      text_length: this.textNode.length,
      ttft_ms: this.m.ttft,
      latency_ms: this.latency(),
      gaps: seq.gaps,
      duplicates: seq.duplicates,
      out_of_order: seq.reordered,
      resets: seq.resets,
      reconnects: this.m.reconnects,
      failures: this.m.failures,
      requests_browser: this.m.requests,
      requests_server: server ? server.requests : null,
      bytes,
      bytes_per_token: bytes !== null && this.m.tokens ? bytes / this.m.tokens : null,
      server,
    };
  }

  /** Show the figures of `s` (this pane's `summary()`). */
  render(s) {
    const set = (name, text, bad = false) => {
      const el = this.metricEls[name];
      if (!el) return;
      el.textContent = text;
      el.classList.toggle("bad", bad);
    };
    const lat = s.latency_ms;
    set("ttft", s.ttft_ms === null ? "–" : `${fmtMs(s.ttft_ms)} ms`);
    set("latency", lat.n ? [lat.p50, lat.p95, lat.max].map(fmtMs).join(SLASH) + " ms" : "–");
    set("tokens", String(s.tokens));
    set(
      "integrity",
      [s.gaps, s.duplicates, s.out_of_order].join(SLASH),
      s.gaps + s.duplicates + s.out_of_order > 0,
    );
    set("resets", String(s.resets), s.resets > 0);
    set("reconnects", String(s.reconnects));
    set("requests", `${s.requests_browser}${SLASH}${s.requests_server ?? "–"}`);
    set("bytes", fmtBytes(s.bytes));
    set("bpt", s.bytes_per_token === null ? "–" : `${s.bytes_per_token.toFixed(1)} B`);
    if (this.scrollPending) {
      this.scrollPending = false;
      this.answerEl.scrollTop = this.answerEl.scrollHeight;
    }
  }

  /** Connect from `after`: each transport implements it. */
  open(after) {
    throw new Error(`${this.constructor.name} does not implement open(${after})`);
  }

  /** Drop the connection now: each transport implements it. */
  shut() {
    throw new Error(`${this.constructor.name} does not implement shut()`);
  }
}
