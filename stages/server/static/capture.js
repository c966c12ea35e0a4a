// Camera capture: getUserMedia -> canvas at capture_width -> JPEG -> MMF1 camera frames.
//
// Pacing comes from two limits. A timer ticks at target_fps; a tick sends nothing while
// `maxInFlight` frames are still unanswered, so a slow pipeline slows the page down
// instead of building a queue in front of it. Frames the runtime drops never get an
// answer, so unanswered frames also expire after `inFlightTimeoutMs`.

import { Kind, encodeFrame, nowMs } from "./wire.js";

export class Capture {
  /**
   * @param {HTMLVideoElement} video shows the live camera
   * @param {(data: ArrayBuffer) => boolean} send returns false when the frame could not go out
   */
  constructor(video, send) {
    this.video = video;
    this.send = send;
    this.targetFps = 20;
    this.captureWidth = 640;
    this.jpegQuality = 0.8;
    this.maxInFlight = 3;
    this.inFlightTimeoutMs = 2000;
    this.nextFrameId = 1;
    this.inFlight = new Map();       // frame id -> send time (ms)
    this.sizes = new Map();          // frame id -> {width, height} of the JPEG sent
    this.sent = new Map();           // frame id -> {clientTs, sentTs} (wire clock, ms): the latency split
    this.canvas = document.createElement("canvas");
    this.encoding = false;
    this.timer = null;
  }

  /** Ask for the camera and start ticking; rejects if the camera is refused. */
  async start() {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: "user" },
      audio: false,
    });
    this.video.srcObject = stream;
    await this.video.play();
    this.#schedule(performance.now());
  }

  /** Apply the runtime config the server sent (config.current's `config`). */
  configure(config) {
    this.targetFps = config.target_fps ?? this.targetFps;
    this.captureWidth = config.capture_width ?? this.captureWidth;
    this.jpegQuality = (config.jpeg_quality ?? this.jpegQuality * 100) / 100;
  }

  /** An output frame arrived: it and every older frame are no longer in flight. */
  ack(frameId) {
    for (const id of this.inFlight.keys()) {
      if (id <= frameId) this.inFlight.delete(id);
    }
  }

  /** Forget unanswered frames (the connection they went out on is gone). */
  reset() {
    this.inFlight.clear();
  }

  /** Size of the JPEG sent as `frameId`, to scale face boxes; the latest if unknown. */
  sizeOf(frameId) {
    return this.sizes.get(frameId) ?? { width: this.canvas.width, height: this.canvas.height };
  }

  #schedule(due) {
    const interval = 1000 / this.targetFps;
    const next = Math.max(due + interval, performance.now());  // never try to catch up in a burst
    this.timer = setTimeout(() => { this.#tick(); this.#schedule(next); }, next - performance.now());
  }

  #tick() {
    const now = performance.now();
    for (const [id, sentAt] of this.inFlight) {
      if (now - sentAt > this.inFlightTimeoutMs) this.inFlight.delete(id);
    }
    const video = this.video;
    if (this.encoding || this.inFlight.size >= this.maxInFlight) return;
    if (video.readyState < HTMLMediaElement.HAVE_CURRENT_DATA || !video.videoWidth) return;

    const width = Math.min(this.captureWidth, video.videoWidth);
    const height = Math.round((video.videoHeight * width) / video.videoWidth);
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
    const clientTs = nowMs();  // the moment the frame leaves the camera for us
    this.canvas.getContext("2d").drawImage(video, 0, 0, width, height);
    this.encoding = true;
    this.canvas.toBlob(async (blob) => {
      try {
        if (!blob) return;
        const frameId = this.nextFrameId;
        const data = encodeFrame(Kind.CAMERA_FRAME, frameId, clientTs, await blob.arrayBuffer());
        if (!this.send(data)) return;
        this.nextFrameId = (frameId + 1) >>> 0;
        this.inFlight.set(frameId, performance.now());
        this.sizes.set(frameId, { width, height });
        if (this.sizes.size > 128) this.sizes.delete(this.sizes.keys().next().value);
        this.sent.set(frameId, { clientTs, sentTs: nowMs() });
        if (this.sent.size > 128) this.sent.delete(this.sent.keys().next().value);
      } finally {
        this.encoding = false;
      }
    }, "image/jpeg", this.jpegQuality);
  }
}
