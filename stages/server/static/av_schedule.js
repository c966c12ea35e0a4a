// When the lip-sync page shows frame i, and which audio it plays with it. Pure (Node tests it).
//
// The server sends video only. Output frame i shows the session's audio samples
// [640 i, 640 (i + 1)) (25 fps at 16 kHz), and the page still has those samples: it sent
// them. So it keeps what it sent, by sample number (PcmStore), and plays frame i's slice
// with Web Audio at the moment it paints frame i.
//
// The moment comes from a jitter buffer on the page clock (AvSchedule): the first frame
// fixes t0 so that it shows `leadMs` after it is ready, and frame i is then due at
// t0 + 40 ms * i. A frame that is ready before its time waits; one that is ready late is
// painted at once, and its audio is
//   - played from the point the clock has reached ("tail": the samples that are already
//     past are skipped, so the sound stays on its timeline) if it is less than a frame late;
//   - skipped ("skip": 40 ms of silence) if it is a frame or more late.
// Frames that keep coming far too late (more than `resyncMs`: a stall, a gap in the
// audio) move t0 later; frames that come far too early (the buffer holds more than
// `leadMs + slackMs`: the pipeline got faster after warming up) move t0 earlier. Either
// is a `rebase`: the page drops what it had queued for earlier frames and starts over.

export const SAMPLE_RATE = 16000;
export const FPS = 25;
export const SAMPLES_PER_FRAME = SAMPLE_RATE / FPS;  // 640
export const FRAME_MS = 1000 / FPS;                   // 40

/** Sample numbers [start, end) of the session's audio that output frame i shows. */
export function frameSamples(i) {
  return [i * SAMPLES_PER_FRAME, (i + 1) * SAMPLES_PER_FRAME];
}

/**
 * The audio this page sent in its session, by sample number (0 = the session's first).
 *
 * Chunks are kept by id: a chunk the server refused (an `error` naming its `chunk_id`) is
 * not part of the server's stream, so `drop` takes it out and renumbers what followed, as
 * the server did. Only the newest `maxSamples` are kept; older ones read as silence.
 */
export class PcmStore {
  constructor(maxSamples = SAMPLE_RATE * 120) {
    this.maxSamples = maxSamples;
    this.reset();
  }

  reset() {
    this.chunks = [];   // {id, start, pcm: Int16Array}, in stream order
    this.length = 0;    // samples in the stream so far (kept or not)
  }

  /** Add a chunk that was sent; returns the number of its first sample. */
  append(id, pcm) {
    const start = this.length;
    this.chunks.push({ id, start, pcm });
    this.length += pcm.length;
    while (this.chunks.length && this.chunks[0].start + this.chunks[0].pcm.length <= this.length - this.maxSamples) {
      this.chunks.shift();
    }
    return start;
  }

  /** The server refused chunk `id`: it is not in the stream; returns whether it was held. */
  drop(id) {
    const at = this.chunks.findIndex((c) => c.id === id);
    if (at < 0) return false;
    const [gone] = this.chunks.splice(at, 1);
    for (let k = at; k < this.chunks.length; k++) this.chunks[k].start -= gone.pcm.length;
    this.length -= gone.pcm.length;
    return true;
  }

  /** Samples [start, end) as Int16; zeros where nothing is held. */
  slice(start, end) {
    const out = new Int16Array(Math.max(0, end - start));
    // Binary search for the first chunk that ends after `start`.
    let lo = 0;
    let hi = this.chunks.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const c = this.chunks[mid];
      if (c.start + c.pcm.length <= start) lo = mid + 1;
      else hi = mid;
    }
    for (let k = lo; k < this.chunks.length; k++) {
      const c = this.chunks[k];
      if (c.start >= end) break;
      const from = Math.max(start, c.start);
      const to = Math.min(end, c.start + c.pcm.length);
      out.set(c.pcm.subarray(from - c.start, to - c.start), from - start);
    }
    return out;
  }

  /** Frame i's audio. */
  frame(i) {
    const [start, end] = frameSamples(i);
    return this.slice(start, end);
  }
}

/** The jitter buffer: when frame i is due, and what to do with a frame that is not on time. */
export class AvSchedule {
  constructor({ leadMs = 120, resyncMs = 400, slackMs = 300 } = {}) {
    this.leadMs = leadMs;
    this.resyncMs = resyncMs;
    this.slackMs = slackMs;
    this.reset();
  }

  reset() {
    this.t0 = null;       // page clock (ms) at which frame 0 is due
    this.rebases = 0;     // times t0 moved after the first frame
  }

  /** Page clock (ms) at which frame i is due; NaN before the first frame. */
  due(i) {
    return this.t0 === null ? NaN : this.t0 + FRAME_MS * i;
  }

  /**
   * Place frame i, ready to show at `nowMs`. Returns `{dueMs, lateMs, audio, offsetMs,
   * rebased}`: paint at `dueMs` (now when late), play its slice from `offsetMs` into it
   * (`audio` "full" | "tail" | "skip"); `rebased` when t0 moved for this frame.
   */
  place(i, nowMs) {
    let rebased = false;
    if (this.t0 === null) {
      this.t0 = nowMs + this.leadMs - FRAME_MS * i;
    } else {
      const ahead = this.due(i) - nowMs;
      if (-ahead > this.resyncMs || ahead > this.leadMs + this.slackMs) {
        this.t0 = nowMs + this.leadMs - FRAME_MS * i;
        this.rebases += 1;
        rebased = true;
      }
    }
    const dueMs = this.due(i);
    const lateMs = Math.max(0, nowMs - dueMs);
    if (lateMs === 0) return { dueMs, lateMs, audio: "full", offsetMs: 0, rebased };
    if (lateMs < FRAME_MS) return { dueMs: nowMs, lateMs, audio: "tail", offsetMs: lateMs, rebased };
    return { dueMs: nowMs, lateMs, audio: "skip", offsetMs: FRAME_MS, rebased };
  }
}

/** Which of the waiting frames to paint at a display refresh at `nowMs`: the newest that is
 *  due (within half a refresh of `nowMs`); the others due before it are passed over.
 *  `waiting` is sorted by due time. Returns {paint, passed, rest}. */
export function pickFrame(waiting, nowMs, halfRefreshMs = 8) {
  let n = 0;
  while (n < waiting.length && waiting[n].dueMs <= nowMs + halfRefreshMs) n++;
  if (n === 0) return { paint: null, passed: [], rest: waiting };
  return { paint: waiting[n - 1], passed: waiting.slice(0, n - 1), rest: waiting.slice(n) };
}
