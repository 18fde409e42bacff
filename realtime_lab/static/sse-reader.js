/**
 * An incremental Server-Sent Events parser: bytes (or text) in, events out, as the WHATWG HTML
 * standard's "interpreting an event stream" says (§9.2.6), for a stream read with `fetch()`
 * rather than `EventSource`.
 *
 *   const reader = new SSEReader({ lastEventId });   // one per response
 *   for (const event of reader.push(chunk)) ...       // chunk: Uint8Array, ArrayBuffer or string
 *   reader.end();                                     // EOF: an unfinished block is dropped
 *   // event: {type, data, lastEventId}; reader.retry: the last valid `retry:` (ms) or null
 *
 * What the standard says, and this does:
 *   - UTF-8, decoded across chunk boundaries; one leading BOM is dropped, invalid bytes become
 *     U+FFFD;
 *   - lines end with CRLF, LF or CR (a CR that ends a chunk may be the first half of a CRLF);
 *   - a line starting with ":" is a comment (heartbeats: counted in `comments`);
 *   - `field: value` drops one space after the colon; a line without a colon is a field with an
 *     empty value;
 *   - `data:` lines join with LF; an event with no data is not dispatched (but its `id:` still
 *     becomes the last event id); `event:` names the type ("message" when empty);
 *   - `id:` sets the last event id unless its value contains U+0000; it persists across events
 *     until another `id:` changes it (`id:` alone empties it);
 *   - `retry:` counts only when its value is ASCII digits only (and, here, a safe integer);
 *   - unknown fields are ignored; at EOF, a block without its blank line is not dispatched.
 *
 * One choice the standard's words leave open: it starts every stream's last-event-id buffer
 * empty, so on a reconnected stream an event without `id:` (the fetch stream's opening `chat`
 * event) would report an empty `lastEventId` and lose the resume position. Chromium's
 * EventSource seeds the buffer with the id in force, as the server's own decoder
 * (realtime_lab/protocol/sse.py `SSEDecoder`) and `@microsoft/fetch-event-source` keep it: pass
 * the previous connection's `lastEventId` to do the same (the default, "", is the literal rule).
 *
 * Why not a library (eventsource-parser, @microsoft/fetch-event-source's parser): the dashboard
 * has no build step and loads nothing it does not serve itself, and this is one small module with
 * its own tests (tests/js/sse-reader.test.mjs). fetch-event-source's parser is not spec-exact
 * either: it takes `retry: 12abc` as 12, drops a field line without a colon (`data` alone), keeps
 * an `id:` holding U+0000 and dispatches a block with no data.
 *
 * No dependencies: an ES module for browsers and node alike.
 */

const LF = 0x0a;
const CR = 0x0d;
const BOM = "\ufeff";
const DIGITS = /^[0-9]+$/;

/**
 * A `retry:` value in milliseconds, or null when the field is to be ignored: anything but ASCII
 * digits (the standard), or a number beyond Number.MAX_SAFE_INTEGER, which JavaScript cannot hold
 * exactly (protocol/sse.py draws its line at 2^64 - 1; no server sends either).
 */
export function retryValue(value) {
  if (!DIGITS.test(value)) return null;
  const significant = value.replace(/^0+/, "");
  if (significant.length > 16) return null;
  const ms = Number(significant || "0");
  return Number.isSafeInteger(ms) ? ms : null;
}

/** One dispatched event: its type ("message" by default), data, and the last event id then. */
export class SSEEvent {
  constructor(type, data, lastEventId) {
    this.type = type;
    this.data = data;
    this.lastEventId = lastEventId;
  }
}

