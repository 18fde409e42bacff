/* Who this page streams as: the server's session cookie, read, set and cleared.
 *
 * `EventSource` and the browser's `WebSocket` cannot send an `Authorization` header, so the
 * page trades the user's token for the server's HttpOnly `rtl_session` cookie once
 * (`POST /api/session` with `Authorization: Bearer <token>`); every pane's request then carries
 * the cookie by itself, and no script (this one included) can read it back. The token is sent
 * once and kept nowhere. `GET /api/session` says whether auth is on and who the cookie names;
 * `DELETE /api/session` clears it.
 */

/** What the page knows of its session; `auth` is null until the server has said. */
export function unknownSession() {
  return { auth: null, user: null, scopes: [], expires: null };
}

/**
 * The token in what the user pasted (the output of `realtime-lab token`, or a whole
 * `Authorization: Bearer ...` header), or null when there is none.
 */
export function tokenFrom(text) {
  const value = String(text ?? "")
    .trim()
    .replace(/^authorization:\s*/i, "")
    .replace(/^bearer\s+/i, "")
    .trim();
  return value && !/\s/.test(value) ? value : null;
}

/** One line for the session: "auth off", "not signed in", "signed in as alice (publish)". */
export function describe(state) {
  if (state.auth === null) return "unknown (the server did not answer)";
  if (!state.auth) return "auth off: no sign-in needed";
  if (!state.user) return "not signed in";
  const scopes = state.scopes && state.scopes.length ? ` (${state.scopes.join(", ")})` : "";
  return `signed in as ${state.user}${scopes}`;
}

/** What a refused sign-in means, from the server's error code. */
const SIGN_IN_REFUSALS = {
  "invalid-token": "not a valid token for this server",
  "token-expired": "that token has expired: mint a new one",
  unauthenticated: "paste a token first",
  "auth-off": "auth is off on this server: no sign-in needed",
};

/** The session of this page, through the page's API client (net.js `createApi`). */
export class Session {
  /** @param {Function} api `api(method, path, body, headers)` (net.js) */
  constructor(api) {
    this.api = api;
    this.state = unknownSession();
  }

  /** Whether the server wants a user and the page has none: authenticated calls would 401. */
  get signedOut() {
    return this.state.auth === true && !this.state.user;
  }

  /** Ask the server who the page's cookie names; the new state. Rejects when unreachable. */
  async read() {
    const res = await this.api("GET", "/api/session");
    const json = res.ok && res.json ? res.json : null;
    this.state = json
      ? {
          auth: Boolean(json.auth),
          user: json.user ?? null,
          scopes: Array.isArray(json.scopes) ? json.scopes : [],
          expires: typeof json.expires === "number" ? json.expires : null,
        }
      : unknownSession();
    return this.state;
  }

  /**
   * Trade the pasted token for the session cookie: `{ok: true, text}` once the server has set
   * it (and the state names the user), or `{ok: false, text}` saying why not.
   */
  async signIn(pasted) {
    const token = tokenFrom(pasted);
    if (token === null) return { ok: false, text: "paste a token first" };
    const res = await this.api("POST", "/api/session", undefined, {
      Authorization: `Bearer ${token}`,
    });
    if (!res.ok) {
      const code = res.json && res.json.error ? res.json.error.code : null;
      const why = SIGN_IN_REFUSALS[code] || (code ? code : `HTTP ${res.status}`);
      return { ok: false, text: `${res.status}: ${why}` };
    }
    await this.read(); // the server's own word, expiry included
    if (!this.state.user) return { ok: false, text: "the browser did not keep the cookie" };
    return { ok: true, text: describe(this.state) };
  }

  /** Clear the session cookie; the new state. Rejects when the server is unreachable. */
  async signOut() {
    await this.api("DELETE", "/api/session");
    return this.read();
  }
}
