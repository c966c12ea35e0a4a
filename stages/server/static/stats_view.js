// The stats panel: a `stats` message as figures and tables of numbers, without knowing every key.
//
// The runtime decides what it measures; the page only knows shapes:
//   a number or string          -> a figure ("output fps 20")
//   an object of numbers        -> a figure group ("drops: ingest 0 · flushed 2 · late 0")
//   an object or list of objects -> a table, one row per entry; a nested object of numbers
//                                  (e.g. latency percentiles) becomes a column group with
//                                  one column per key ("compute (ms)" over p50 p95 p99 n).
// Units come from key suffixes (_ms, _s, bytes) and go in headers, so cells hold numbers
// only. No value is ever printed as JSON. `statsModel` is pure (testable without a DOM);
// `renderStats` draws it. Known keys come first in a fixed order so the panel does not jump.

import { el } from "./dom.js";

const ORDER = ["fps", "delivered", "revision", "drops", "server_latency_ms", "sessions", "ranks",
  "stages", "hops", "spans", "server"];

const LABELS = {
  fps: "output fps", delivered: "delivered", revision: "config revision", drops: "drops",
  server_latency_ms: "server latency", sessions: "sessions", ranks: "ranks", stages: "stages",
  hops: "links", spans: "spans of a frame", server: "web server", error: "stats error",
  session: "this page", frames_in: "in", frames_out: "out", frames_dropped: "dropped",
  queued_frames: "queued", mean_batch: "batch", batches: "batches", messages_sent: "msgs sent",
  messages_received: "msgs recv", bytes_sent: "sent", bytes_received: "received",
  send_seconds: "send time", compute_ms: "compute", hop_ms: "hop", last_seen_s: "last seen",
  uptime_s: "uptime", count: "n", errors_sent: "errors sent", errors_dropped: "errors dropped",
  alive: "alive", id: "id",
};

/** Sections whose numbers share a unit their keys do not name (span percentiles, session rates). */
const SHARED_UNITS = { spans: "ms", sessions: "fps" };

/** "ms", "s", "bytes", "fps" or "" from a key's name. */
export function unitOf(key) {
  if (/(^|_)ms$/.test(key)) return "ms";
  if (/_(s|seconds)$/.test(key)) return "s";
  if (/(^|_)bytes($|_)/.test(key)) return "bytes";
  if (/(^|_)fps$/.test(key)) return "fps";
  return "";
}

export function labelOf(key) {
  return LABELS[key] ?? String(key).replace(/_(ms|s|seconds|fps)$/, "").replaceAll("_", " ");
}

/** A header: the label, and the unit in brackets unless cells carry it ("bytes" do). */
function heading(key, unit = unitOf(key)) {
  return unit && unit !== "bytes" ? `${labelOf(key)} (${unit})` : labelOf(key);
}

/** A row name for display: links and spans read better with arrows. */
function rowName(name) {
  return String(name).replace(/->|>/g, " → ");
}

/**
 * `stats` as plain data: figures [{label, value}], groups [{title, items: [{label, value}]}]
 * and tables [{title, head: [[{text, colspan, rowspan}]], rows: [[{text, cls}]]}]. Every
 * `text`/`value` is a string of numbers and words.
 */
export function statsModel(stats) {
  const keys = [...ORDER.filter((k) => k in stats), ...Object.keys(stats).filter((k) => !ORDER.includes(k)).sort()];
  const model = { figures: [], groups: [], tables: [] };
  for (const key of keys) {
    const value = stats[key];
    if (isScalar(value)) {
      model.figures.push({ key, label: labelOf(key), value: withUnit(value, unitOf(key)) });
    } else if (Array.isArray(value)) {
      if (!value.length) continue;
      if (value.every(isPlainObject)) model.tables.push(rowsTable(key, value.map((row) => [null, row])));
      else model.figures.push({ key, label: labelOf(key), value: value.map((v) => format(v)).join(", ") });
    } else if (Object.values(value).every(isScalar)) {
      if (!Object.keys(value).length) continue;
      const unit = unitOf(key) || (SHARED_UNITS[key] ?? "");
      model.groups.push({ key, title: labelOf(key), items: Object.entries(value).map(([k, v]) =>
        ({ label: labelOf(k), value: withUnit(v, k === "count" ? "" : (unitOf(k) || unit)) })) });
    } else if (Object.values(value).every(isPlainObject)) {
      if (!Object.keys(value).length) continue;
      model.tables.push(rowsTable(key, Object.entries(value)));
    } else {
      model.tables.push(rowsTable(key, [[null, value]]));  // one mixed object, e.g. the web server
    }
  }
  return model;
}

