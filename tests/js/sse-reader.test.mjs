// realtime_lab/static/sse-reader.js: the WHATWG event stream interpretation, rule by rule, fed
// whole, byte by byte and in threes (the cases mirror tests/protocol/test_sse_decode.py, which
// checks the server's own decoder against the same rules).
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const { SSEEvent, SSEReader, parseAll, retryValue } = await load("sse-reader.js");

const utf8 = new TextEncoder();
/** Bytes from a string of byte values ("\xef\xbb") or of text ("é"): latin1 when `raw`. */
const bytes = (text, raw = false) =>
  raw ? Uint8Array.from(text, (c) => c.charCodeAt(0)) : utf8.encode(text);

const CHUNKERS = {
  whole: (b) => [b],
  bytewise: (b) => Array.from(b, (_, i) => b.subarray(i, i + 1)),
  threes: (b) =>
    Array.from({ length: Math.ceil(b.length / 3) }, (_, i) => b.subarray(3 * i, 3 * i + 3)),
};

/** The events of `chunks`, and the reader after its end. */
function decode(chunks, options = {}) {
  const reader = new SSEReader(options);
  const events = [];
  for (const chunk of chunks) events.push(...reader.push(chunk));
  events.push(...reader.end());
  return { events, reader };
}

const E = (data, { type = "message", id = "" } = {}) => new SSEEvent(type, data, id);

/** [name, stream as text (or raw bytes when `raw`), events] */
const RULES = [
  // the standard's own examples
  ["stock-multiline", "data: YHOO\ndata: +2\ndata: 10\n\n", [E("YHOO\n+2\n10")]],
  [
    "comment-three-events-id-carry-and-reset",
    ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
    [E("first event", { id: "1" }), E("second event"), E(" third event")],
  ],
  ["empty-data-unterminated-dropped", "data\n\ndata\ndata\n\ndata:", [E(""), E("\n")]],
  // line endings
  ["lf", "data: a\ndata: b\n\n", [E("a\nb")]],
  ["crlf", "data: a\r\ndata: b\r\n\r\n", [E("a\nb")]],
  ["cr", "data: a\rdata: b\r\r", [E("a\nb")]],
  ["mixed", "data: a\rdata: b\r\n\n", [E("a\nb")]],
  ["lf-cr-is-two-endings", "data: a\n\rdata: b\n\n", [E("a"), E("b")]],
  ["not-breaks", "data: a\x0bb\x0cc\u2028d\u0085e\n\n", [E("a\x0bb\x0cc\u2028d\u0085e")]],
  // BOM and UTF-8
  ["bom-stripped", "\ufeffdata: a\n\n", [E("a")]],
  ["only-first-bom-stripped", "\ufeff\ufeffdata: a\n\n", []],
  ["bom-not-at-start-is-text", "\n\ufeffdata: a\n\n", []],
  ["bom-in-value-kept", "data: \ufeffa\n\n", [E("\ufeffa")]],
  ["utf8", "data: é漢🎉 同一个响应\n\n", [E("é漢🎉 同一个响应")]],
  ["invalid-byte-replaced", ["data: \xff\n\n"], [E("\ufffd")]],
  ["truncated-sequence", ["data: \xe6\xbcA\n\n"], [E("\ufffdA")]],
  ["encoded-surrogate", ["data: \xed\xa0\x80\n\n"], [E("\ufffd\ufffd\ufffd")]],
  ["partial-bom-is-invalid-text", ["\xef\xbbdata: a\n\n"], []],
  // comments
  ["comments-only", ": hi\n:\n\n", []],
  ["comment-inside-block", "data: a\n: c\ndata: b\n\n", [E("a\nb")]],
  ["colon-in-value-not-comment", "data: :x\n\n", [E(":x")]],
  // fields
  ["no-colon-empty-value", "data\n\n", [E("")]],
  ["colon-empty-value", "data:\n\n", [E("")]],
  ["no-space", "data:x\n\n", [E("x")]],
  ["one-space-stripped", "data:  x\n\n", [E(" x")]],
  ["tab-not-stripped", "data:\tx\n\n", [E("\tx")]],
  ["first-colon-splits", "data: a:b: c\n\n", [E("a:b: c")]],
  ["names-case-sensitive", "Data: x\n\n", []],
  ["space-before-colon-is-name", "data : x\n\n", []],
  ["unknown-fields-ignored", "foo: bar\nretry\ndata: x\n\n", [E("x")]],
  // event
  ["event", "event: add\ndata: x\n\n", [E("x", { type: "add" })]],
  ["last-event-wins", "event: a\nevent: b\ndata: x\n\n", [E("x", { type: "b" })]],
  ["empty-event-is-message", "event\ndata: x\n\n", [E("x")]],
  ["event-reset", "event: a\ndata: x\n\ndata: y\n\n", [E("x", { type: "a" }), E("y")]],
  ["event-reset-by-empty-block", "event: a\n\ndata: y\n\n", [E("y")]],
  // data
  ["only-one-trailing-lf-stripped", "data: a\ndata:\n\n", [E("a\n")]],
  ["empty-lines", "data\ndata\ndata\n\n", [E("\n\n")]],
  ["nul-in-data", "data: \u0000\n\n", [E("\u0000")]],
  ["blank-lines-only", "\n\n\n", []],
  // id
  ["carry", "id: 1\ndata: a\n\ndata: b\n\n", [E("a", { id: "1" }), E("b", { id: "1" })]],
  ["id-after-data", "data: a\nid: 1\n\n", [E("a", { id: "1" })]],
  ["id-only-block", "id: 1\n\ndata: a\n\n", [E("a", { id: "1" })]],
  ["id-reset", "id: 1\ndata: a\n\nid\ndata: b\n\n", [E("a", { id: "1" }), E("b")]],
  ["nul-id-ignored", "id: 1\n\nid: 2\u00003\ndata: a\n\n", [E("a", { id: "1" })]],
  ["id-one-space", "id:  1\ndata: a\n\n", [E("a", { id: " 1" })]],
];

