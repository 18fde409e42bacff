/**
 * The one rule for sequence continuity, as realtime_lab/protocol/sequence.py writes it (read the
 * rule there; this is a clause-for-clause copy, tested against the same table,
 * tests/protocol/sequence_cases.json, by tests/js/sequence.test.mjs).
 *
 *   const seq = new Sequence(after);          // after: an event id, or null / "" / "now"
 *   const verdict = seq.observe(env.id, env.type === "reset");
 *   if (verdict === "duplicate" || verdict === "reordered") return;   // its place has passed
 *   // "new" and "reset": deliver; "foreign" (not an event id): the caller decides
 *   seq.gaps, seq.duplicates, seq.reordered, seq.resets               // the counters
 *
 * One difference, forced by JavaScript numbers: an id whose seq is above
 * Number.MAX_SAFE_INTEGER (2^53 - 1) is "foreign" here, since it cannot be compared exactly;
 * the server's seqs count from 1 and would take centuries to get there.
 *
 * No dependencies: an ES module for browsers and node alike.
 */

/** The most skipped ranges a Sequence remembers (the oldest go first). */
export const MAX_SKIPPED_RANGES = 64;

/** The `after` value that means "only events published from now on" (cursor.LIVE). */
export const LIVE = "now";

/** What one observed id is. */
export const Verdict = Object.freeze({
  NEW: "new",
  RESET: "reset",
  DUPLICATE: "duplicate",
  REORDERED: "reordered",
  FOREIGN: "foreign",
});

// protocol/cursor.py's _ID_RE, matched in full.
const ID_RE = /^([0-9a-z]{1,16})-(0|[1-9][0-9]{0,17})$/;

/**
 * Parse an event id `<epoch>-<seq>`.
 * @param {unknown} id
 * @returns {{epoch: string, seq: number} | null} null when it is not an id (or its seq is not a
 *   safe integer).
 */
export function parseId(id) {
  if (typeof id !== "string") return null;
  const match = ID_RE.exec(id);
  if (match === null) return null;
  const seq = Number(match[2]);
  return Number.isSafeInteger(seq) ? { epoch: match[1], seq } : null;
}

/** Continuity of one stream of event ids, and its counters. */
export class Sequence {
  /**
   * @param {string | null | undefined} after the position the stream resumes after (an event
   *   id); null, undefined, "", "now" or anything that is not an id: no run, the first event
   *   opens one.
   */
  constructor(after = null) {
    /** ids skipped inside a run (one per id), plus one per epoch change no reset announced */
    this.gaps = 0;
    /** ids at or below the last one that no gap was waiting for */
    this.duplicates = 0;
    /** ids that arrived after a later one and filled a recorded gap */
    this.reordered = 0;
    /** reset events observed */
    this.resets = 0;
    /** the current run's epoch, null without a run */
    this.epoch = null;
    /** the current run's last seq, null without a run */
    this.last = null;
    // Seq ranges [low, high] skipped in the current run, ascending, for late arrivals.
    this._skipped = [];
    if (after !== null && after !== undefined && after !== "" && after !== LIVE) {
      const position = parseId(after);
      if (position !== null) {
        this.epoch = position.epoch;
        this.last = position.seq;
      }
    }
  }

  /** The recorded skipped ranges [low, high] of the current run, oldest first (a copy). */
  get skipped() {
    return this._skipped.map((range) => [range[0], range[1]]);
  }

  /**
   * Account for the event `id` (a reset event when `isReset`).
   * @param {unknown} id
   * @param {boolean} isReset
   * @returns {string} the verdict: deliver "new" and "reset", drop "duplicate" and "reordered";
   *   "foreign" changed nothing, the caller decides.
   */
  observe(id, isReset = false) {
    const parsed = parseId(id);
    if (parsed === null) return Verdict.FOREIGN;
    const { epoch, seq } = parsed;
    if (isReset) {
      this.resets += 1;
      this._open(epoch, seq);
      return Verdict.RESET;
    }
    if (this.last === null) {
      this._open(epoch, seq);
      return Verdict.NEW;
    }
    if (epoch !== this.epoch) {
      this.gaps += 1;
      this._open(epoch, seq);
      return Verdict.NEW;
    }
    const last = this.last;
    if (seq === last + 1) {
      this.last = seq;
      return Verdict.NEW;
    }
    if (seq > last) {
      this.gaps += seq - last - 1;
      this._skipped.push([last + 1, seq - 1]);
      if (this._skipped.length > MAX_SKIPPED_RANGES) this._skipped.shift();
      this.last = seq;
      return Verdict.NEW;
    }
    if (this._take(seq)) {
      this.reordered += 1;
      return Verdict.REORDERED;
    }
    this.duplicates += 1;
    return Verdict.DUPLICATE;
  }

  /** Drop the current run: the next event opens a new one, with no gap counted. */
  forget() {
    this.epoch = null;
    this.last = null;
    this._skipped = [];
  }

  _open(epoch, seq) {
    this.epoch = epoch;
    this.last = seq;
    this._skipped = [];
  }

  /** Remove `seq` from the skipped record; false when it was not there. */
  _take(seq) {
    const skipped = this._skipped;
    // Newest first: a late arrival is most often from the latest gap.
    for (let index = skipped.length - 1; index >= 0; index -= 1) {
      const [low, high] = skipped[index];
      if (seq > high) return false; // ranges ascend: no older one holds it either
      if (seq >= low) {
        const pieces = [];
        if (low < seq) pieces.push([low, seq - 1]);
        if (seq < high) pieces.push([seq + 1, high]);
        skipped.splice(index, 1, ...pieces);
        if (skipped.length > MAX_SKIPPED_RANGES) skipped.shift();
        return true;
      }
    }
    return false;
  }
}
