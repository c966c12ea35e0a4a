// Rank liveness per node: which ranks of the job are up, grouped by the machine they run on.
//
// `stats.ranks` (runtime/aggregate.py) lists every rank with its role, whether the server
// rank heard from it lately (`alive`) and how long ago (`last_seen_s`). It may name the
// rank's `node`; where it does not, GET /health does (`ranks[].node`, `device`), and the page
// asks it for the ranks it cannot place. Ranks no source places are grouped last, under
// "node not reported". A job without host names numbers its nodes (0, 1, ...): those
// read "node 0", "node 1". Pure: Node tests it (test_page_meters_js.py).

/** A node as the page names it: a host name as it is; a bare node index (0, "1") as
 *  "node 0", "node 1" (what a torchrun job without host names reports); null when none. */
export function nodeName(v) {
  if (Number.isInteger(v) && v >= 0) return `node ${v}`;
  if (typeof v !== "string" || !v.trim()) return null;
  return /^\d+$/.test(v.trim()) ? `node ${v.trim()}` : v.trim();
}

/** rank number -> {node, device} from a GET /health body (entries without a node are skipped). */
export function placesFromHealth(health) {
  const places = new Map();
  for (const r of Array.isArray(health?.ranks) ? health.ranks : []) {
    const node = nodeName(r?.node);
    if (Number.isInteger(r?.rank) && node !== null) {
      places.set(r.rank, { node, device: typeof r.device === "string" ? r.device : null });
    }
  }
  return places;
}

/** The node of `rank` (a stats.ranks entry): its own `node`, else the one /health gave, else null. */
export function nodeOf(rank, places = new Map()) {
  return nodeName(rank?.node) ?? places.get(rank?.rank)?.node ?? null;
}

/** Whether some rank has no node from stats or from `places` (then /health is worth asking). */
export function needsPlaces(ranks, places = new Map()) {
  return (Array.isArray(ranks) ? ranks : []).some((r) => Number.isInteger(r?.rank) && nodeOf(r, places) === null);
}

/**
 * The ranks grouped by node: [{node (null: not reported), up, total, ranks: [{rank, role,
 * alive, lastSeenS, device}]}]. Ranks go in rank order; nodes in the order of their lowest
 * rank, the unplaced group last.
 */
export function groupByNode(ranks, places = new Map()) {
  const list = (Array.isArray(ranks) ? ranks : []).filter((r) => Number.isInteger(r?.rank));
  const groups = new Map();
  for (const r of [...list].sort((a, b) => a.rank - b.rank)) {
    const node = nodeOf(r, places);
    const group = groups.get(node) ?? groups.set(node, { node, up: 0, total: 0, ranks: [] }).get(node);
    const alive = r.alive === true;
    group.ranks.push({
      rank: r.rank, role: typeof r.role === "string" ? r.role : "?", alive,
      lastSeenS: typeof r.last_seen_s === "number" && Number.isFinite(r.last_seen_s) ? r.last_seen_s : null,
      device: typeof r.device === "string" ? r.device : (places.get(r.rank)?.device ?? null),
      clockOffsetMs: typeof r.clock_offset_ms === "number" && Number.isFinite(r.clock_offset_ms) ? r.clock_offset_ms : null,
    });
    group.total += 1;
    group.up += alive ? 1 : 0;
  }
  const out = [...groups.values()];
  return [...out.filter((g) => g.node !== null), ...out.filter((g) => g.node === null)];
}

/** A rank's hover text: "rank 1, generator on cuda:0: up, heard from 0.1 s ago; clock
 *  offset +0.4 ms" (the offset only where the runtime estimates one). */
export function rankTitle(r) {
  const seen = r.lastSeenS === null ? "" : `${r.alive ? ", heard from" : ", silent for"} ${r.lastSeenS.toFixed(1)} s${r.alive ? " ago" : ""}`;
  const offset = r.clockOffsetMs == null ? "" : `; clock offset ${r.clockOffsetMs >= 0 ? "+" : ""}${r.clockOffsetMs.toFixed(1)} ms`;
  return `rank ${r.rank}, ${r.role}${r.device ? ` on ${r.device}` : ""}: ${r.alive ? "up" : "down"}${seen}${offset}`;
}
