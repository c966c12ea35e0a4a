// Audio as the wire carries it: 16 kHz mono PCM16 little-endian, in 20 ms chunks.
//
// Pure code (no DOM, no Web Audio), so Node runs its tests:
//   Resampler   any rate -> 16 kHz, streaming (a microphone at 44.1 or 48 kHz);
//   Chunker     samples in, fixed 320-sample chunks out, each stamped with the page clock
//               at its first sample;
//   floatToPcm16 / pcm16Bytes   Web Audio floats -> the wire's bytes;
//   chunksDue   how many chunks of a file are due at a moment, for real-time pacing.

export const SAMPLE_RATE = 16000;
export const CHUNK_SAMPLES = 320;  // 20 ms: small enough for low latency, 50 messages a second
export const CHUNK_MS = (1000 * CHUNK_SAMPLES) / SAMPLE_RATE;

/** Float samples in [-1, 1] -> Int16Array (clamped, rounded half away from zero). */
export function floatToPcm16(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) {
    const v = Math.max(-1, Math.min(1, floats[i])) * 32767;
    out[i] = v < 0 ? -Math.round(-v) : Math.round(v);
  }
  return out;
}

/** Int16Array -> Float32Array in [-1, 1) (what an AudioBuffer holds). */
export function pcm16ToFloat(pcm) {
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

/** The wire's bytes of Int16 samples: little-endian whatever the machine's order. */
export function pcm16Bytes(pcm) {
  const out = new Uint8Array(pcm.length * 2);
  const view = new DataView(out.buffer);
  for (let i = 0; i < pcm.length; i++) view.setInt16(2 * i, pcm[i], true);
  return out;
}

/**
 * Streaming sample-rate conversion by windowed-sinc interpolation.
 *
 * Output sample n sits at input position n * from / to. It is a weighted sum of the input
 * samples within `halfWidth` zero crossings of a sinc whose cutoff is the lower of the two
 * Nyquist rates (times `rolloff`), so going down from 48 kHz nothing above 8 kHz folds
 * back into speech. Weights are normalised per output sample: a constant stays constant.
 * `push` returns every output sample whose window of input has fully arrived; `flush`
 * finishes with zeros after the end, as a file would.
 */
export class Resampler {
  constructor(fromRate, toRate = SAMPLE_RATE, { halfWidth = 16, rolloff = 0.92 } = {}) {
    if (!(fromRate > 0 && toRate > 0)) throw new Error(`bad rates ${fromRate} -> ${toRate}`);
    this.fromRate = fromRate;
    this.toRate = toRate;
    this.step = fromRate / toRate;                      // input samples per output sample
    this.cutoff = Math.min(1, toRate / fromRate) * rolloff;  // cycles per input sample, x2
    this.reach = Math.ceil(halfWidth / this.cutoff);    // input samples each side of a point
    this.buffer = new Float32Array(0);
    this.bufferStart = 0;                               // input index of buffer[0]
    this.received = 0;                                  // input samples pushed so far
    this.produced = 0;                                  // output samples made so far
  }

  push(samples) {
    const merged = new Float32Array(this.buffer.length + samples.length);
    merged.set(this.buffer);
    merged.set(samples, this.buffer.length);
    this.buffer = merged;
    this.received += samples.length;
    return this.#drain(this.received);
  }

  /** The last output samples, as if zeros followed the input; the resampler is done after. */
  flush() {
    const end = this.received;
    const last = Math.ceil((end * this.toRate) / this.fromRate);  // outputs that fall inside the input
    const merged = new Float32Array(this.buffer.length + this.reach + 1);
    merged.set(this.buffer);
    this.buffer = merged;
    return this.#drain(end + this.reach + 1, last);
  }

  #drain(available, limit = Infinity) {
    const out = [];
    for (;;) {
      const n = this.produced;
      if (n >= limit) break;
      const centre = n * this.step;
      if (Math.floor(centre) + this.reach >= available) break;  // its window has not all arrived
      out.push(this.#point(centre));
      this.produced += 1;
    }
    // Forget input no later output can reach.
    const keepFrom = Math.max(0, Math.floor(this.produced * this.step) - this.reach);
    if (keepFrom > this.bufferStart) {
      this.buffer = this.buffer.slice(keepFrom - this.bufferStart);
      this.bufferStart = keepFrom;
    }
    return Float32Array.from(out);
  }

  #point(centre) {
    const first = Math.max(0, Math.ceil(centre - this.reach));
    const last = Math.floor(centre + this.reach);
    let sum = 0;
    let weights = 0;
    for (let k = first; k <= last; k++) {
      const t = k - centre;
      const w = sinc(this.cutoff * t) * hann(t / this.reach);
      weights += w;
      sum += w * (this.buffer[k - this.bufferStart] ?? 0);
    }
    return weights > 0 ? sum / weights : 0;
  }
}

