// AudioWorklet processor of the lip-sync page: the microphone's samples to the main thread.
//
// It mixes the input down to mono and posts it in blocks of about 10 ms (the render
// quantum is 128 frames, 2.7 ms at 48 kHz: posting each would be 375 messages a second).
// Resampling to 16 kHz and chunking happen on the main thread (audio_pcm.js), where
// they can be tested.

class MicTap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.max(128, Math.round(sampleRate / 100));
    this.block = new Float32Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length && channels[0].length) {
      const n = channels[0].length;
      for (let i = 0; i < n; i++) {
        let v = 0;
        for (let c = 0; c < channels.length; c++) v += channels[c][i];
        this.block[this.filled++] = v / channels.length;
        if (this.filled === this.size) {
          this.port.postMessage(this.block, [this.block.buffer]);
          this.block = new Float32Array(this.size);
          this.filled = 0;
        }
      }
    }
    return true;  // keep running while the node is connected
  }
}

registerProcessor("mm-mic-tap", MicTap);
