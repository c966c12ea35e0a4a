// The `vision` messages of frames not yet painted, by frame id. A frame's `vision` (what
// the pipeline saw and which generator made it) comes as a text message beside the
// frame's picture; the page looks it up when it paints that frame.

export class FrameVisions {
  /** @param {number} max visions kept; past it the oldest go (frames that were never painted) */
  constructor(max) {
    this.max = max;
    this.byId = new Map();
  }

  add(vision) {
    this.byId.set(vision.frame_id, vision);
    while (this.byId.size > this.max) this.byId.delete(this.byId.keys().next().value);
  }

  /** The vision of frame `frameId`, now painted (undefined if none came); it and every
   *  older one are forgotten, since no older frame will be painted after it. */
  take(frameId) {
    const vision = this.byId.get(frameId);
    for (const id of this.byId.keys()) if (id <= frameId) this.byId.delete(id);
    return vision;
  }

  /** A new session: its frame ids start again. */
  clear() {
    this.byId.clear();
  }
}
