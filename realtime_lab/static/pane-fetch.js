/* Fetch streaming, the ChatGPT way: POST the prompt, read the answer from the same response.
 *
 * One `fetch()` POSTs the chat request to `/api/chats/stream` and reads the response body with
 * `response.body.getReader()`; the body is Server-Sent Events (sse-reader.js parses it): a
 * `chat` event naming the chat, then the chat's events, with the envelopes and ids of
 * `/sse/chat.<id>`. No EventSource: it cannot POST, and cannot send a header of its own.
 *
 * Its own chat: the request starts the chat, so this pane cannot follow the chat the other panes
 * read. It POSTs the same prompt, seed and pace, which give the same text (the answer is a
 * function of them), and says so in its note. A run that names a chat without its parameters
 * (a chat the page did not start) is followed from its start instead: `Last-Event-ID: <id>-0`
 * (a chat's ids are `<chat id>-<n>`). It has nothing to do on the ticker, which no POST starts.
 *
 * Resuming, as `@microsoft/fetch-event-source` does: after a cut, a network failure or a stream
 * that closes before the chat's `end`, the same POST again with `Last-Event-ID: <last id>`
 * continues the same chat after that id. The growing pause between tries stops at the server's
 * `retry:` (the wait an EventSource would take): the server cancels a chat whose stream is gone
 * after its abort grace (3 s by default), so a resume must come well within it. A cut before the
 * `chat` event leaves no id to resume from: the retry starts a new chat, and the server cancels
 * the abandoned one after its grace.
 *
 * Stop aborts the request: the server then cancels the chat after its grace. After the chat's
 * `end` the pane reads the response to its close (the server closes it right after the end), so
 * the server counts the stream's last bytes; if it does not close within DRAIN_MS, it aborts.
 *
 * Refusals (401, 403, 429 with Retry-After, other 4xx) come with their status, as for the
 * polling panes, and go to pane-errors.js like every pane's.
 */

import { Pane } from "./pane.js";
import { HttpError, problemFrom } from "./pane-errors.js";
import { SSEReader } from "./sse-reader.js";

/** The endpoint that starts a chat and streams it back. */
export const STREAM_PATH = "/api/chats/stream";
/** Milliseconds the pane waits for the server to close the response after the chat's end. */
export const DRAIN_MS = 2000;
const EVENT_STREAM = "text/event-stream";

export default class FetchPane extends Pane {
  static connections = 1; // the stream (one POST at a time)

  clear(after = null) {
    super.clear(after);
    this.chatId = null; // the chat this pane streams, once the server has named it
    this.chatsNamed = []; // the chat each response named, in order (all the same, or a bug)
    this.lastEventId = ""; // the SSE last event id: what a resume sends as Last-Event-ID
    this.retryMs = null; // the server's `retry:`
    this.atEnd = false;
  }

  unsupported(run) {
    if (run.mode === "chat") return null;
    return "not on the ticker: each POST here starts a chat, and the ticker is not one";
  }

  /** Where a (re)connection resumes: the last event id, else the chat's start, else nowhere. */
  resumeFrom() {
    if (this.lastEventId) return this.lastEventId;
    const chat = this.chatId ?? this.followed();
    return chat ? `${chat}-0` : "";
  }

  /** The id of the run's chat when this pane is to follow it rather than start its own. */
  followed() {
    const run = this.run;
    return run && !run.params && run.chat ? run.chat.id : null;
  }

  /** The request's body: the run's chat parameters (a resume sends them too: the same POST). */
  body() {
    return this.run.params ?? {};
  }

  url() {
    return `${STREAM_PATH}?${this.query("")}`;
  }

  maxBackoffMs() {
    return Math.max(200, Math.min(super.maxBackoffMs(), this.retryMs ?? Infinity));
  }

  open(after) {
    const { budget, clock } = this.deps;
    const controller = new AbortController();
    this.controller = controller;
    this.release = budget.hold(this.key);
    this.m.requests += 1;
    // Time to first token from this pane's own prompt (its first POST), not the other chat's.
    if (this.t0 === null && this.run.params) this.t0 = clock.now();
    this.stream(this.gen, controller, this.release, after);
  }