/** A whole buffer at another rate (push + flush). */
export function resample(samples, fromRate, toRate = SAMPLE_RATE) {
  if (fromRate === toRate) return Float32Array.from(samples);
  const r = new Resampler(fromRate, toRate);
  const head = r.push(samples);
  const tail = r.flush();
  const out = new Float32Array(head.length + tail.length);
  out.set(head);
  out.set(tail, head.length);
  return out;
}

function sinc(x) {
  if (x === 0) return 1;
  const px = Math.PI * x;
  return Math.sin(px) / px;
}

function hann(x) {  // x in [-1, 1]
  return Math.abs(x) >= 1 ? 0 : 0.5 + 0.5 * Math.cos(Math.PI * x);
}

/**
 * Samples in (floats in [-1, 1] or Int16), fixed-size Int16 chunks out.
 *
 * `push(samples, endTs)`: `endTs` is the page clock (ms) just after the last of these
 * samples was captured; a chunk's `ts` is then the clock at its own first sample,
 * counted back through the samples that followed it. `seq` numbers chunks from 0.
 */
export class Chunker {
  constructor(chunkSamples = CHUNK_SAMPLES, sampleRate = SAMPLE_RATE) {
    this.chunkSamples = chunkSamples;
    this.sampleRate = sampleRate;
    this.pending = new Int16Array(chunkSamples);
    this.filled = 0;
    this.total = 0;   // samples pushed
    this.seq = 0;
  }

  push(samples, endTs) {
    const pcm = samples instanceof Int16Array ? samples : floatToPcm16(samples);
    const chunks = [];
    let i = 0;
    while (i < pcm.length) {
      const n = Math.min(this.chunkSamples - this.filled, pcm.length - i);
      this.pending.set(pcm.subarray(i, i + n), this.filled);
      this.filled += n;
      i += n;
      if (this.filled === this.chunkSamples) {
        const firstSample = this.total + i - this.chunkSamples;   // of this chunk, in the whole stream
        const after = this.total + pcm.length - firstSample;      // samples from it to the end of this push
        chunks.push({ seq: this.seq, pcm: this.pending, ts: endTs - (1000 * after) / this.sampleRate });
        this.seq += 1;
        this.pending = new Int16Array(this.chunkSamples);
        this.filled = 0;
      }
    }
    this.total += pcm.length;
    return chunks;
  }

  /** Samples waiting for a full chunk. */
  get waiting() { return this.filled; }
}

/** Chunks of a file due by `nowMs` when chunk k is due at `startMs + k * chunkMs`
 *  (chunk 0 at the start): stream it at the pace it plays, never ahead. */
export function chunksDue(startMs, nowMs, chunkMs = CHUNK_MS) {
  if (nowMs < startMs) return 0;
  return Math.floor((nowMs - startMs) / chunkMs + 1e-9) + 1;
}

/** RMS level of Int16 samples in dBFS (-100 for digital silence). */
export function levelDb(pcm) {
  if (!pcm.length) return -100;
  let sum = 0;
  for (let i = 0; i < pcm.length; i++) sum += (pcm[i] / 32768) ** 2;
  const rms = Math.sqrt(sum / pcm.length);
  return rms > 0 ? Math.max(-100, 20 * Math.log10(rms)) : -100;
}
