/* The other tabs of this origin: the connections they hold, the six-connection limit, and
 * streams shared between tabs.
 *
 * Over HTTP/1.1 a browser opens at most six connections to one origin, for all its tabs
 * together: three dashboard tabs streaming at once hold more than six, and whatever comes next
 * (a short poll, a stats call) waits for one of them to close. Over HTTP/2 every request of
 * every tab is a stream on one connection and the limit does not apply.
 *
 *   pageProtocol()     how this page was loaded ("h2", "http/1.1", ...): the navigation entry's
 *                      nextHopProtocol
 *   TabCensus          each tab tells the others over a BroadcastChannel what it holds (every
 *                      change, and once a second); the census adds them up
 *   forecast()         whether a run about to start would take the origin past six
 *   StallMeter         how long each finished request waited for a connection (Resource
 *                      Timing: the time before its request was sent, less DNS and connect)
 *   StreamShare        one tab holds a stream, the others get its events relayed over the
 *                      BroadcastChannel: Web Locks elect the holder, and when its tab stops or
 *                      closes the next tab takes the lock and resumes the stream from its own
 *                      last event id
 *
 * No dependencies; BroadcastChannel, navigator.locks and performance are passed in (tests give
 * their own), and each part says what it does without them.
 */

/** The BroadcastChannel every dashboard tab of the origin talks on. */
export const CHANNEL = "realtime-lab:tabs";
/** Connections a browser opens to one origin over HTTP/1.1. */
export const LIMIT = 6;
/** A tab announces itself at least this often... */
export const BEAT_MS = 1000;
/** ...and is forgotten when it has not for this long (a tab that crashed says no goodbye). */
export const STALE_MS = 3500;
/** A request that waited longer than this for a connection counts as stalled. */
export const STALL_MS = 100;

/** The protocol the page came over: "h2", "h3", "http/1.1", or "" when the browser does not say. */
export function pageProtocol(perf = globalThis.performance) {
  const entries = perf && typeof perf.getEntriesByType === "function"
    ? perf.getEntriesByType("navigation")
    : [];
  return (entries[0] && entries[0].nextHopProtocol) || "";
}

/** Whether the six-per-origin limit applies to a page loaded over `protocol` (unknown: yes). */
export function limitApplies(protocol) {
  return !/^(h2|h2c|h3)/.test(protocol);
}

/** A protocol as people write it: "HTTP/2", "HTTP/1.1", or "?" */
export function protocolName(protocol) {
  if (/^h2/.test(protocol)) return "HTTP/2";
  if (/^h3/.test(protocol)) return "HTTP/3";
  if (protocol) return protocol.toUpperCase();
  return "?";
}

/**
 * Whether a run that may hold `plan` connections, started while the other tabs hold
 * `othersHeld` and this one `ownHeld`, would take the origin past `limit`.
 *
 * @returns {{applies: boolean, need: number, over: boolean, text: string}} `text` is the
 *   warning to show when `over`, else what holds (over HTTP/2: that the limit does not apply)
 */
export function forecast({ protocol, othersHeld, tabs, plan, limit = LIMIT }) {
  const applies = limitApplies(protocol);
  const need = othersHeld + plan;
  if (!applies) {
    return {
      applies,
      need,
      over: false,
      text:
        `${protocolName(protocol)}: every tab's streams share one connection; ` +
        "the limit of six per origin does not apply",
    };
  }
  const over = need > limit;
  const others = tabs - 1;
  // What the others hold now, or may hold soon (a tab with a run on: its whole plan).
  const who =
    others === 1 ? "1 other tab of this origin uses" : `${others} other tabs of this origin use`;
  const held = `${othersHeld} connection${othersHeld === 1 ? "" : "s"}`;
  const text = over
    ? `${who} up to ${held} and this run needs up to ${plan}: ` +
      `${need}, more than the ${limit} a browser opens over ${protocolName(protocol)}, so some ` +
      "requests will wait for a free one"
    : `${need} of ${limit} connections at most, with the other tabs`;
  return { applies, need, over, text };
}

/** What every tab tells the others, and what the census knows of them. */
export class TabCensus {
  /**
   * @param {object} o
   * @param {string} o.id this tab's id
   * @param {{postMessage(m: any): void} | null} o.channel a BroadcastChannel (null: this tab
   *   sees only itself)
   * @param {() => object} o.report this tab's figures: {held, plan, running, protocol, leads}
   * @param {() => void} [o.onChange] the census changed
   * @param {() => number} [o.now] milliseconds (Date.now)
   */
  constructor({ id, channel, report, onChange = () => {}, now = () => Date.now() }) {
    this.id = id;
    this.channel = channel;
    this.report = report;
    this.onChange = onChange;
    this.now = now;
    /** the other tabs, by id: their last report and when it came */
    this.others = new Map();
    this.timer = null;
  }

