// realtime_lab/static/session.js: the page's session cookie, read, set and cleared.
import assert from "node:assert/strict";
import test from "node:test";

import { load } from "./static.mjs";

const { Session, describe, tokenFrom, unknownSession } = await load("session.js");

const JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";

/** An `api()` (net.js) answering from `routes["METHOD /path"]`, recording every call. */
function fakeApi(routes) {
  const calls = [];
  const api = async (method, path, body, headers = {}) => {
    calls.push({ method, path, body, headers });
    const answer = routes[`${method} ${path}`];
    if (typeof answer === "function") return answer();
    return answer;
  };
  return { api, calls };
}

const ok = (json) => ({ ok: true, status: 200, json });
const refused = (status, code) => ({ ok: false, status, json: { error: { code, message: "m" } } });

test("tokenFrom: the token in what was pasted, or null", () => {
  assert.equal(tokenFrom(` ${JWT}\n`), JWT);
  assert.equal(tokenFrom(`Bearer ${JWT}`), JWT);
  assert.equal(tokenFrom(`Authorization: Bearer ${JWT}`), JWT);
  assert.equal(tokenFrom(""), null);
  assert.equal(tokenFrom("   "), null);
  assert.equal(tokenFrom(undefined), null);
  assert.equal(tokenFrom("two words"), null);
});

test("describe: one line for each state", () => {
  assert.equal(describe(unknownSession()), "unknown (the server did not answer)");
  assert.equal(describe({ auth: false, user: null, scopes: [] }), "auth off: no sign-in needed");
  assert.equal(describe({ auth: true, user: null, scopes: [] }), "not signed in");
  assert.equal(describe({ auth: true, user: "alice", scopes: [] }), "signed in as alice");
  assert.equal(
    describe({ auth: true, user: "bob", scopes: ["admin", "publish"] }),
    "signed in as bob (admin, publish)",
  );
});

test("read: the server's word; signedOut when auth is on and nobody is signed in", async () => {
  const routes = { "GET /api/session": ok({ auth: false, user: null, scopes: [], expires: null }) };
  const { api } = fakeApi(routes);
  const session = new Session(api);
  assert.equal(session.signedOut, false); // unknown: do not hold back
  assert.deepEqual(await session.read(), { auth: false, user: null, scopes: [], expires: null });
  assert.equal(session.signedOut, false);
  routes["GET /api/session"] = ok({ auth: true, user: null, scopes: [], expires: null });
  await session.read();
  assert.equal(session.signedOut, true);
  routes["GET /api/session"] = { ok: false, status: 500, json: null };
  assert.deepEqual(await session.read(), unknownSession());
});

test("signIn: the token goes once, as a bearer header; the state names the user", async () => {
  let signedIn = false;
  const { api, calls } = fakeApi({
    "POST /api/session": () => {
      signedIn = true;
      return ok({ user: "alice", scopes: ["publish"] });
    },
    "GET /api/session": () =>
      ok({ auth: true, user: signedIn ? "alice" : null, scopes: ["publish"], expires: 99 }),
    "DELETE /api/session": () => {
      signedIn = false;
      return ok({ user: null });
    },
  });
  const session = new Session(api);
  const result = await session.signIn(`Bearer ${JWT}`);
  assert.deepEqual(result, { ok: true, text: "signed in as alice (publish)" });
  assert.deepEqual(calls[0], {
    method: "POST",
    path: "/api/session",
    body: undefined,
    headers: { Authorization: `Bearer ${JWT}` },
  });
  assert.equal(session.state.expires, 99);
  assert.equal(session.signedOut, false);
  await session.signOut();
  assert.equal(session.state.user, null);
  assert.equal(session.signedOut, true);
  assert.deepEqual(
    calls.map((call) => `${call.method} ${call.path}`),
    ["POST /api/session", "GET /api/session", "DELETE /api/session", "GET /api/session"],
  );
  // Only the sign-in carries the token.
  assert.deepEqual(calls.slice(1).map((call) => call.headers), [{}, {}, {}]);
});

test("signIn: a refused token says why; nothing pasted sends nothing", async () => {
  const routes = { "POST /api/session": refused(401, "token-expired") };
  const { api, calls } = fakeApi(routes);
  const session = new Session(api);
  assert.deepEqual(await session.signIn("  "), { ok: false, text: "paste a token first" });
  assert.equal(calls.length, 0);
  assert.deepEqual(await session.signIn(JWT), {
    ok: false,
    text: "401: that token has expired: mint a new one",
  });
  routes["POST /api/session"] = refused(401, "invalid-token");
  assert.equal((await session.signIn(JWT)).text, "401: not a valid token for this server");
  routes["POST /api/session"] = refused(404, "auth-off");
  assert.equal(
    (await session.signIn(JWT)).text,
    "404: auth is off on this server: no sign-in needed",
  );
  routes["POST /api/session"] = { ok: false, status: 502, json: null };
  assert.equal((await session.signIn(JWT)).text, "502: HTTP 502");
});

test("signIn: a cookie the browser did not keep is not a session", async () => {
  const { api } = fakeApi({
    "POST /api/session": ok({ user: "alice", scopes: [] }),
    "GET /api/session": ok({ auth: true, user: null, scopes: [], expires: null }),
  });
  const session = new Session(api);
  assert.deepEqual(await session.signIn(JWT), {
    ok: false,
    text: "the browser did not keep the cookie",
  });
});
