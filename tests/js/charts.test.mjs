// realtime_lab/static/charts.js: the axes the charts draw.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const { axes, niceStep } = await load("charts.js");

test("niceStep: 1, 2 or 5 times a power of ten", () => {
  assert.equal(niceStep(100, 4), 50); // 25 -> 50
  assert.equal(niceStep(7, 6), 2); // 1.17 -> 2
  assert.equal(niceStep(1, 4), 0.5); // 0.25 -> 0.5
  assert.equal(niceStep(10, 10), 1);
  assert.equal(niceStep(0, 4), 1); // nothing to span: a step of 1, not 0
});

test("axes: no points, a small frame from 0", () => {
  assert.deepEqual(axes([{ points: [] }]), { xMax: 1, xStep: 0.2, yMin: 0, yMax: 0.5, yStep: 0.5 });
});

test("axes: rounded out to whole steps, below zero when a point is", () => {
  const series = [
    {
      points: [
        [0.5, 12],
        [3.2, 97],
      ],
    },
    { points: [[1, -4]] },
  ];
  const { xMax, xStep, yMin, yMax, yStep } = axes(series);
  assert.equal(yStep, 50);
  assert.deepEqual([yMin, yMax], [-50, 100]);
  assert.equal(xStep, 1);
  assert.equal(xMax, 4);
});
