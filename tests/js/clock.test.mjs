// realtime_lab/static/clock.js: the server clock offset, NTP-style.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const { Clock } = await load("clock.js");

test("the sample with the shortest round trip sets the offset", () => {
  let now = 0;
  let changes = 0;
  const clock = new Clock({ now: () => now, origin: 1000, onChange: () => (changes += 1) });
  assert.equal(clock.rtt, null);
  assert.equal(clock.wall(), 1000);
  clock.add(0, 100, 550); // midpoint 50, offset 500, rtt 100
  assert.deepEqual([clock.offset, clock.rtt], [500, 100]);
  clock.add(200, 210, 905); // midpoint 205, offset 700, rtt 10: better
  assert.deepEqual([clock.offset, clock.rtt], [700, 10]);
  clock.add(300, 400, 0); // worse round trip: ignored
  assert.deepEqual([clock.offset, clock.rtt], [700, 10]);
  assert.equal(clock.server(1), 701);
  assert.equal(changes, 3);
});

test("only the last 20 samples count", () => {
  const clock = new Clock({ now: () => 0, origin: 0 });
  clock.add(0, 1, 100); // the best, until 20 newer ones push it out
  for (let i = 0; i < 20; i += 1) clock.add(0, 50, 25 + 7);
  assert.deepEqual([clock.offset, clock.rtt], [7, 50]);
});

test("age() is the time since the last sample", () => {
  let now = 5;
  const clock = new Clock({ now: () => now, origin: 0 });
  assert.equal(clock.age(), 5);
  clock.add(0, 1, 0);
  now = 12;
  assert.equal(clock.age(), 7);
});
