// The lip-sync page's player: output frames painted on time, each with its slice of audio.
//
// Frames are decoded in arrival order, then placed by AvSchedule (av_schedule.js): frame
// i is due at t0 + 40 ms * i on the page clock. Its audio, samples [640 i, 640 (i + 1))
// of what the page sent (PcmStore), is scheduled with Web Audio right away, to be heard
// when the frame reaches the screen; the frame waits in a queue that a
// requestAnimationFrame loop paints from. A paint happens at the start of a display
// refresh and the picture reaches the glass about one refresh later, so the audio is
// scheduled `displayDelayMs` after the frame's due time.
//
// Web Audio's clock is not the page's: getOutputTimestamp() pairs a context time with the
// page time at which that sample leaves the speakers, which maps one onto the other
// (output latency included). The A/V offset reported per painted frame is (paint time +
// displayDelayMs) - (time its audio is heard), from those two clocks: how well the page
// kept its own schedule, not an acoustic measurement.
//
// Frames the server never sent leave their audio unplayed unless a later frame arrives
// while their time is still ahead: then their slices are scheduled too (`filled`), so a
// dropped frame costs a picture, not the sound.

import { pcm16ToFloat } from "./audio_pcm.js";
import { AvSchedule, FRAME_MS, SAMPLE_RATE, pickFrame } from "./av_schedule.js";
import { decodeJpeg, paintBitmap } from "./frame_bitmap.js";

const MAX_WAITING = 50;  // 2 s of frames

export class AvPlayer {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {import("./av_schedule.js").PcmStore} store what the page sent, by sample
   * @param {{onPainted: (item: object, paintMs: number) => void, onError: (frame: object, e: Error) => void}} hooks
   */
  constructor(canvas, store, { onPainted, onError }, { schedule = new AvSchedule(), displayDelayMs = 17 } = {}) {
    this.canvas = canvas;
    this.store = store;
    this.onPainted = onPainted;
    this.onError = onError;
    this.schedule = schedule;
    this.displayDelayMs = displayDelayMs;
    this.ctx = null;
    this.output = null;
    this.chain = Promise.resolve();
    this.reset();
  }

  /** Play through `output` (a node of `ctx`) from now on. */
  setAudio(ctx, output) {
    this.ctx = ctx;
    this.output = output;
  }

  /** A new session: its frame numbers and samples start again at 0. */
  reset() {
    for (const item of this.waiting ?? []) item.bitmap.close();
    for (const source of this.sources?.values() ?? []) source.stop();
    this.generation = (this.generation ?? 0) + 1;  // frames of an older session are dropped
    this.waiting = [];
    this.sources = new Map();   // frame index -> its scheduled AudioBufferSourceNode
    this.lastAudio = -1;        // highest frame index whose slice was scheduled
    this.looping = false;
    this.schedule.reset();
    this.counts = { decoded: 0, painted: 0, passed: 0, late: 0, audio_full: 0, audio_tail: 0, audio_skipped: 0,
      audio_filled: 0, no_audio: 0, rebases: 0 };
  }

  /** An output frame (wire.js decodeFrame, plus receivedTs); decoded in arrival order. */
  show(frame) {
    // One at a time, in order; a failure must not stop the frames after it.
    const generation = this.generation;
    this.chain = this.chain.then(() => this.#prepare(frame, generation)).catch((e) => this.onError(frame, e));
  }

  async #prepare(frame, generation) {
    let bitmap;
    try {
      bitmap = await decodeJpeg(frame);
    } catch (e) {
      this.onError(frame, e);
      return;
    }
    if (generation !== this.generation) {  // its session ended while it decoded
      bitmap.close();
      return;
    }
    this.counts.decoded += 1;
    const now = performance.now();
    const place = this.schedule.place(frame.frameId, now);
    if (place.rebased) this.#rebase(frame.frameId);
    if (place.lateMs > 0) this.counts.late += 1;
    const heardMs = this.#playFrame(frame.frameId, place, now);
    this.waiting.push({ frame, bitmap, dueMs: place.dueMs, place, heardMs });
    // No refreshes run in a hidden tab: keep at most MAX_WAITING decoded frames, not minutes of them.
    while (this.waiting.length > MAX_WAITING) {
      this.waiting.shift().bitmap.close();
      this.counts.passed += 1;
    }
    if (!this.looping) {
      this.looping = true;
      requestAnimationFrame((ts) => this.#paint(ts));
    }
  }

  /** t0 moved: what was queued for earlier frames no longer fits the timeline. */
  #rebase(index) {
    this.counts.rebases += 1;
    for (const item of this.waiting) {
      item.bitmap.close();
      this.counts.passed += 1;
    }
    this.waiting = [];
    for (const [i, source] of this.sources) {
      if (i < index) source.stop();
    }
    this.lastAudio = Math.min(this.lastAudio, index - 1);
  }

