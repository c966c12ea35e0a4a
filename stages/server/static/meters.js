// Rolling measurements shown in the header: output FPS and glass-to-glass latency.

/** Frames per second over the last second. */
export class FpsMeter {
  constructor() { this.times = []; }

  tick(now = performance.now()) {
    this.times.push(now);
    this.#trim(now);
  }

  value(now = performance.now()) {
    this.#trim(now);
    return this.times.length;
  }

  #trim(now) {
    while (this.times.length && now - this.times[0] > 1000) this.times.shift();
  }
}

/** Percentiles of the newest `size` samples. */
export class RollingPercentiles {
  constructor(size = 120) {
    this.size = size;
    this.samples = [];
  }

  add(value) {
    this.samples.push(value);
    if (this.samples.length > this.size) this.samples.shift();
  }

  percentile(p) {
    if (!this.samples.length) return NaN;
    const sorted = [...this.samples].sort((a, b) => a - b);
    const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
    return sorted[index];
  }

  clear() { this.samples = []; }
}