  /** Start listening and announcing; call `close()` when the tab goes. */
  start(setInterval = globalThis.setInterval) {
    if (!this.channel) return;
    this.post({ kind: "hello" });
    this.timer = setInterval(() => this.beat(), BEAT_MS);
  }

  /** Tell the others what this tab holds now (call on every change). */
  announce() {
    this.post({ kind: "tab", ...this.report() });
  }

  beat() {
    this.announce();
    if (this.prune()) this.onChange();
  }

  post(message) {
    if (!this.channel) return;
    try {
      this.channel.postMessage({ ...message, tab: this.id, at: this.now() });
    } catch (err) {
      // a closed channel (the tab is going away): nothing to tell
    }
  }

  /** A message from another tab (the BroadcastChannel's `message` event's data). */
  receive(message) {
    if (!message || typeof message !== "object" || message.tab === this.id) return;
    if (message.kind === "hello") {
      this.announce(); // a new tab: tell it at once rather than at the next beat
    } else if (message.kind === "tab") {
      this.others.set(message.tab, { ...message, seen: this.now() });
      this.onChange();
    } else if (message.kind === "bye") {
      if (this.others.delete(message.tab)) this.onChange();
    }
  }

  /** Forget tabs not heard from for STALE_MS; whether any was forgotten. */
  prune() {
    const now = this.now();
    let changed = false;
    for (const [id, tab] of this.others) {
      if (now - tab.seen > STALE_MS) {
        this.others.delete(id);
        changed = true;
      }
    }
    return changed;
  }

  /** Tabs of the origin, this one included. */
  get tabs() {
    return this.others.size + 1;
  }

  /** Connections the other tabs hold now. */
  get othersHeld() {
    let sum = 0;
    for (const tab of this.others.values()) sum += Number(tab.held) || 0;
    return sum;
  }

  /** Connections the other tabs hold now or may hold soon: a tab with a run on counts its
   * plan (the most it holds) even between two polls. */
  get othersNeed() {
    let sum = 0;
    for (const tab of this.others.values()) {
      const held = Number(tab.held) || 0;
      sum += tab.running ? Math.max(held, Number(tab.plan) || 0) : held;
    }
    return sum;
  }

  /** Connections all tabs of the origin hold now. */
  get held() {
    return this.othersHeld + (Number(this.report().held) || 0);
  }

  /** Whether another tab holds the shared stream `name` (see StreamShare). */
  leads(name) {
    for (const tab of this.others.values()) if ((tab.leads || []).includes(name)) return tab.tab;
    return null;
  }

  close(clearInterval = globalThis.clearInterval) {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.post({ kind: "bye" });
  }
}

/**
 * How long a finished request waited for a connection, from its Resource Timing entry: the
 * time from fetchStart to requestStart less DNS and connecting (and TLS). Over HTTP/1.1 with
 * six connections held this is the wait for one of them; over HTTP/2 it is about nothing.
 * Null when the entry does not say (requestStart 0: from the cache, or another origin).
 */
export function waited(entry) {
  if (!entry || !(entry.requestStart > 0)) return null;
  const dns = Math.max(0, entry.domainLookupEnd - entry.domainLookupStart);
  const connect = Math.max(0, entry.connectEnd - entry.connectStart);
  return Math.max(0, entry.requestStart - entry.fetchStart - dns - connect);
}

/** The page's requests that waited for a connection, from their Resource Timing entries. */
export class StallMeter {
  /** @param {number} [threshold] ms @param {number} [since] entries that started before this
   * (performance.now() ms) are not counted: the page's own loading, its modules all at once */
  constructor(threshold = STALL_MS, since = 0) {
    this.threshold = threshold;
    this.since = since;
    this.requests = 0; // finished requests measured
    this.stalled = 0; // ...that waited longer than the threshold
    this.longest = 0; // the longest wait, ms
    this.protocols = {}; // requests by nextHopProtocol
    this.worst = null; // the URL path of the longest wait
  }

  /** One PerformanceResourceTiming entry (or a plain object with its fields). */
  add(entry) {
    const wait = waited(entry);
    if (wait === null || entry.startTime < this.since) return;
    this.requests += 1;
    const protocol = entry.nextHopProtocol || "?";
    this.protocols[protocol] = (this.protocols[protocol] ?? 0) + 1;
    if (wait > this.threshold) this.stalled += 1;
    if (wait > this.longest) {
      this.longest = wait;
      try {
        this.worst = new URL(entry.name).pathname;
      } catch (err) {
        this.worst = String(entry.name);
      }
    }
  }

