// realtime_lab/static/format.js: how the dashboard writes its figures.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const { escapeHtml, fmtBytes, fmtMs, fmtNum, percentile } = await load("format.js");

test("fmtMs: a dash for nothing, one decimal below 10, whole ms above", () => {
  assert.equal(fmtMs(null), "–");
  assert.equal(fmtMs(undefined), "–");
  assert.equal(fmtMs(0), "0.0");
  assert.equal(fmtMs(9.94), "9.9");
  assert.equal(fmtMs(-3.25), "-3.3");
  assert.equal(fmtMs(10), "10");
  assert.equal(fmtMs(123.5), "124");
});

test("fmtBytes: B below 10,000, then kB, then MB", () => {
  assert.equal(fmtBytes(null), "–");
  assert.equal(fmtBytes(9999), "9999 B");
  assert.equal(fmtBytes(10000), "9.8 kB");
  assert.equal(fmtBytes(10e6), "9.5 MB");
});

test("fmtNum: a dash for nothing, else fixed decimals", () => {
  assert.equal(fmtNum(null), "–");
  assert.equal(fmtNum(2.345, 1), "2.3");
  assert.equal(fmtNum(7), "7");
});

test("percentile: nearest rank, null when empty", () => {
  assert.equal(percentile([], 50), null);
  const sorted = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
  assert.equal(percentile(sorted, 50), 5);
  assert.equal(percentile(sorted, 95), 10);
  assert.equal(percentile(sorted, 0), 1);
  assert.equal(percentile([42], 95), 42);
});

test("escapeHtml: markup characters become entities", () => {
  assert.equal(escapeHtml(`<b a="1">&'</b>`), "&lt;b a=&quot;1&quot;&gt;&amp;&#39;&lt;/b&gt;");
});
