// A page's latency figures: each painted frame's whole trip (capture -> painted, on the
// wire clock) and its parts, over the last `LATENCY_WINDOW` frames, with the FPS painted.
// They show in the header (fps, p50, p90) and in the latency card, whose list of figures
// (p50, p90, p99, frames, then each part's p50) is built here from the page's parts, and
// whose histogram is latency_chart.js.

import { el } from "./dom.js";
import { LatencyChart } from "./latency_chart.js";
import { FpsMeter, RollingPercentiles } from "./meters.js";

export const LATENCY_WINDOW = 200;  // frames in the histogram and percentiles

/** Milliseconds with steady decimals (24.0, not 24), or a dash when there are none yet. */
export function ms(v) {
  return Number.isFinite(v) ? v.toFixed(Math.abs(v) < 100 ? 1 : 0) : "–";
}

export class LatencyCard {
  /**
   * @param {{card: HTMLElement, window: HTMLElement, fps: HTMLElement, p50: HTMLElement, p90: HTMLElement}} ui
   *   `card` an empty element for the figures and the histogram, `window` where the card's
   *   title says how many frames, the rest the header's meters
   * @param {string} prefix the figures' ids: `${prefix}-p50`, `${prefix}-count`, `${prefix}-${part}`
   * @param {{key: string, label: string, title: string}[]} parts the parts of a frame's trip
   */
  constructor(ui, prefix, parts) {
    this.ui = ui;
    this.fps = new FpsMeter();
    this.latency = new RollingPercentiles(LATENCY_WINDOW);
    this.parts = new Map(parts.map((p) => [p.key, new RollingPercentiles(LATENCY_WINDOW)]));
    const { list, shown } = figureList(prefix, parts);
    this.shown = shown;  // the figures' <b> elements, by id
    const histogram = el("div", "histogram");
    histogram.id = "latency-histogram";
    histogram.setAttribute("aria-label", "latency histogram, ms");
    ui.card.replaceChildren(list, histogram);
    this.chart = new LatencyChart(histogram);
    ui.window.textContent = String(LATENCY_WINDOW);
    this.clear();
  }

  /** A frame was painted, `totalMs` after its capture; `partsMs` (by part key) if known. */
  add(totalMs, partsMs = null) {
    this.latency.add(totalMs);
    for (const [key, value] of Object.entries(partsMs ?? {})) this.parts.get(key).add(value);
    this.fps.tick();
    this.painted += 1;
  }

  /** p50, p90, p99 of the whole trip (ms) and how many frames they are of. */
  summary() {
    const l = this.latency;
    return { p50: l.percentile(50), p90: l.percentile(90), p99: l.percentile(99), count: l.samples.length };
  }

  /** p50 of each part (ms), by part key. */
  partsP50() {
    return Object.fromEntries([...this.parts].map(([key, p]) => [key, p.percentile(50)]));
  }

  /** Seconds since the figures were last cleared. */
  seconds() {
    return (performance.now() - this.since) / 1000;
  }

  /** Forget the latencies and the painted count, e.g. after a warm-up. */
  clear() {
    this.latency.clear();
    for (const part of this.parts.values()) part.clear();
    this.painted = 0;
    this.since = performance.now();
  }

  /** Redraw the header's meters, the figures and the histogram. */
  refresh() {
    const s = this.summary();
    this.ui.fps.textContent = this.fps.value();
    this.ui.p50.textContent = ms(s.p50);
    this.ui.p90.textContent = ms(s.p90);
    for (const key of ["p50", "p90", "p99"]) this.shown[key].textContent = ms(s[key]);
    this.shown.count.textContent = String(s.count);
    for (const [key, p50] of Object.entries(this.partsP50())) this.shown[key].textContent = ms(p50);
    this.chart.update(this.latency.samples, [s.p50, s.p90]);
  }
}

/** The card's <dl>: p50, p90, p99 and frames, then a p50 per part; and its <b> elements by id. */
function figureList(prefix, parts) {
  const shown = {};
  const figure = (id, unit) => {
    const b = el("b", null, id === "count" ? "0" : "–");
    b.id = `${prefix}-${id}`;
    shown[id] = b;
    const dd = el("dd");
    dd.append(b);
    if (unit) dd.append(` ${unit}`);
    return dd;
  };
  const list = el("dl", "latency-figures");
  for (const [label, id, unit] of [["p50", "p50", "ms"], ["p90", "p90", "ms"], ["p99", "p99", "ms"], ["frames", "count"]]) {
    const row = el("div");
    row.append(el("dt", null, label), figure(id, unit));
    list.append(row);
  }
  const split = el("div", "split");
  split.title = "p50 of each part of a frame's trip";
  for (const part of parts) {
    const dt = el("dt", null, part.label);
    dt.title = part.title;
    split.append(dt, figure(part.key, "ms"));
  }
  list.append(split);
  return { list, shown };
}
