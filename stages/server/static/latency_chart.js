// The latency histogram: a page's own latencies (camera capture -> portrait painted on the
// mirror, audio captured -> its frame painted on lip-sync) over its last frames, as CSS
// bars with p50/p90 markers.
//
// Bucket width is a round number (5, 10, 25, 50 ms, ...) picked so that p95 falls inside
// the chart; the last bucket is open-ended. `histogram` is pure (testable without a DOM).

import { el } from "./dom.js";

const STEPS = [5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000];

/** Smallest round step whose `bins - 1` closed buckets reach `p95`; keeps `current` while
 *  it still fits and is not far too coarse, so the axis does not flicker. */
export function chooseStep(p95, bins, current = null) {
  const ideal = STEPS.find((s) => s * (bins - 1) >= p95) ?? STEPS[STEPS.length - 1];
  if (current && current * (bins - 1) >= p95 && current <= ideal * 2.5) return current;
  return ideal;
}

/** Bucket counts of `samples` (ms): bucket i holds [i*step, (i+1)*step), the last one the rest. */
export function histogram(samples, bins = 12, current = null) {
  const sorted = [...samples].sort((a, b) => a - b);
  const p95 = sorted.length ? sorted[Math.max(0, Math.ceil(0.95 * sorted.length) - 1)] : 0;
  const step = chooseStep(p95, bins, current);
  const counts = new Array(bins).fill(0);
  for (const v of samples) counts[Math.min(bins - 1, Math.max(0, Math.floor(v / step)))] += 1;
  return { step, counts };
}

export class LatencyChart {
  /** @param {HTMLElement} root an empty element; the bars, axis and markers go inside */
  constructor(root, bins = 12) {
    this.bins = bins;
    this.step = null;
    this.last = { step: 0, counts: new Array(bins).fill(0) };
    this.plot = el("div", "hist-plot");
    this.axis = el("div", "hist-axis");
    this.bars = [];
    for (let i = 0; i < bins; i++) {
      const bar = el("div", "hist-bar");
      bar.dataset.count = "0";
      const fill = el("i");
      fill.append(el("span", "hist-count"));
      bar.append(fill);
      this.bars.push(bar);
      this.plot.append(bar);
      this.axis.append(el("span"));
    }
    this.markers = ["p50", "p90"].map((name) => {
      const m = el("div", `hist-marker hist-${name}`);
      m.append(el("span", null, name));
      m.hidden = true;
      this.plot.append(m);
      return m;
    });
    root.replaceChildren(this.plot, this.axis);
  }

  /** Redraw from `samples` (ms); `marks` = [p50, p90] in ms (NaN hides a marker). */
  update(samples, marks) {
    const { step, counts } = histogram(samples, this.bins, this.step);
    this.step = samples.length ? step : this.step;
    this.last = { step, counts };
    const peak = Math.max(1, ...counts);
    counts.forEach((n, i) => {
      const bar = this.bars[i];
      const lo = i * step;
      const range = i === this.bins - 1 ? `≥ ${lo} ms` : `${lo}–${lo + step} ms`;
      bar.dataset.count = String(n);
      bar.title = `${range}: ${n} frame${n === 1 ? "" : "s"}`;
      bar.firstChild.style.height = `${(100 * n) / peak}%`;  // CSSOM: allowed under the page's CSP
      bar.firstChild.firstChild.textContent = n ? String(n) : "";
      this.axis.children[i].textContent = i === this.bins - 1 ? `≥${lo}` : String(lo);
    });
    marks.forEach((value, i) => {
      const m = this.markers[i];
      m.hidden = !Number.isFinite(value);
      if (!m.hidden) m.style.left = `${Math.min(100, (100 * value) / (step * this.bins))}%`;
    });
  }
}
