// The bandwidth meter's arithmetic: bytes and messages per second on every link, from the
// running totals in successive `stats` messages.
//
// The runtime reports each link (stats.hops, runtime/aggregate.py) as totals since it
// started: `bytes_sent` / `messages_sent` from the writing end, `bytes_received` /
// `messages_received` from the reading end, and it leaves out figures that are still 0.
// A rate is how much a total grew over the page's own clock across the stats messages of
// the last `windowMs` (3 s), so one late message makes no spike. A total that shrinks (a
// rank restarted) starts that link's window again instead of showing a negative rate.
// When the runtime names the nodes at a link's ends (`src_node`, `dst_node`, as the
// /metrics labels do), a row says whether the link crosses between machines. Rows come
// in the order frames flow. Pure: Node tests it (test_page_meters_js.py).

import { nodeName } from "./rank_nodes.js";

export const RATE_WINDOW_MS = 3000;

/** A link's total of `what` ("bytes" or "messages"): the sender's count, else the
 *  receiver's; 0 when neither is there yet (the runtime omits zeros). */
export function linkTotal(link, what) {
  for (const key of [`${what}_sent`, `${what}_received`]) {
    if (typeof link?.[key] === "number" && Number.isFinite(link[key])) return link[key];
  }
  return 0;
}

/** "ingest#0->vision#0" -> ["ingest#0", "vision#0"]; a name without an arrow is its own source. */
export function linkEnds(name) {
  const parts = String(name).split(/->|>/);
  return parts.length === 2 ? parts : [String(name), ""];
}

export class LinkRates {
  constructor(windowMs = RATE_WINDOW_MS) {
    this.windowMs = windowMs;
    this.history = new Map();  // link name -> [{t, bytes, messages}], oldest first
  }

  /**
   * One stats message's `hops`, received at page time `tMs`; a row per link in it:
   * {name, from, to, bytes, messages, bytesPerS, messagesPerS (null until two samples),
   *  srcNode, dstNode, crossNode (null when the nodes are not reported)}.
   */
  update(hops, tMs) {
    const rows = [];
    const seen = new Set();
    for (const [name, link] of Object.entries(hops ?? {})) {
      if (!link || typeof link !== "object" || Array.isArray(link)) continue;
      seen.add(name);
      const sample = { t: tMs, bytes: linkTotal(link, "bytes"), messages: linkTotal(link, "messages") };
      let h = this.history.get(name) ?? [];
      const last = h[h.length - 1];
      if (last && (sample.bytes < last.bytes || sample.messages < last.messages)) h = [];  // counters restarted
      else if (last && sample.t <= last.t) h.pop();  // same instant: the newer totals win
      h.push(sample);
      while (h.length > 2 && h[1].t <= tMs - this.windowMs) h.shift();  // h[0]: the window's start
      this.history.set(name, h);
      const [from, to] = linkEnds(name);
      const srcNode = nodeName(link.src_node);
      const dstNode = nodeName(link.dst_node);
      rows.push({
        name, from, to, bytes: sample.bytes, messages: sample.messages,
        bytesPerS: rate(h, "bytes"), messagesPerS: rate(h, "messages"),
        srcNode, dstNode, crossNode: srcNode && dstNode ? srcNode !== dstNode : null,
      });
    }
    for (const name of [...this.history.keys()]) if (!seen.has(name)) this.history.delete(name);
    return inPipelineOrder(rows);
  }

  clear() {
    this.history.clear();
  }
}

function rate(h, key) {
  if (h.length < 2) return null;
  const first = h[0];
  const last = h[h.length - 1];
  return ((last[key] - first[key]) * 1000) / (last.t - first.t);
}

/**
 * Rows in the order frames flow (the runtime's order depends on which rank reported
 * first): the ends sorted topologically, sources first, ties by name; links by their
 * source's place, then their destination's. Links in a cycle keep their names' order.
 */
export function inPipelineOrder(rows) {
  const ends = [...new Set(rows.flatMap((r) => [r.from, r.to]))].sort();
  const into = new Map(ends.map((e) => [e, 0]));
  for (const r of rows) if (r.to) into.set(r.to, into.get(r.to) + 1);
  const place = new Map();
  let ready = ends.filter((e) => into.get(e) === 0);
  while (ready.length) {
    const end = ready.shift();
    place.set(end, place.size);
    for (const r of rows.filter((row) => row.from === end && row.to)) {
      into.set(r.to, into.get(r.to) - 1);
      if (into.get(r.to) === 0) ready = [...ready, r.to].sort();
    }
  }
  for (const e of ends) if (!place.has(e)) place.set(e, place.size);  // in a cycle: after the rest
  const key = (r) => [place.get(r.from), r.to ? place.get(r.to) : -1];
  return [...rows].sort((a, b) => {
    const [fa, ta] = key(a);
    const [fb, tb] = key(b);
    return fa - fb || ta - tb || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  });
}

/** All links' bytes per second, and those of links between two different nodes (null
 *  when no link names its nodes); null rates count as nothing yet. */
export function rateTotals(rows) {
  const sum = (list) => list.reduce((s, r) => s + (r.bytesPerS ?? 0), 0);
  const known = rows.filter((r) => r.crossNode !== null);
  return { bytesPerS: sum(rows), crossNodeBytesPerS: known.length ? sum(known.filter((r) => r.crossNode)) : null };
}

/** MB/s (10^6 bytes) with a steady number of decimals: "0.000", "0.612", "4.21", "37.5". */
export function megabytesPerS(bytesPerS) {
  if (typeof bytesPerS !== "number" || !Number.isFinite(bytesPerS)) return "–";
  const v = bytesPerS / 1e6;
  return v.toFixed(v < 1 ? 3 : v < 10 ? 2 : 1);
}

/** Messages per second: "0.0", "19.6", "240". */
export function perSecond(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "–";
  return v.toFixed(v < 100 ? 1 : 0);
}
