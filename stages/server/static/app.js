// Mind Mirror page: camera out, portraits and face boxes in, live settings, latency and stats.
//
// One WebSocket to /ws on this page's origin carries everything (protocol: wire.js).
// Reconnects with exponential backoff; the camera keeps running meanwhile and simply
// sends nothing while there is no socket. `window.mindMirror.snapshot()` returns the
// page's own figures (tests/stages/server/browser_check.py reads them).

import { Capture } from "./capture.js";
import { LatencyChart } from "./latency_chart.js";
import { FpsMeter, RollingPercentiles } from "./meters.js";
import { Notes } from "./notes.js";
import { drawFaces } from "./overlay.js";
import { Portrait } from "./portrait.js";
import { SettingsForm } from "./settings_form.js";
import { renderStats } from "./stats_view.js";
import { Kind, decodeFrame, message, nowMs } from "./wire.js";

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), fps: $("fps"), p50: $("latency-p50"), p90: $("latency-p90"),
  inFlight: $("in-flight"), camera: $("camera"), overlay: $("overlay"), cameraSize: $("camera-size"),
  faceCount: $("face-count"), portrait: $("portrait"), portraitInfo: $("portrait-info"),
  maker: $("maker"), generator: $("generator"), styleName: $("style-name"), styleEmotion: $("style-emotion"),
  g2g: { p50: $("g2g-p50"), p90: $("g2g-p90"), p99: $("g2g-p99"), count: $("g2g-count"),
    encode: $("g2g-encode"), server: $("g2g-server"), paint: $("g2g-paint") },
  histogram: $("latency-histogram"), latencyWindow: $("latency-window"),
  revision: $("revision"), form: $("config-form"), presets: $("presets"), sessionCount: $("session-count"),
  stats: $("stats"), messages: $("messages"),
};

const MAX_BUFFERED_BYTES = 1 << 20;  // past this the socket is backed up: skip frames
const MAX_MESSAGES = 12;
const LATENCY_WINDOW = 200;          // frames in the histogram and percentiles
const BACKOFF_MS = { first: 500, max: 8000 };
const CLOSE_REASONS = {
  1001: "server going away", 1006: "server unreachable", 1009: "message too big",
  1011: "server error", 1013: "server full, try again later",
};

const fps = new FpsMeter();
const latency = new RollingPercentiles(LATENCY_WINDOW);
// Where the glass-to-glass time goes, per frame: capture + JPEG encode + send in this
// page, the server's round trip (socket, every rank, back), decode + wait for paint.
const split = {
  encode: new RollingPercentiles(LATENCY_WINDOW),
  server: new RollingPercentiles(LATENCY_WINDOW),
  paint: new RollingPercentiles(LATENCY_WINDOW),
};
const chart = new LatencyChart(ui.histogram);
const notes = new Notes(ui.messages, MAX_MESSAGES);
let painted = 0;                     // frames painted since the meters were last reset
let paintedSince = performance.now();
let socket = null;
let reconnectAttempt = 0;
let lastVision = null;               // newest `vision` message: the camera's face boxes
let lastLabels = [];
let shownVision = null;              // the `vision` of the portrait on screen
const visions = new Map();           // frame id -> its `vision`, until the frame is painted
let lastRevision = null;             // live config revision last shown

const capture = new Capture(ui.camera, (data) => {
  if (!socket || socket.readyState !== WebSocket.OPEN || socket.bufferedAmount > MAX_BUFFERED_BYTES) return false;
  socket.send(data);
  return true;
});
const settings = new SettingsForm(ui, send);
const portrait = new Portrait(ui.portrait, onPainted,
  (frame, e) => note("error", `portrait #${frame.frameId} did not decode: ${e.message}`));

// --- connection --------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  setConnection("connecting…", "wait");
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onText(JSON.parse(event.data));
    else onBinary(event.data);
  };
  socket.onclose = (event) => {
    capture.reset();
    lastVision = null;
    visions.clear();
    redrawFaces();
    const delay = Math.min(BACKOFF_MS.max, BACKOFF_MS.first * 2 ** reconnectAttempt) * (0.75 + Math.random() / 2);
    reconnectAttempt += 1;
    setConnection(`reconnecting in ${(delay / 1000).toFixed(1)} s`, "down");
    note("info", `disconnected: ${CLOSE_REASONS[event.code] ?? "closed"} (${event.code}${event.reason ? ` ${event.reason}` : ""})`);
    setTimeout(connect, delay);
  };
}

function send(type, payload) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(message(type, payload));
  else note("error", "not connected; change not sent");
}

function setConnection(text, state) {
  ui.connection.textContent = text;
  ui.connection.className = `pill pill-${state}`;
}

// --- incoming ----------------------------------------------------------------------

function onText({ type, payload }) {
  switch (type) {
    case "config.current":
      reconnectAttempt = 0;
      setConnection("live", "ok");
      // A new revision flushes frames queued under the old one; they will never be
      // answered, so stop waiting for them instead of stalling capture until they expire.
      if (payload.revision !== lastRevision) capture.reset();
      lastRevision = payload.revision;
      settings.show(payload);
      capture.configure(payload.config ?? {});
      break;
    case "vision":
      lastVision = payload;
      visions.set(payload.frame_id, payload);
      while (visions.size > 32) visions.delete(visions.keys().next().value);
      redrawFaces();
      break;
    case "stats":
      renderStats(ui.stats, payload);
      showSessions(payload.server?.sessions);
      break;
    case "error":
      note("error", `${payload.code}: ${payload.message}`);
      break;
    default:
      console.warn("unknown message type", type);
  }
}

