/* The page's clocks: a monotonic one, the wall clock, and the offset to the server's clock.
 *
 * The panes measure latency as (server time when the browser received a token) minus (the
 * token's server timestamp), so they need the server-minus-browser offset; it is estimated
 * NTP-style from requests that carry the server's time.
 */

const KEEP = 20; // samples kept: the best of the last ones wins

export class Clock {
  /**
   * @param {object} [options]
   * @param {() => number} [options.now] monotonic milliseconds (default `performance.now`)
   * @param {number} [options.origin] wall-clock ms at `now() === 0` (default `timeOrigin`)
   * @param {() => void} [options.onChange] called when the offset may have changed
   */
  constructor({
    now = () => performance.now(),
    origin = performance.timeOrigin,
    onChange = () => {},
  } = {}) {
    this.now = now;
    this.origin = origin;
    this.onChange = onChange;
    this.offset = 0; // server minus browser, ms
    this.rtt = null; // round trip of the sample the offset comes from; null before any
    this.samples = [];
    this.lastSample = 0; // now() at the last sample
  }

  /** Wall-clock milliseconds, from the monotonic clock (no jump when the system clock is set). */
  wall() {
    return this.origin + this.now();
  }

  /**
   * One request that carried the server's time: sent at wall time `t0`, answered at `t1`.
   * The sample with the shortest round trip is kept: its midpoint is the least uncertain.
   */
  add(t0, t1, serverMs) {
    this.samples.push({ offset: serverMs - (t0 + t1) / 2, rtt: t1 - t0 });
    if (this.samples.length > KEEP) this.samples.shift();
    const best = this.samples.reduce((a, b) => (b.rtt < a.rtt ? b : a));
    this.offset = best.offset;
    this.rtt = best.rtt;
    this.lastSample = this.now();
    this.onChange();
  }

  /** Server time (ms) for a browser wall-clock time. */
  server(browserMs) {
    return browserMs + this.offset;
  }

  /** Milliseconds since the last sample: take a new one when this grows large. */
  age() {
    return this.now() - this.lastSample;
  }
}