for (const [name, stream, events] of RULES) {
  const raw = Array.isArray(stream);
  const b = bytes(raw ? stream[0] : stream, raw);
  for (const [how, chunker] of Object.entries(CHUNKERS)) {
    test(`rule ${name}, fed ${how}`, () => {
      assert.deepEqual(decode(chunker(b)).events, events);
    });
  }
  if (!raw) {
    test(`rule ${name}, fed as text one character at a time`, () => {
      assert.deepEqual(decode([...stream]).events, events);
    });
  }
}

/** [name, chunks (byte strings), events] */
const BOUNDARIES = [
  ["crlf-split", ["data: a\r", "\ndata: b\r\n\r\n"], [E("a\nb")]],
  ["crlf-split-empty", ["data: a\r", "", "\ndata: b\n\n"], [E("a\nb")]],
  ["crlf-split-then-lf", ["data: a\r", "\n", "\n"], [E("a")]],
  ["cr-then-crlf-is-two", ["data: a\r", "\r\n"], [E("a")]],
  ["crlf-split-is-one-ending", ["data: a\r", "\n"], []],
  ["cr-then-utf8", ["data: a\r", "\xc3", "\xa9: x\n\n"], [E("a")]],
  ["cr-then-partial-char", ["data: a\r", "\xc3"], []],
  ["cr-cr-then-lf", ["data: a\r\r", "\n"], [E("a")]],
  ["bom-split", ["\xef", "\xbb", "\xbfdata: a\n\n"], [E("a")]],
  ["bom-split-twice", ["\xef\xbb", "\xbf\xef\xbb\xbfdata: a\n\n"], []],
  ["bom-prefix-then-text", ["\xef", "data: a\n\n"], []],
  ["emoji-split", ["data: \xf0\x9f", "\x8e", "\x89\n\n"], [E("🎉")]],
  ["bad-split", ["data: \xe6", "\xbcA\n\n"], [E("\ufffdA")]],
  ["line-split", ["da", "ta: a", "b\n", "\n"], [E("ab")]],
  ["per-line", ["data: a\n", "\n", "data: b\n\n"], [E("a"), E("b")]],
];

