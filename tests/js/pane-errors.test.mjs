// realtime_lab/static/pane-errors.js: what a pane does about a failure.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const { HttpError, judge, problemFrom } = await load("pane-errors.js");

test("a 4xx answer gives up, with the server's message", () => {
  assert.deepEqual(judge({ status: 404, error: { code: "unknown_channel", message: "no such" } }), {
    action: "give-up",
    text: "404 no such",
  });
  assert.deepEqual(judge({ status: 400 }), { action: "give-up", text: "400 " });
});

test("a 5xx answer, a network failure or a closed socket is retried", () => {
  assert.deepEqual(judge({ status: 503 }), { action: "retry", text: "HTTP 503" });
  assert.deepEqual(judge({ why: "request failed" }), { action: "retry", text: "request failed" });
  assert.deepEqual(judge({ why: "closed (1006)" }), { action: "retry", text: "closed (1006)" });
  assert.deepEqual(judge({}), { action: "retry", text: "request failed" });
});

test("problemFrom: an HttpError keeps its status and error; anything else failed", async () => {
  const response = {
    status: 429,
    json: async () => ({ error: { code: "slow", message: "down" } }),
  };
  const err = await HttpError.from(response);
  assert.equal(err.message, "HTTP 429");
  assert.deepEqual(problemFrom(err), { status: 429, error: { code: "slow", message: "down" } });
  const bare = await HttpError.from({ status: 500, json: async () => JSON.parse("<") });
  assert.deepEqual(problemFrom(bare), { status: 500, error: null });
  assert.deepEqual(problemFrom(new TypeError("Failed to fetch")), { why: "request failed" });
});