/** The parser of one event stream (one response): feed it chunks, take the events. */
export class SSEReader {
  /**
   * @param {{lastEventId?: string}} [options] `lastEventId`: the id to start from (the one the
   *   previous connection ended with), "" as the standard has it.
   */
  constructor({ lastEventId = "" } = {}) {
    /** The stream's last event id: set from the `id:` buffer each time an event is dispatched. */
    this.lastEventId = String(lastEventId);
    /** The last valid `retry:` value in milliseconds, null until one came. */
    this.retry = null;
    /** Comment lines seen (the server's heartbeats). */
    this.comments = 0;
    this._decoder = null; // a TextDecoder, made on the first binary chunk
    this._started = false; // the first character has been seen (the BOM check is done)
    this._line = ""; // the unfinished line of the previous chunks
    this._afterCR = false; // the previous chunk ended with CR: an LF first in the next is its pair
    this._data = "";
    this._type = "";
    this._id = this.lastEventId;
    this._ended = false;
  }

  /**
   * Parse one more piece of the stream; the events it completed, in order.
   * @param {Uint8Array | ArrayBuffer | string} chunk
   * @returns {SSEEvent[]}
   */
  push(chunk) {
    if (this._ended) throw new Error("SSEReader: push() after end()");
    if (typeof chunk === "string") return this._text(chunk);
    // ignoreBOM keeps a BOM in the text: _text drops exactly one, however the stream was fed.
    if (this._decoder === null) this._decoder = new TextDecoder("utf-8", { ignoreBOM: true });
    return this._text(this._decoder.decode(chunk, { stream: true }));
  }

  /**
   * The stream ended: what is left (a line without its end, a block without its blank line, the
   * first bytes of a character) is discarded, as the standard says, and so is the `id:` of that
   * unfinished block (`lastEventId` stays the id of the last whole block: resuming after it
   * cannot skip the event that was cut off). Reconnect with `lastEventId`, after `retry` ms.
   * @returns {SSEEvent[]} always [] (kept a list, so a caller can treat it like `push`)
   */
  end() {
    this._ended = true;
    this._decoder = null;
    this._line = "";
    this._afterCR = false;
    this._data = "";
    this._type = "";
    return [];
  }

  _text(text) {
    const events = [];
    if (!text) return events;
    let start = 0;
    if (!this._started) {
      this._started = true;
      if (text.startsWith(BOM)) start = 1;
    }
    if (this._afterCR) {
      this._afterCR = false;
      if (text.charCodeAt(start) === LF) start += 1;
    }
    const length = text.length;
    for (let i = start; i < length; i += 1) {
      const code = text.charCodeAt(i);
      if (code !== LF && code !== CR) continue;
      const line = this._line + text.slice(start, i);
      this._line = "";
      if (code === CR) {
        if (i + 1 === length) this._afterCR = true;
        else if (text.charCodeAt(i + 1) === LF) i += 1;
      }
      start = i + 1;
      const event = this._lineDone(line);
      if (event !== null) events.push(event);
    }
    if (start < length) this._line += text.slice(start);
    return events;
  }

  /** One whole line: a field, a comment, or the blank line that dispatches. */
  _lineDone(line) {
    if (line === "") return this._dispatch();
    if (line.charCodeAt(0) === 0x3a) {
      this.comments += 1;
      return null;
    }
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 0x20) value = value.slice(1);
    }
    switch (field) {
      case "event":
        this._type = value;
        break;
      case "data":
        this._data += value + "\n";
        break;
      case "id":
        if (!value.includes("\u0000")) this._id = value;
        break;
      case "retry": {
        const ms = retryValue(value);
        if (ms !== null) this.retry = ms;
        break;
      }
      default:
        break; // unknown fields are ignored
    }
    return null;
  }

  _dispatch() {
    this.lastEventId = this._id;
    if (this._data === "") {
      this._type = "";
      return null;
    }
    const data = this._data.endsWith("\n") ? this._data.slice(0, -1) : this._data;
    const event = new SSEEvent(this._type || "message", data, this.lastEventId);
    this._data = "";
    this._type = "";
    return event;
  }
}

/** Every event of a whole stream (text or bytes) at once: `push` then `end`. */
export function parseAll(stream, options = {}) {
  const reader = new SSEReader(options);
  return [...reader.push(stream), ...reader.end()];
}
