// The portrait pane: decodes output frames and paints them, newest first.
//
// Decoding is asynchronous; while one frame decodes only the newest arrival waits, so a
// slow decode skips frames instead of lagging further and further behind. A decoded frame
// is drawn inside requestAnimationFrame, i.e. in the frame the browser paints next, and
// `onPainted` runs right there: that moment ends the frame's glass-to-glass time.

import { decodeJpeg, paintBitmap } from "./frame_bitmap.js";

export class Portrait {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {(frame: object) => void} onPainted called with the decoded wire frame once drawn
   * @param {(frame: object, error: Error) => void} onError
   */
  constructor(canvas, onPainted, onError) {
    this.canvas = canvas;
    this.onPainted = onPainted;
    this.onError = onError;
    this.busy = false;
    this.waiting = null;
  }

  /** Show an output frame (wire.js `decodeFrame` result). */
  async show(frame) {
    if (this.busy) { this.waiting = frame; return; }
    this.busy = true;
    try {
      const bitmap = await decodeJpeg(frame);
      await new Promise((resolve) => requestAnimationFrame(resolve));
      paintBitmap(this.canvas, bitmap);
      this.onPainted(frame);
    } catch (e) {
      this.onError(frame, e);
    } finally {
      this.busy = false;
      if (this.waiting) { const next = this.waiting; this.waiting = null; this.show(next); }
    }
  }
}