  async stream(gen, controller, release, after) {
    const fetch = this.deps.fetch ?? globalThis.fetch;
    const headers = { "Content-Type": "application/json", Accept: EVENT_STREAM };
    if (after) headers["Last-Event-ID"] = after;
    try {
      const response = await fetch(this.url(), {
        method: "POST",
        headers,
        body: JSON.stringify(this.body()),
        signal: controller.signal,
        cache: "no-store",
        credentials: "same-origin", // the session cookie, when signed in
      });
      if (!response.ok) throw await HttpError.from(response);
      if (gen !== this.gen) return;
      const type = (response.headers.get("Content-Type") || "").toLowerCase();
      if (response.status === 204 || !type.startsWith(EVENT_STREAM) || !response.body) {
        release();
        this.finish("error", notAStream(response.status, type));
        return;
      }
      this.opened();
      await this.read(gen, response.body.getReader());
    } catch (err) {
      release();
      if (gen !== this.gen) return; // aborted: a cut, a stop, or the end's drain ran out
      this.failed(problemFrom(err));
      return;
    } finally {
      release();
      if (this.controller === controller) {
        clearTimeout(this.drainTimer);
        this.controller = null;
      }
    }
    if (gen !== this.gen) return; // read to the close after the end (or cut, or stopped)
    this.failed({ why: "the stream closed before the chat ended" });
  }

  /** Read the body to its end; the events go to the pane while it still wants them. */
  async read(gen, reader) {
    const { clock } = this.deps;
    const sse = new SSEReader({ lastEventId: this.lastEventId });
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (gen !== this.gen) continue; // after the end: drain what is left
      const received = clock.wall();
      for (const event of sse.push(value)) {
        this.message(event, received);
        if (gen !== this.gen) break;
      }
      if (gen === this.gen) {
        this.lastEventId = sse.lastEventId;
        if (sse.retry !== null) this.retryMs = sse.retry;
      }
    }
    sse.end();
  }

  /** One SSE event of the response. */
  message(event, received) {
    if (event.type === "chat") {
      this.named(event.data);
    } else if (event.type === "error") {
      // The server's own `event: error` (this client fell behind); it closes the stream next.
      let data = {};
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        data = {};
      }
      this.note(`server: ${data.code || "error"}, resuming after ${data.last_id || "?"}`);
    } else {
      this.frame(event.data, received); // a token, the end, a reset, an application event
    }
  }

  /** The opening `chat` event: which chat this stream is. */
  named(data) {
    let chat = null;
    try {
      chat = JSON.parse(data).chat;
    } catch (err) {
      chat = null;
    }
    if (!chat || typeof chat.id !== "string") {
      this.note("a chat event without a chat was ignored");
      return;
    }
    this.chatsNamed.push(chat.id);
    if (this.chatId === chat.id) return; // a resume: the same chat, as it should be
    if (this.chatId !== null) {
      this.note(`the server resumed chat ${chat.id}, not ${this.chatId}`);
      return;
    }
    this.chatId = chat.id;
    const others = this.run.chat ? this.run.chat.id : null;
    if (this.followed()) {
      this.note(`chat ${chat.id}, followed from its start (Last-Event-ID ${chat.id}-0)`);
    } else {
      this.note(`own chat ${chat.id}: same prompt, seed and text as ${others || "the others'"}`);
      this.noteEl.title =
        `This pane's POST started chat ${chat.id}; the other panes read chat ${others || "?"}. ` +
        "Both have the same prompt and seed, so the same text.";
    }
  }

  handle(env, received) {
    this.atEnd = Boolean(env && env.type === "end");
    try {
      super.handle(env, received);
    } finally {
      this.atEnd = false;
    }
  }

  stop() {
    const chat = this.active && !this.ended ? this.chatId : null;
    super.stop();
    if (chat) this.note(`stopped: request aborted, so the server cancels chat ${chat}`);
  }

  shut() {
    const controller = this.controller;
    if (!controller) return;
    if (this.atEnd) {
      // The chat's end: the server closes the response next. Read it to its close.
      this.drainTimer = setTimeout(() => controller.abort(), DRAIN_MS);
      return;
    }
    this.controller = null;
    controller.abort();
    if (this.release) this.release(); // the connection is gone now, not when the read rejects
  }
}

function notAStream(status, type) {
  if (status === 204) return "204: the server has nothing more to stream for this chat";
  return `HTTP ${status}, not an event stream (${type || "no Content-Type"})`;
}