for (const [name, chunks, events] of BOUNDARIES) {
  test(`chunk boundary ${name}`, () => {
    assert.deepEqual(decode(chunks.map((c) => bytes(c, true))).events, events);
  });
}

test("push returns only the events its chunk completed; comments are counted whole", () => {
  const reader = new SSEReader();
  assert.deepEqual(reader.push("data: a\n\ndata: b\n"), [E("a")]);
  assert.deepEqual(reader.push("\ndata: c\n\n"), [E("b"), E("c")]);
  assert.deepEqual(reader.push(": x"), []);
  assert.equal(reader.comments, 0);
  assert.deepEqual(reader.push("\n"), []);
  assert.equal(reader.comments, 1);
});

test("a CR that ends a text chunk pairs with an LF that starts the next", () => {
  const reader = new SSEReader();
  assert.deepEqual(reader.push("data: a\r"), []);
  assert.deepEqual(reader.push(""), []);
  assert.deepEqual(reader.push("\n\r"), [E("a")]); // CRLF ends the line, CR the block
  assert.deepEqual(reader.push("\ndata: b\n\n"), [E("b")]); // this LF is its own empty line
});

/** [name, stream, retry after it] */
const RETRIES = [
  ["never", "", null],
  ["applies-before-blank-line", "retry: 1000\n", 1000],
  ["zero", "retry: 0\n\n", 0],
  ["no-space", "retry:5\n\n", 5],
  ["leading-zeros", "retry: 0010\n\n", 10],
  ["last-wins", "retry: 1\nretry: 2\n\n", 2],
  ["invalid-keeps-previous", "retry: 1\nretry: x\n\n", 1],
  ["no-value", "retry\n\n", null],
  ["empty", "retry: \n\n", null],
  ["trailing-letter", "retry: 12abc\n\n", null],
  ["negative", "retry: -1\n\n", null],
  ["plus", "retry: +1\n\n", null],
  ["decimal", "retry: 1.5\n\n", null],
  ["exponent", "retry: 1e3\n\n", null],
  ["second-space-not-digit", "retry:  100\n\n", null],
  ["trailing-space", "retry: 100 \n\n", null],
  ["arabic-digits", "retry: ١٢\n\n", null],
  ["superscript", "retry: ²\n\n", null],
  ["largest-safe", `retry: ${Number.MAX_SAFE_INTEGER}\n\n`, Number.MAX_SAFE_INTEGER],
  ["beyond-safe", `retry: ${Number.MAX_SAFE_INTEGER + 1}\n\n`, null],
  ["very-long-zero-padded", `retry: ${"0".repeat(10_000)}7\n\n`, 7],
  ["very-long", `retry: ${"9".repeat(10_000)}\n\n`, null],
  ["kept-when-event-discarded", "retry: 5\ndata: x", 5],
];

for (const [name, stream, retry] of RETRIES) {
  test(`retry ${name}`, () => {
    assert.equal(decode([bytes(stream)]).reader.retry, retry);
  });
}

test("retryValue is the field rule alone", () => {
  assert.equal(retryValue("250"), 250);
  assert.equal(retryValue(""), null);
  assert.equal(retryValue(" 1"), null);
});

/** [name, stream, lastEventId after it] */
const LAST_IDS = [
  ["never", "", ""],
  ["id-only-block-commits", "id: 1\n\n", "1"],
  ["empty-id-resets", "id: 1\n\nid\n\n", ""],
  ["nul-ignored", "id: 1\n\nid: 2\u0000\n\n", "1"],
  ["kept-by-later-events", "id: 1\ndata: a\n\ndata: b\n\n", "1"],
  // The id of an event cut off by the disconnect was never delivered: resuming after it would
  // skip that event.
  ["uncommitted-id-discarded", "id: 1\ndata: a\n\nid: 2\ndata: b\n", "1"],
  ["partial-line-discarded", "id: 1\n\nid: 2", "1"],
];

for (const [name, stream, lastId] of LAST_IDS) {
  test(`last event id ${name}`, () => {
    assert.equal(decode([bytes(stream)]).reader.lastEventId, lastId);
  });
}