/** Rows `[[name | null, object], ...]` as one table; nested objects become column groups. */
function rowsTable(key, rows) {
  const unit = SHARED_UNITS[key] ?? "";
  const flat = rows.map(([name, row]) => [name, new Map(flatten(row, unit).map((c) => [cellId(c), c]))]);
  const byGroup = new Map();  // group (or the top level) -> its columns, both in first-seen order
  for (const [, cells] of flat) {
    for (const [id, c] of cells) {
      const group = byGroup.get(c.group) ?? byGroup.set(c.group, new Map()).get(c.group);
      if (!group.has(id)) group.set(id, { group: c.group, key: c.key, unit: c.unit, id });
    }
  }
  const columns = [...byGroup.values()].flatMap((g) => [...g.values()]);  // a group's columns stay together
  for (const c of columns) {
    const values = flat.map(([, cells]) => cells.get(c.id)?.value).filter((v) => v !== undefined && v !== null);
    c.text = values.length > 0 && values.every((v) => typeof v === "string");
  }
  const named = rows.some(([name]) => name !== null);
  const grouped = columns.some((c) => c.group !== null);
  const top = [];
  const sub = [];
  if (named) top.push({ text: "", rowspan: grouped ? 2 : 1 });
  columns.forEach((c, i) => {
    const starts = c.group !== null && (i === 0 || columns[i - 1].group !== c.group);
    const cls = [starts ? "group-start" : "", c.text ? "text" : ""].filter(Boolean).join(" ");
    if (c.group === null) {
      top.push({ text: heading(c.key), rowspan: grouped ? 2 : 1, cls });
    } else {
      if (starts) top.push({ text: heading(c.group), colspan: countWhile(columns, i, (d) => d.group === c.group), cls: "group" });
      sub.push({ text: subHeading(c), cls });
    }
  });
  const body = flat.map(([name, cells]) => {
    const out = named ? [{ text: rowName(name), cls: "name" }] : [];
    columns.forEach((c, i) => {
      const cell = cells.get(c.id);
      const starts = c.group !== null && (i === 0 || columns[i - 1].group !== c.group);
      out.push(cellOf(cell?.value, cell?.unit ?? c.unit, starts));
    });
    return out;
  });
  return { key, title: heading(key, unit), head: grouped ? [top, sub] : [top], rows: body,
    columns: columns.length + (named ? 1 : 0) };
}

function cellId(c) {
  return `${c.group ?? ""}\u0000${c.key}`;
}

/** A column under a group header: its unit only where the group's does not say it. */
function subHeading(c) {
  const own = unitOf(c.key);
  return own && own !== unitOf(c.group) ? heading(c.key, own) : labelOf(c.key);
}

/** One object as cells: scalars at the top, objects of scalars as a group, deeper as dotted
 *  keys. `unit` is the table's own unit, for keys that name none (but not for counts). */
function flatten(row, unit = "") {
  const cells = [];
  for (const [key, value] of Object.entries(row)) {
    if (!isPlainObject(value)) {
      cells.push({ group: null, key, unit: unitOf(key) || (key === "count" || typeof value !== "number" ? "" : unit), value });
      continue;
    }
    const groupUnit = unitOf(key);
    for (const [sub, v] of Object.entries(value)) {
      if (isPlainObject(v)) {
        for (const [leaf, w] of Object.entries(v)) {
          cells.push({ group: key, key: `${sub} ${leaf}`, unit: leaf === "count" ? "" : (unitOf(leaf) || groupUnit), value: w });
        }
      } else {
        cells.push({ group: key, key: sub, unit: sub === "count" ? "" : (unitOf(sub) || groupUnit), value: v });
      }
    }
  }
  return cells;
}