function onBinary(buffer) {
  let frame;
  try {
    frame = decodeFrame(buffer);
  } catch (e) {
    note("error", `bad frame from server: ${e.message}`);
    return;
  }
  if (frame.kind !== Kind.OUTPUT_FRAME) return;
  frame.receivedTs = nowMs();
  capture.ack(frame.frameId);
  portrait.show(frame);
}

function onPainted(frame) {
  const paintedTs = nowMs();
  latency.add(paintedTs - frame.clientTs);  // same clock that stamped the camera frame
  const sent = capture.sent.get(frame.frameId);
  if (sent && sent.clientTs === frame.clientTs) {
    split.encode.add(sent.sentTs - sent.clientTs);
    split.server.add(frame.receivedTs - sent.sentTs);
    split.paint.add(paintedTs - frame.receivedTs);
  }
  fps.tick();
  painted += 1;
  ui.portraitInfo.textContent = `${ui.portrait.width}×${ui.portrait.height} · #${frame.frameId}`;
  const vision = visions.get(frame.frameId) ?? lastVision;
  for (const id of visions.keys()) if (id <= frame.frameId) visions.delete(id);
  showMaker(vision);
}

// --- what made the portrait --------------------------------------------------------

function showMaker(vision) {
  shownVision = vision;
  const generator = typeof vision?.generator === "string" ? vision.generator : null;
  const style = vision?.style && typeof vision.style === "object" ? vision.style : null;
  ui.maker.hidden = !generator && !style;  // older servers send neither
  ui.generator.textContent = generator ?? "–";
  ui.styleName.textContent = typeof style?.name === "string" ? style.name : "–";
  const confidence = Number.isFinite(style?.confidence) ? ` ${Math.round(style.confidence * 100)}%` : "";
  ui.styleEmotion.textContent = typeof style?.emotion === "string" ? `${style.emotion}${confidence}` : "";
}

// --- face boxes --------------------------------------------------------------------

function redrawFaces() {
  const faces = lastVision?.faces ?? [];
  const input = lastVision ? capture.sizeOf(lastVision.frame_id) : null;
  lastLabels = drawFaces(ui.overlay, ui.camera, faces, input);
  ui.faceCount.textContent = lastVision ? `· ${faces.length} face${faces.length === 1 ? "" : "s"}` : "";
}

// --- messages, meters, sessions ----------------------------------------------------

function note(level, text) {
  notes.add(level, text);
}

function showSessions(n) {
  ui.sessionCount.textContent = Number.isInteger(n)
    ? ` ${n === 1 ? "1 session is" : `${n} sessions are`} connected now.` : "";
}

function g2g() {
  return { p50: latency.percentile(50), p90: latency.percentile(90), p99: latency.percentile(99),
    count: latency.samples.length };
}

/** p50 of each part of the glass-to-glass time (ms). */
function splitP50() {
  return { encode_send: split.encode.percentile(50), server_round_trip: split.server.percentile(50),
    decode_paint: split.paint.percentile(50) };
}

/** Milliseconds with steady decimals (24.0, not 24), or a dash when there are none yet. */
function ms(v) {
  return Number.isFinite(v) ? v.toFixed(v < 100 ? 1 : 0) : "–";
}

function refreshMeters() {
  const g = g2g();
  ui.fps.textContent = fps.value();
  ui.p50.textContent = ms(g.p50);
  ui.p90.textContent = ms(g.p90);
  ui.g2g.p50.textContent = ms(g.p50);
  ui.g2g.p90.textContent = ms(g.p90);
  ui.g2g.p99.textContent = ms(g.p99);
  ui.g2g.count.textContent = String(g.count);
  const parts = splitP50();
  ui.g2g.encode.textContent = ms(parts.encode_send);
  ui.g2g.server.textContent = ms(parts.server_round_trip);
  ui.g2g.paint.textContent = ms(parts.decode_paint);
  chart.update(latency.samples, [g.p50, g.p90]);
  ui.inFlight.textContent = capture.inFlight.size;
  const v = ui.camera;
  ui.cameraSize.textContent = v.videoWidth ? `${v.videoWidth}×${v.videoHeight}` : "";
}

window.mindMirror = Object.freeze({
  /** The page's own figures: painted frames, FPS, glass-to-glass (ms), histogram, labels. */
  snapshot: () => ({
    connection: ui.connection.textContent, painted, seconds: (performance.now() - paintedSince) / 1000,
    fps: fps.value(), g2g: g2g(), split_p50_ms: splitP50(), histogram: { ...chart.last }, generator: shownVision?.generator ?? null,
    style: shownVision?.style ?? null, faces: lastVision?.faces?.length ?? 0, labels: lastLabels,
  }),
  /** Forget latency samples and painted frames, e.g. after a warm-up. */
  resetMeters: () => {
    latency.clear();
    for (const part of Object.values(split)) part.clear();
    painted = 0;
    paintedSince = performance.now();
  },
});

ui.latencyWindow.textContent = String(LATENCY_WINDOW);
setInterval(refreshMeters, 250);
window.addEventListener("resize", redrawFaces);
capture.start().catch((e) => note("error", `camera unavailable: ${e.message}`));
connect();