test("comments are counted per whole line, whatever the line end", () => {
  for (const [stream, comments] of [
    [":\n", 1],
    [": ping\n\n: ping\n\n", 2],
    [": a\r\n: b\r: c\n", 3],
    ["data: :no\n\n", 0],
    [" : no\n\n", 0],
    [": partial", 0],
  ]) {
    assert.equal(decode([stream]).reader.comments, comments, JSON.stringify(stream));
  }
});

test("a reconnection starts from the id in force: an event without id: keeps it", () => {
  // The fetch stream's opening `chat` block carries `retry:` and no id.
  const resumed = "retry: 1000\nevent: chat\ndata: {}\n\nid: c-4\ndata: x\n\n";
  const kept = decode([resumed], { lastEventId: "c-3" });
  assert.deepEqual(kept.events, [E("{}", { type: "chat", id: "c-3" }), E("x", { id: "c-4" })]);
  // The standard's literal rule (the default): a fresh stream's buffer is empty.
  const literal = decode([resumed]);
  assert.equal(literal.events[0].lastEventId, "");
  assert.equal(literal.reader.lastEventId, "c-4");
});

test("end discards the unfinished block, its id with it, and refuses more", () => {
  const reader = new SSEReader({ lastEventId: "c-1" });
  assert.deepEqual(reader.push("id: c-2\ndata: cut off\n"), []);
  assert.deepEqual(reader.end(), []);
  assert.equal(reader.lastEventId, "c-1");
  assert.deepEqual(reader.end(), []);
  assert.throws(() => reader.push("data: x\n\n"), /after end/);
});

test("an ArrayBuffer is read like its bytes", () => {
  const buffer = bytes("id: 7\ndata: ok\n\n").buffer;
  assert.deepEqual(decode([buffer]).events, [E("ok", { id: "7" })]);
});

test("a long line in many chunks is one event", () => {
  const payload = "x".repeat(200_000);
  const stream = bytes(`data: ${payload}\n\n`);
  const chunks = [];
  for (let i = 0; i < stream.length; i += 7) chunks.push(stream.subarray(i, i + 7));
  assert.deepEqual(decode(chunks).events, [E(payload)]);
});

// The server's fetch stream as it is on the wire (transports/fetch.py): retry: joined to the
// chat block, heartbeats, token events without a name, the end named.
const WIRE = [
  "retry: 1000\r\nevent: chat\r\n",
  'data: {"chat": {"id": "c1", "channel": "chat.c1", "prompt": "同一个响应"}}\r\n\r\n',
  ": ping\n\n",
  'id: c1-1\ndata: {"id": "c1-1", "type": "token", "data": {"text": "Hé"}}\n\n',
  'id: c1-2\ndata: {"id": "c1-2", "type": "token", "data": {"text": " 漢🎉"}}\n\n',
  'event: end\nid: c1-3\ndata: {"id": "c1-3", "type": "end", "data": {"reason": "done"}}\n\n',
].join("");

test("the server's stream, cut at every byte, gives the same events", () => {
  const whole = bytes(WIRE);
  const expected = parseAll(whole);
  assert.deepEqual(
    expected.map((e) => [e.type, e.lastEventId]),
    [
      ["chat", ""],
      ["message", "c1-1"],
      ["message", "c1-2"],
      ["end", "c1-3"],
    ],
  );
  assert.equal(JSON.parse(expected[2].data).data.text, " 漢🎉");
  for (let cut = 1; cut < whole.length; cut += 1) {
    const { events, reader } = decode([whole.subarray(0, cut), whole.subarray(cut)]);
    assert.deepEqual(events, expected, `cut at byte ${cut}`);
    assert.equal(reader.retry, 1000);
    assert.equal(reader.comments, 1);
  }
  for (let a = 1; a < whole.length; a += 13) {
    for (let b = a + 1; b < whole.length; b += 17) {
      const chunks = [whole.subarray(0, a), whole.subarray(a, b), whole.subarray(b)];
      assert.deepEqual(decode(chunks).events, expected, `cut at ${a} and ${b}`);
    }
  }
});