  /** Schedule frame i's audio (and any missed frames' before it); returns the page time at
   *  which its slice's first sample is heard, or null when it is not played. */
  #playFrame(i, place, now) {
    if (!this.ctx || this.ctx.state !== "running") {
      this.counts.no_audio += 1;
      return null;
    }
    // Frames the server dropped: their audio still plays if its time has not come.
    for (let j = Math.max(this.lastAudio + 1, i - 25); j < i; j++) {
      const due = this.schedule.due(j);
      if (due > now + 5) {
        this.#playSlice(j, due + this.displayDelayMs, 0);
        this.counts.audio_filled += 1;
      }
    }
    if (place.audio === "skip") {
      this.counts.audio_skipped += 1;
      return null;
    }
    const heard = this.#playSlice(i, place.dueMs + this.displayDelayMs, place.offsetMs);
    if (heard === null) this.counts.audio_skipped += 1;
    else this.counts[place.audio === "full" ? "audio_full" : "audio_tail"] += 1;
    return heard;
  }

  #playSlice(i, heardMs, offsetMs) {
    const ctx = this.ctx;
    let when = contextTimeAt(ctx, heardMs);
    let offset = offsetMs / 1000;
    if (when < ctx.currentTime) {  // already past in the audio clock: play what is left
      offset += ctx.currentTime - when;
      when = ctx.currentTime;
    }
    if (offset >= FRAME_MS / 1000) return null;
    const pcm = this.store.frame(i);
    const buffer = ctx.createBuffer(1, pcm.length, SAMPLE_RATE);  // Web Audio resamples to the device
    buffer.copyToChannel(pcm16ToFloat(pcm), 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    source.start(when, offset);
    this.sources.set(i, source);
    source.onended = () => { if (this.sources.get(i) === source) this.sources.delete(i); };
    this.lastAudio = Math.max(this.lastAudio, i);
    return pageTimeAt(ctx, when) - offset * 1000;  // when the slice's first sample would be heard
  }

  #paint(ts) {
    const { paint, passed, rest } = pickFrame(this.waiting, ts);
    this.waiting = rest;
    for (const item of passed) {
      item.bitmap.close();
      this.counts.passed += 1;
    }
    if (paint) {
      paintBitmap(this.canvas, paint.bitmap);
      this.counts.painted += 1;
      this.onPainted(paint, ts);
    }
    if (this.waiting.length) requestAnimationFrame((t) => this.#paint(t));
    else this.looping = false;
  }

  /** A/V offset of a painted item (ms, + = picture after sound), or NaN without audio. */
  offsetOf(item, paintMs) {
    return item.heardMs === null ? NaN : paintMs + this.displayDelayMs - item.heardMs;
  }
}

/** The AudioContext time whose sample is heard at page time `pageMs` (performance.now()). */
export function contextTimeAt(ctx, pageMs) {
  const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
  if (stamp && stamp.performanceTime > 0) return stamp.contextTime + (pageMs - stamp.performanceTime) / 1000;
  const latency = (ctx.outputLatency || 0) + (ctx.baseLatency || 0);
  return ctx.currentTime + (pageMs - performance.now()) / 1000 - latency;
}

/** The page time (performance.now()) at which context time `t` is heard. */
export function pageTimeAt(ctx, t) {
  const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
  if (stamp && stamp.performanceTime > 0) return stamp.performanceTime + (t - stamp.contextTime) * 1000;
  const latency = (ctx.outputLatency || 0) + (ctx.baseLatency || 0);
  return performance.now() + (t - ctx.currentTime + latency) * 1000;
}
