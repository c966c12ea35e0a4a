// The lip-sync page's audio sources: the microphone, or a dropped audio file.
//
// Both hand out 20 ms chunks of 16 kHz PCM16 (`onChunk(pcm, ts)`, ts = page clock at the
// chunk's first sample) at the pace of real time, as the server requires:
//
// - MicSource: getUserMedia -> AudioWorklet (mic_worklet.js; a ScriptProcessor where
//   AudioWorklet is missing) -> Resampler to 16 kHz -> Chunker. A chunk's time is the
//   page clock when its block reached the page, counted back through the samples after
//   it (the device's own input latency, ~10 ms, is not known to the page).
// - FileSource: decodeAudioData -> an OfflineAudioContext at 16 kHz with one channel
//   (Web Audio's resampler and down-mix) -> PCM16; then a timer sends chunk k at
//   start + 20 ms * k, never sooner, and catches up after a late tick.
//
// Browsers allow audio only after a user gesture: the page creates and resumes the one
// AudioContext (capture and playback share it) from a click or a drop.

import { CHUNK_MS, CHUNK_SAMPLES, Chunker, Resampler, SAMPLE_RATE, chunksDue, floatToPcm16 } from "./audio_pcm.js";
import { nowMs } from "./wire.js";

/** A description of why the microphone is unavailable, for a person. */
export function micErrorText(e) {
  switch (e?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "microphone permission denied: allow the microphone for this site and try again";
    case "NotFoundError":
    case "OverconstrainedError":
      return "no microphone found";
    case "NotReadableError":
      return "the microphone is in use by another program or could not be opened";
    default:
      if (!globalThis.navigator?.mediaDevices?.getUserMedia) {
        return "this page cannot use a microphone here (it needs https or localhost)";
      }
      return `microphone unavailable: ${e?.message ?? e}`;
  }
}

export class MicSource {
  /** @param {AudioContext} ctx @param {(pcm: Int16Array, ts: number) => void} onChunk */
  constructor(ctx, onChunk) {
    this.ctx = ctx;
    this.onChunk = onChunk;
    this.stream = null;
    this.nodes = [];
    this.kind = "";
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      video: false,
    });
    const ctx = this.ctx;
    const resampler = new Resampler(ctx.sampleRate, SAMPLE_RATE);
    const chunker = new Chunker();
    const take = (block) => {
      const arrived = nowMs();
      const samples = resampler.push(block);
      // The resampler holds back a few ms of input it still needs; the chunk times count
      // back from the newest sample it has let through.
      const held = (resampler.received - resampler.produced * resampler.step) / ctx.sampleRate * 1000;
      for (const chunk of chunker.push(samples, arrived - held)) this.onChunk(chunk.pcm, chunk.ts);
    };
    const source = ctx.createMediaStreamSource(this.stream);
    const silent = ctx.createGain();  // the tap must reach the destination to be run; it adds nothing
    silent.gain.value = 0;
    let tap;
    if (ctx.audioWorklet) {
      await ctx.audioWorklet.addModule("mic_worklet.js");
      tap = new AudioWorkletNode(ctx, "mm-mic-tap", { numberOfInputs: 1, numberOfOutputs: 1 });
      tap.port.onmessage = (event) => take(event.data);
      this.kind = "AudioWorklet";
    } else {
      tap = ctx.createScriptProcessor(2048, 1, 1);
      tap.onaudioprocess = (event) => take(Float32Array.from(event.inputBuffer.getChannelData(0)));
      this.kind = "ScriptProcessor";
    }
    source.connect(tap);
    tap.connect(silent);
    silent.connect(ctx.destination);
    this.nodes = [source, tap, silent];
  }

  stop() {
    for (const node of this.nodes) node.disconnect();
    if (this.nodes[1]?.port) this.nodes[1].port.onmessage = null;
    this.nodes = [];
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.stream = null;
  }
}

/** An audio file as 16 kHz mono Int16 samples (any format the browser decodes). */
export async function decodeFile(ctx, blob) {
  const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
  const frames = Math.max(1, Math.ceil(decoded.duration * SAMPLE_RATE));
  const offline = new OfflineAudioContext(1, frames, SAMPLE_RATE);  // one channel: Web Audio mixes down
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const rendered = await offline.startRendering();
  return floatToPcm16(rendered.getChannelData(0));
}

export class FileSource {
  /** @param {(pcm: Int16Array, ts: number) => void} onChunk @param {() => void} onEnd */
  constructor(samples, onChunk, onEnd) {
    this.samples = samples;
    this.onChunk = onChunk;
    this.onEnd = onEnd;
    this.sent = 0;        // chunks handed out
    this.timer = null;
    this.startMs = 0;
  }

  get chunks() { return Math.ceil(this.samples.length / CHUNK_SAMPLES); }
  get seconds() { return this.samples.length / SAMPLE_RATE; }
  get position() { return Math.min(this.seconds, (this.sent * CHUNK_MS) / 1000); }

  start() {
    this.startMs = nowMs();
    this.#tick();
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  #tick() {
    const size = CHUNK_SAMPLES;
    const due = Math.min(this.chunks, chunksDue(this.startMs, nowMs()));
    while (this.sent < due) {
      const k = this.sent;
      const pcm = this.samples.subarray(k * size, (k + 1) * size);  // the last one may be short
      this.sent += 1;
      this.onChunk(Int16Array.from(pcm), this.startMs + k * CHUNK_MS);
    }
    if (this.sent >= this.chunks) {
      this.timer = null;
      this.onEnd();
      return;
    }
    const next = this.startMs + this.sent * CHUNK_MS;
    this.timer = setTimeout(() => this.#tick(), Math.max(0, next - nowMs()));
  }
}