  /** Watch the page's requests from now on (PerformanceObserver); false when the browser
   * cannot. */
  observe(Observer = globalThis.PerformanceObserver, onChange = () => {}) {
    if (typeof Observer !== "function") return false;
    if (globalThis.performance) this.since = globalThis.performance.now();
    const observer = new Observer((list) => {
      for (const entry of list.getEntries()) this.add(entry);
      onChange();
    });
    // Observers get every entry; the buffer keeps only the first 250, so empty it when full.
    observer.observe({ type: "resource" });
    const perf = globalThis.performance;
    if (perf && typeof perf.clearResourceTimings === "function" && perf.addEventListener) {
      perf.addEventListener("resourcetimingbufferfull", () => perf.clearResourceTimings());
    }
    return true;
  }

  summary() {
    return {
      requests: this.requests,
      stalled: this.stalled,
      longest_ms: this.longest,
      worst: this.worst,
      protocols: { ...this.protocols },
    };
  }
}

/**
 * Streams shared between the tabs of the origin: for each stream name, the tab holding a Web
 * Lock of that name holds the stream and relays its events; the others follow.
 *
 * `join(name, {lead, follow, leader})` returns a handle: `lead()` is called once this tab holds
 * the lock (open the real connection then), `follow(envelope)` for each event relayed from the
 * holder meanwhile, `leader(tabId)` when the holder changes; `handle.publish(envelope)` relays
 * one (the holder calls it per accepted event), `handle.leave()` lets the lock go (a follower
 * stops waiting for it). Followers get the events relayed after they joined: share streams
 * that start at "now" (the ticker), where that is all a new stream would get too. The tab that
 * takes the lock over resumes from its own last event id, so nothing is lost in the handover.
 */
export class StreamShare {
  /**
   * @param {object} o
   * @param {string} o.id this tab's id
   * @param {object | null} o.channel a BroadcastChannel (null or no locks: `available` false)
   * @param {object | null} o.locks navigator.locks
   * @param {() => void} [o.onChange] who leads what changed
   */
  constructor({ id, channel, locks, onChange = () => {} }) {
    this.id = id;
    this.channel = channel;
    this.locks = locks;
    this.onChange = onChange;
    this.joined = new Map(); // name -> handle
  }

  /** Whether streams can be shared here (BroadcastChannel and Web Locks: a secure origin). */
  get available() {
    return Boolean(this.channel && this.locks && typeof this.locks.request === "function");
  }

  /** The names of the streams this tab holds for the others. */
  get leads() {
    return [...this.joined.values()].filter((h) => h.leading).map((h) => h.name);
  }

  join(name, { lead, follow, leader = () => {} }) {
    if (this.joined.has(name)) this.joined.get(name).leave();
    const controller = new AbortController();
    let release;
    const held = new Promise((resolve) => {
      release = resolve;
    });
    const handle = {
      name,
      leading: false,
      left: false,
      from: null, // the tab whose events we follow
      publish: (envelope) => {
        if (!handle.leading || handle.left) return;
        this.post({ kind: "event", name, envelope });
      },
      leave: () => {
        if (handle.left) return;
        handle.left = true;
        controller.abort();
        release();
        if (this.joined.get(name) === handle) this.joined.delete(name);
        this.onChange();
      },
      follow,
      leader,
    };
    this.joined.set(name, handle);
    this.locks
      .request(name, { signal: controller.signal }, async () => {
        if (handle.left) return;
        handle.leading = true;
        handle.from = this.id;
        this.onChange();
        leader(this.id);
        lead();
        await held; // the lock is ours until leave()
      })
      .catch(() => {
        // AbortError: left while waiting for the lock
      });
    return handle;
  }

  post(message) {
    try {
      this.channel.postMessage({ ...message, tab: this.id });
    } catch (err) {
      // closed: the tab is going away
    }
  }

  /** A message from another tab (the same BroadcastChannel as the census). */
  receive(message) {
    if (!message || typeof message !== "object" || message.tab === this.id) return;
    const handle = this.joined.get(message.name);
    if (!handle || handle.left) return;
    if (message.kind !== "event" || handle.leading) return;
    if (handle.from !== message.tab) {
      handle.from = message.tab;
      handle.leader(message.tab);
    }
    handle.follow(message.envelope);
  }
}
