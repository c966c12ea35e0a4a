// The "Links and ranks" card both pages show: a bandwidth meter per link and rank liveness per node.
//
// Fed every `stats` message (update), it keeps the link rates (link_rates.js) and draws
//   - a table, one row per link: its ends, the nodes it joins when the runtime names them
//     (a link between two machines is marked), MB/s with a bar scaled to the busiest link,
//     messages/s and the bytes sent so far; the heading sums all links and the cross-node ones;
//   - the ranks grouped by node (rank_nodes.js), each node with "2/2 up" and a chip per rank,
//     green when up, red when down, its role, device and last contact on hover.
// When stats do not say which node a rank is on, it asks GET /health (public, but sent
// with the page's token like every fetch) at most every `healthEveryMs`.

import { authFetch } from "./access.js";
import { el } from "./dom.js";
import { LinkRates, megabytesPerS, perSecond, rateTotals } from "./link_rates.js";
import { groupByNode, needsPlaces, placesFromHealth, rankTitle } from "./rank_nodes.js";
import { bytes } from "./stats_view.js";

export class JobView {
  /**
   * @param {HTMLElement} root an empty element for the card's content
   * @param {{fetchHealth?: () => Promise<Response>, healthEveryMs?: number}} options
   */
  constructor(root, { fetchHealth = () => authFetch("health", { cache: "no-store" }), healthEveryMs = 10000 } = {}) {
    this.root = root;
    this.rates = new LinkRates();
    this.places = new Map();     // rank -> {node, device} from GET /health
    this.fetchHealth = fetchHealth;
    this.healthEveryMs = healthEveryMs;
    this.askedAt = -Infinity;
    this.asking = false;
    this.rows = [];
    this.ranks = [];
    this.groups = [];
  }

  /** A `stats` message arrived (at page time `tMs`). */
  update(stats, tMs = performance.now()) {
    this.rows = this.rates.update(stats?.hops, tMs);
    this.ranks = Array.isArray(stats?.ranks) ? stats.ranks : [];
    if (needsPlaces(this.ranks, this.places)) this.#askHealth(tMs);
    this.#draw();
  }

  /** What the card shows, as data (tests read it). */
  snapshot() {
    return {
      links: this.rows.map((r) => ({ ...r })), totals: rateTotals(this.rows),
      nodes: this.groups.map((g) => ({ node: g.node, up: g.up, total: g.total, ranks: g.ranks.map((r) => r.rank) })),
    };
  }

  async #askHealth(tMs) {
    if (this.asking || tMs - this.askedAt < this.healthEveryMs) return;
    this.asking = true;
    this.askedAt = tMs;
    try {
      const response = await this.fetchHealth();
      if (response.status === 200 || response.status === 503) {  // 503: not healthy, still says where ranks are
        this.places = placesFromHealth(await response.json());
        this.#draw();
      }
    } catch {
      // no /health: the ranks stay under "node not reported"
    } finally {
      this.asking = false;
    }
  }

  #draw() {
    this.groups = groupByNode(this.ranks, this.places);
    this.root.replaceChildren(this.#links(), this.#nodes());
  }

  #links() {
    const box = el("div", "job-links");
    const totals = rateTotals(this.rows);
    const head = el("h3", null, "Bandwidth per link ");
    const sums = `all ${megabytesPerS(totals.bytesPerS)} MB/s`
      + (totals.crossNodeBytesPerS === null ? "" : ` · between nodes ${megabytesPerS(totals.crossNodeBytesPerS)} MB/s`);
    head.append(el("span", "dim", this.rows.length ? sums : ""));
    box.append(head);
    if (!this.rows.length) {
      box.append(el("p", "dim", "no links: the whole pipeline runs in one rank"));
      return box;
    }
    const withNodes = this.rows.some((r) => r.srcNode || r.dstNode);
    const table = el("table");
    table.id = "job-links";
    const tr = el("tr");
    for (const h of ["link", ...(withNodes ? ["nodes"] : []), "MB/s", "msgs/s", "sent"]) {
      tr.append(el("th", h === "nodes" ? "text" : null, h));
    }
    const thead = el("thead");
    thead.append(tr);
    const peak = Math.max(0, ...this.rows.map((r) => r.bytesPerS ?? 0));
    const tbody = el("tbody");
    for (const r of this.rows) {
      const row = el("tr", r.crossNode ? "cross" : null);
      row.dataset.link = r.name;
      row.append(el("td", "name", r.to ? `${r.from} → ${r.to}` : r.from));
      if (withNodes) {
        const nodes = el("td", r.crossNode ? "text cross" : "text dim",
          r.srcNode || r.dstNode ? `${r.srcNode ?? "?"} → ${r.dstNode ?? "?"}` : "");
        if (r.crossNode) nodes.title = "this link crosses between machines";
        row.append(nodes);
      }
      const rate = el("td", "rate");
      const bar = el("span", "bw-bar");
      const fill = el("i");
      fill.style.width = `${peak > 0 ? (100 * (r.bytesPerS ?? 0)) / peak : 0}%`;  // CSSOM: allowed by the CSP
      bar.append(fill);
      rate.append(bar, el("b", null, megabytesPerS(r.bytesPerS)));
      row.append(rate, el("td", null, perSecond(r.messagesPerS)), el("td", null, bytes(r.bytes)));
      tbody.append(row);
    }
    table.append(thead, tbody);
    const scroll = el("div", "table-box");
    scroll.append(table);
    box.append(scroll);
    return box;
  }

  #nodes() {
    const box = el("div", "job-nodes");
    box.id = "job-nodes";
    box.append(el("h3", null, "Ranks by node"));
    if (!this.groups.length) box.append(el("p", "dim", "no ranks reported"));
    for (const g of this.groups) {
      const node = el("div", g.up === g.total ? "node" : "node degraded");
      node.dataset.node = g.node ?? "";
      const head = el("div", "node-head");
      head.append(el("b", g.node === null ? "dim" : null, g.node ?? "node not reported"),
        el("span", g.up === g.total ? "dim" : "bad", ` ${g.up}/${g.total} up`));
      const list = el("ul", "rank-list");
      for (const r of g.ranks) {
        const chip = el("li", r.alive ? "rank up" : "rank down", `${r.alive ? "●" : "○"} ${r.rank} ${r.role}`);
        chip.dataset.rank = String(r.rank);
        chip.title = rankTitle(r);
        list.append(chip);
      }
      node.append(head, list);
      box.append(node);
    }
    return box;
  }
}
