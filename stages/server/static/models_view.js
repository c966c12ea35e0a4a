// The lip-sync page's "Models" card: which avatars' models sit on which GPU, load/unload.
//
// `GET /models` is whatever the pipeline reports. Two shapes are understood:
//   the model directory's  {"replicas": [{replica, capacity_bytes, used_bytes, ...}],
//                           "avatars": {id: {"state", "replicas": [r, ...]}}}
//   a plain list           {"models": [{"id", "loaded", "bytes"}]}
// `modelRows` turns either, plus the avatars the page may select, into rows (pure: Node
// tests it); `renderModels` draws them with a load or unload button each. Both requests
// carry the page's token, if its address has one (access.js).

import { authFetch } from "./access.js";
import { el } from "./dom.js";
import { bytes } from "./stats_view.js";

const HELD = new Set(["resident", "loading", "assigned"]);

/** Rows [{id, state, where, size}] for every avatar known to the page or the pipeline,
 *  the page's own order first. `state`: resident, loading, assigned, failed or "not loaded". */
export function modelRows(body, avatarIds = []) {
  const rows = new Map();
  for (const id of avatarIds) rows.set(id, { id, state: "not loaded", where: "", size: "" });
  if (Array.isArray(body?.models)) {
    for (const m of body.models) {
      if (typeof m?.id !== "string") continue;
      rows.set(m.id, { id: m.id, state: m.loaded ? "resident" : "not loaded", where: "",
        size: Number.isFinite(m.bytes) && m.bytes > 0 ? bytes(m.bytes) : "" });
    }
  } else if (body?.avatars && typeof body.avatars === "object") {
    for (const [id, a] of Object.entries(body.avatars)) {
      const replicas = Array.isArray(a?.replicas) ? a.replicas : [];
      rows.set(id, { id, state: typeof a?.state === "string" ? a.state : "not loaded",
        where: replicas.length ? `GPU ${replicas.join(", ")}` : "", size: "" });
    }
  }
  return [...rows.values()];
}

/** One line per replica: "GPU 0: 96.0 MB of 4.00 GB". */
export function replicaLines(body) {
  if (!Array.isArray(body?.replicas)) return [];
  return body.replicas.map((r) => {
    const used = Number.isFinite(r.used_bytes) ? bytes(r.used_bytes) : "–";
    const cap = Number.isFinite(r.capacity_bytes) ? ` of ${bytes(r.capacity_bytes)}` : "";
    return `GPU ${r.replica}: ${used}${cap}`;
  });
}

/** The action a row's button offers. */
export function actionFor(row) {
  return HELD.has(row.state) ? "unload" : "load";
}

export function renderModels(container, body, avatarIds, act) {
  const rows = modelRows(body, avatarIds);
  if (!rows.length) {
    container.replaceChildren(el("p", "dim", "no models"));
    return;
  }
  const table = el("table");
  const head = el("tr");
  for (const h of ["avatar", "state", "where", ""]) head.append(el("th", null, h));
  const tbody = el("tbody");
  for (const row of rows) {
    const tr = el("tr");
    const held = row.state === "resident";
    tr.append(el("td", null, row.id), el("td", held ? "alive" : row.state === "failed" ? "dead" : "dim", row.state),
      el("td", null, [row.where, row.size].filter(Boolean).join(" · ")));
    const button = el("button", null, actionFor(row));
    button.type = "button";
    button.onclick = () => act(row.id, actionFor(row), button);
    const cell = el("td");
    cell.append(button);
    tr.append(cell);
    tbody.append(tr);
  }
  const thead = el("thead");
  thead.append(head);
  table.append(thead, tbody);
  const lines = replicaLines(body).map((text) => el("p", "dim replica", text));
  container.replaceChildren(table, ...lines);
}

/** The card: polls GET /models while the pipeline has avatars, and runs the buttons. */
export class ModelsCard {
  /** @param {HTMLElement} container @param {(level: string, text: string) => void} note */
  constructor(container, note, everyMs = 3000) {
    this.container = container;
    this.note = note;
    this.everyMs = everyMs;
    this.timer = null;
    this.avatars = [];
  }

  /** Poll, showing `avatars` (the page's ids) even before the pipeline reports them. */
  start(avatars) {
    this.avatars = avatars;
    if (this.timer !== null) return;
    this.timer = setInterval(() => this.refresh(), this.everyMs);
    this.refresh();
  }

  stop(text) {
    clearInterval(this.timer);
    this.timer = null;
    this.container.replaceChildren(el("p", "dim", text));
  }

  async refresh() {
    try {
      const response = await authFetch("models", { cache: "no-store" });
      const body = await response.json();
      if (response.status === 404) {  // a pipeline without models: nothing to poll for
        this.stop(body.error ?? "no models");
      } else if (!response.ok) {
        this.container.replaceChildren(el("p", "dim", body.error ?? `HTTP ${response.status}`));
      } else {
        renderModels(this.container, body, this.avatars, (id, action, button) => this.act(id, action, button));
      }
    } catch (e) {
      this.container.replaceChildren(el("p", "dim", `models unavailable: ${e.message}`));
    }
  }

  async act(id, action, button) {
    button.disabled = true;
    try {
      const response = await authFetch(`models/${encodeURIComponent(id)}/${action}`, { method: "POST" });
      const body = await response.json();
      if (response.status === 202) this.note("info", `${action} ${id}: still running`);
      else if (!response.ok) this.note("error", `${action} ${id}: ${body.error ?? response.status}`);
    } catch (e) {
      this.note("error", `${action} ${id}: ${e.message}`);
    }
    this.refresh();
  }
}