function cellOf(value, unit, groupStart) {
  const classes = [];
  if (groupStart) classes.push("group-start");
  let text;
  if (value === true) { text = "● up"; classes.push("alive"); }
  else if (value === false) { text = "○ down"; classes.push("dead"); }
  else text = unit === "bytes" ? bytes(value) : measure(value, unit);
  if (typeof value === "string") classes.push("text");
  return { text, cls: classes.join(" ") };
}

function countWhile(items, start, pred) {
  let n = 0;
  while (start + n < items.length && pred(items[start + n])) n++;
  return n;
}

/** A value with its unit for a place that has no header ("12.7 ms", "1.2 MB"). */
function withUnit(value, unit) {
  if (typeof value !== "number" || !Number.isFinite(value)) return format(value);
  if (unit === "bytes") return bytes(value);
  return unit ? `${measure(value, unit)} ${unit}` : format(value);
}

/** A number of ms or s with steady decimals (0.40, 4.00, 12.7, 150), so a column reads evenly. */
function measure(value, unit) {
  if ((unit !== "ms" && unit !== "s") || typeof value !== "number" || !Number.isFinite(value)) return format(value);
  const a = Math.abs(value);
  return value.toFixed(a === 0 ? 0 : a < 10 ? 2 : a < 100 ? 1 : 0);
}

export function bytes(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return format(v);
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${units[i]}`;
}

/** A value as short text; objects and lists become readable text, never JSON. */
export function format(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v === true) return "yes";
  if (v === false) return "no";
  if (typeof v === "number") {
    if (!Number.isFinite(v)) return "–";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return v.toFixed(a < 10 ? 2 : a < 100 ? 1 : 0);
  }
  if (Array.isArray(v)) return v.map(format).join(", ");
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => `${labelOf(k)} ${format(x)}`).join(" · ");
  return String(v);
}

function isScalar(v) {
  return v === null || typeof v !== "object";
}

function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

// --- DOM ------------------------------------------------------------------------------

export function renderStats(container, stats) {
  const model = statsModel(stats);
  const summary = el("div", "stats-summary");
  for (const f of model.figures) {
    const tile = el("div", f.key === "error" ? "figure bad" : "figure");
    tile.append(el("span", "figure-label", f.label), el("span", "figure-value", f.value));
    summary.append(tile);
  }
  for (const g of model.groups) {
    const tile = el("div", "figure group");
    const items = el("span", "figure-items");
    for (const item of g.items) {
      const pair = el("span", "pair");
      pair.append(el("span", "pair-label", item.label), el("span", "pair-value", item.value));
      items.append(pair);
    }
    tile.append(el("span", "figure-label", g.title), items);
    summary.append(tile);
  }
  const tables = el("div", "stats-tables");
  for (const t of model.tables) tables.append(section(t));
  container.replaceChildren(summary, tables);
}

function section(t) {
  const wrap = el("div", t.columns > 6 ? "stats-section wide" : "stats-section");
  wrap.dataset.key = t.key;
  const box = el("div", "table-box");
  const table = el("table");
  const thead = el("thead");
  for (const row of t.head) {
    const tr = el("tr");
    for (const h of row) {
      const th = el("th", h.cls || null, h.text);
      if (h.colspan > 1) th.colSpan = h.colspan;
      if (h.rowspan > 1) th.rowSpan = h.rowspan;
      tr.append(th);
    }
    thead.append(tr);
  }
  const tbody = el("tbody");
  for (const row of t.rows) {
    const tr = el("tr");
    for (const c of row) tr.append(el("td", c.cls || null, c.text));
    tbody.append(tr);
  }
  table.append(thead, tbody);
  box.append(table);
  wrap.append(el("h3", null, t.title), box);
  return wrap;
}
