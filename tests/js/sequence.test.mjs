// The dashboard's copy of the sequence rule (realtime_lab/static/sequence.js) against the table
// every implementation shares: tests/protocol/sequence_cases.json (format described in
// tests/protocol/test_sequence.py). Run with `node --test tests/js/`; make test runs it through
// tests/protocol/test_sequence_js.py.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";

const here = (path) => new URL(path, import.meta.url);

// Imported from its source as a data: URL, which is always an ES module: node before 20.19 / 22.7
// would read a plain .js file outside a "type": "module" package as CommonJS, and the static
// directory is the browser's, with no package.json to say otherwise.
const source = readFileSync(here("../../realtime_lab/static/sequence.js"), "utf-8");
const { MAX_SKIPPED_RANGES, Sequence, Verdict, parseId } = await import(
  `data:text/javascript;base64,${Buffer.from(source).toString("base64")}`
);

const CASES = JSON.parse(readFileSync(here("../protocol/sequence_cases.json"), "utf-8"));

function counts(sequence) {
  const { gaps, duplicates, reordered, resets } = sequence;
  return { gaps, duplicates, reordered, resets };
}

for (const c of CASES) {
  test(`table: ${c.name}`, () => {
    const sequence = new Sequence(c.after);
    const verdicts = c.events.map((event) => {
      if (event.forget) {
        sequence.forget();
        return null;
      }
      return sequence.observe(event.id, event.reset);
    });
    assert.deepEqual(verdicts, c.verdicts);
    assert.deepEqual(counts(sequence), c.counts);
  });
}

test("the table covers every verdict", () => {
  const seen = new Set(CASES.flatMap((c) => c.verdicts));
  assert.deepEqual(seen, new Set([...Object.values(Verdict), null]));
});

test("the constructor's default is no run", () => {
  const sequence = new Sequence();
  assert.equal(sequence.last, null);
  assert.equal(sequence.observe("a-40"), "new");
  assert.equal(sequence.gaps, 0);
});

test("the position and the skipped record are readable", () => {
  const sequence = new Sequence("k3x9-41");
  assert.deepEqual([sequence.epoch, sequence.last], ["k3x9", 41]);
  sequence.observe("k3x9-45");
  assert.deepEqual(sequence.skipped, [[42, 44]]);
  sequence.observe("k3x9-43");
  assert.deepEqual(sequence.skipped, [[42, 42], [44, 44]]);
  sequence.skipped.length = 0; // a copy: the record is not the caller's to change
  assert.equal(sequence.skipped.length, 2);
  assert.equal(MAX_SKIPPED_RANGES, 64);
});

test("non-string ids are foreign", () => {
  const sequence = new Sequence("a-1");
  for (const id of [undefined, null, 7, {}, ["a-2"]]) {
    assert.equal(sequence.observe(id), "foreign");
  }
  assert.deepEqual(counts(sequence), { gaps: 0, duplicates: 0, reordered: 0, resets: 0 });
  assert.equal(sequence.last, 1);
});

test("a seq beyond the safe integers is foreign (the one difference from Python)", () => {
  assert.deepEqual(parseId(`a-${Number.MAX_SAFE_INTEGER}`), {
    epoch: "a",
    seq: Number.MAX_SAFE_INTEGER,
  });
  assert.equal(parseId("a-9007199254740992"), null);
  assert.equal(new Sequence("a-1").observe("a-999999999999999999"), "foreign");
});
