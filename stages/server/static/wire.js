// Wire protocol v1, the page's half (stages/server/protocol.py is the server's).
// Binary, little-endian: "MMF1", kind u8, 3 zero bytes, frame id u32, client ts f64 (ms), payload.

export const MAGIC = [0x4d, 0x4d, 0x46, 0x31]; // "MMF1"
export const HEADER_SIZE = 20;
export const Kind = Object.freeze({ CAMERA_FRAME: 1, AUDIO_CHUNK: 2, OUTPUT_FRAME: 3 });

/** One binary message: header + payload (an ArrayBuffer or typed array). */
export function encodeFrame(kind, frameId, clientTs, payload) {
  const body = payload instanceof ArrayBuffer ? new Uint8Array(payload)
    : new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  const out = new Uint8Array(HEADER_SIZE + body.byteLength);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  view.setUint8(4, kind);            // bytes 5..7 stay zero
  view.setUint32(8, frameId >>> 0, true);
  view.setFloat64(12, clientTs, true);
  out.set(body, HEADER_SIZE);
  return out.buffer;
}

/** Parse a binary message from the server; throws on a malformed header. */
export function decodeFrame(buffer) {
  if (buffer.byteLength < HEADER_SIZE) throw new Error(`short binary message (${buffer.byteLength} bytes)`);
  const bytes = new Uint8Array(buffer);
  if (MAGIC.some((b, i) => bytes[i] !== b)) throw new Error("binary message without MMF1 magic");
  const view = new DataView(buffer);
  return {
    kind: view.getUint8(4),
    frameId: view.getUint32(8, true),
    clientTs: view.getFloat64(12, true),
    payload: bytes.subarray(HEADER_SIZE),
  };
}

/** A text message: {"type": ..., "payload": {...}}. */
export function message(type, payload) {
  return JSON.stringify({ type, payload });
}

/** The page's clock for client timestamps and for latency: both ends use this one. */
export function nowMs() {
  return performance.timeOrigin + performance.now();
}
