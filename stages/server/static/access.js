// The server's optional access token, carried from the page's own address to everything it asks for.
//
// A server started with a token (`server.token` or MINDMIRROR_TOKEN) still serves the
// pages at / and /lipsync to anyone, but refuses /ws, /metrics and the model actions
// without it. A person opens the page as `http://host:8765/?token=...`; the page reads
// the token from there and passes it on: on the WebSocket URL as `?token=` (a browser
// cannot set headers on a WebSocket), on fetches as `Authorization: Bearer ...`, and on
// the links between the pages so the other page can connect too. Without `?token=` in
// the address nothing changes. The functions are pure (Node tests them); `TOKEN` and
// `authFetch` read the page's own location.

/** The `token` of a query string ("?token=abc&x=1" -> "abc"); null when absent or empty. */
export function tokenFrom(search) {
  const token = new URLSearchParams(search ?? "").get("token");
  return token ? token : null;
}

/** The page's WebSocket URL: ws: or wss: as the page is http: or https:, the token if any. */
export function socketUrl(loc, token = null) {
  const scheme = loc.protocol === "https:" ? "wss" : "ws";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}://${loc.host}/ws${query}`;
}

/** Fetch options with the token's `Authorization` header added (init's own headers kept). */
export function withAuth(init = {}, token = null) {
  if (!token) return init;
  const headers = new Headers(init.headers ?? {});
  headers.set("Authorization", `Bearer ${token}`);
  return { ...init, headers };
}

/** A relative link with the token in its query ("lipsync" -> "lipsync?token=abc"). */
export function linkWithToken(href, token = null) {
  if (!token) return href;
  const [path, hash = ""] = href.split("#", 2);
  const sep = path.includes("?") ? "&" : "?";
  return `${path}${sep}token=${encodeURIComponent(token)}${hash ? `#${hash}` : ""}`;
}

/** This page's token (from its address), or null. */
export const TOKEN = tokenFrom(globalThis.location?.search);

/** `fetch` with this page's token. */
export function authFetch(url, init = {}) {
  return fetch(url, withAuth(init, TOKEN));
}

/** Give the page's links to its other page (a.nav) this page's token. */
export function carryToken(root = globalThis.document) {
  if (!TOKEN || !root) return;
  for (const a of root.querySelectorAll("a.nav")) a.setAttribute("href", linkWithToken(a.getAttribute("href"), TOKEN));
}
