// The stats panel: renders a `stats` message as small tables, without knowing every key.
//
// The runtime decides what it measures; the page only knows shapes. A list of objects
// (ranks) or an object of objects (stages, hops) becomes a table, an object of numbers
// (drops, latency percentiles) a row of figures, a number a figure. Known keys come first
// in a fixed order so the panel does not jump around between updates.

const ORDER = ["fps", "delivered", "revision", "drops", "server_latency_ms", "ranks", "stages", "hops", "spans"];
const TITLES = {
  fps: "output fps", delivered: "delivered", revision: "config revision", drops: "drops",
  server_latency_ms: "server latency (ms)", ranks: "ranks", stages: "stages (ms)", hops: "hops (ms)",
  spans: "spans (ms)", sessions: "fps per session", server: "web server", error: "stats error",
};

export function renderStats(container, stats) {
  const keys = [...ORDER.filter((k) => k in stats), ...Object.keys(stats).filter((k) => !ORDER.includes(k)).sort()];
  const fragment = document.createDocumentFragment();
  const figures = el("dl", "figures");
  for (const key of keys) {
    const value = stats[key];
    if (key === "server") {
      fragment.append(section(TITLES.server, serverTable(value)));
    } else if (isScalar(value)) {
      figures.append(el("dt", null, TITLES[key] ?? key), el("dd", null, format(value)));
    } else if (Array.isArray(value)) {
      if (value.length) fragment.append(section(TITLES[key] ?? key, rowsTable(value)));
    } else if (Object.values(value).every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      if (Object.keys(value).length) fragment.append(section(TITLES[key] ?? key, namedRowsTable(value)));
    } else if (Object.keys(value).length) {
      fragment.append(section(TITLES[key] ?? key, rowsTable([value])));
    }
  }
  container.replaceChildren(figures, fragment);
}

function serverTable(server) {
  const { session = {}, ...rest } = server;
  return rowsTable([{ ...rest, ...session }]);
}

/** A table whose rows are the objects of `rows`; columns are the union of their keys. */
function rowsTable(rows) {
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  return table(columns, rows.map((r) => columns.map((c) => r[c])));
}

/** A table with one row per key of `named` (e.g. a stage), its values as columns. */
function namedRowsTable(named) {
  const rows = Object.entries(named);
  const columns = [...new Set(rows.flatMap(([, r]) => Object.keys(r)))];
  return table(["", ...columns], rows.map(([name, r]) => [name, ...columns.map((c) => r[c])]));
}

function table(columns, rows) {
  const t = el("table");
  const head = el("tr");
  for (const c of columns) head.append(el("th", null, c));
  t.append(head);
  for (const row of rows) {
    const tr = el("tr");
    for (const cell of row) {
      const td = el("td", null, format(cell));
      if (cell === true) td.className = "alive";
      if (cell === false) td.className = "dead";
      tr.append(td);
    }
    t.append(tr);
  }
  return t;
}

function section(title, body) {
  const wrap = el("div", "stats-section");
  wrap.append(el("h3", null, title), body);
  return wrap;
}

function isScalar(v) {
  return v === null || typeof v !== "object";
}

export function format(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v === true) return "●";
  if (v === false) return "○";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
