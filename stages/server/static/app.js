// Mind Mirror page: camera out, portraits and face boxes in, live config and stats.
//
// One WebSocket to /ws on this page's origin carries everything (protocol: wire.js).
// Reconnects with exponential backoff; the camera keeps running meanwhile and simply
// sends nothing while there is no socket.

import { Capture } from "./capture.js";
import { FpsMeter, RollingPercentiles } from "./meters.js";
import { format, renderStats } from "./stats_view.js";
import { Kind, decodeFrame, message, nowMs } from "./wire.js";

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), fps: $("fps"), p50: $("latency-p50"), p95: $("latency-p95"),
  inFlight: $("in-flight"), camera: $("camera"), overlay: $("overlay"), cameraSize: $("camera-size"),
  portrait: $("portrait"), portraitInfo: $("portrait-info"), revision: $("revision"),
  form: $("config-form"), presets: $("presets"), stats: $("stats"), messages: $("messages"),
};

const MAX_BUFFERED_BYTES = 1 << 20;  // past this the socket is backed up: skip frames
const MAX_MESSAGES = 12;
const BACKOFF_MS = { first: 500, max: 8000 };
const CLOSE_REASONS = {
  1001: "server going away", 1006: "server unreachable", 1009: "message too big",
  1011: "server error", 1013: "server full, try again later",
};

const fps = new FpsMeter();
const latency = new RollingPercentiles(120);
let socket = null;
let reconnectAttempt = 0;
let lastVision = null;
let lastRevision = null;  // live config revision last shown

const capture = new Capture(ui.camera, (data) => {
  if (!socket || socket.readyState !== WebSocket.OPEN || socket.bufferedAmount > MAX_BUFFERED_BYTES) return false;
  socket.send(data);
  return true;
});

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
    drawFaces();
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
      showConfig(payload);
      break;
    case "vision":
      lastVision = payload;
      drawFaces();
      break;
    case "stats":
      renderStats(ui.stats, payload);
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
  capture.ack(frame.frameId);
  showPortrait(frame);
}

// Decoding is asynchronous; while one frame decodes only the newest arrival waits, so a
// slow decode skips frames instead of lagging further and further behind.
let decoding = false;
let waiting = null;

async function showPortrait(frame) {
  if (decoding) { waiting = frame; return; }
  decoding = true;
  try {
    const bitmap = await createImageBitmap(new Blob([frame.payload], { type: "image/jpeg" }));
    const canvas = ui.portrait;
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    latency.add(nowMs() - frame.clientTs);  // same clock that stamped the camera frame
    fps.tick();
    ui.portraitInfo.textContent = `${canvas.width}×${canvas.height} · #${frame.frameId}`;
  } catch (e) {
    note("error", `portrait #${frame.frameId} did not decode: ${e.message}`);
  } finally {
    decoding = false;
    if (waiting) { const next = waiting; waiting = null; showPortrait(next); }
  }
}

// --- face boxes --------------------------------------------------------------------

function drawFaces() {
  const video = ui.camera;
  const canvas = ui.overlay;
  const box = video.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(box.width * dpr) || canvas.height !== Math.round(box.height * dpr)) {
    canvas.width = Math.round(box.width * dpr);
    canvas.height = Math.round(box.height * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, box.width, box.height);
  if (!lastVision || !video.videoWidth) return;

  // The video is letterboxed (object-fit: contain) and mirrored like a mirror; boxes are
  // in the pixels of the JPEG that was sent, which spans the whole video frame.
  const scale = Math.min(box.width / video.videoWidth, box.height / video.videoHeight);
  const shownW = video.videoWidth * scale;
  const shownH = video.videoHeight * scale;
  const left = (box.width - shownW) / 2;
  const top = (box.height - shownH) / 2;
  const input = capture.sizeOf(lastVision.frame_id);
  const k = shownW / input.width;

  ctx.lineWidth = 2;
  ctx.font = "600 13px system-ui, sans-serif";
  for (const face of lastVision.faces ?? []) {
    const [x, y, w, h] = face.bbox;
    const bx = left + shownW - (x + w) * k;  // mirrored
    const by = top + y * k;
    ctx.strokeStyle = "#4ade80";
    ctx.strokeRect(bx, by, w * k, h * k);
    const probs = face.emotion_probs ?? {};
    const confidence = probs[face.emotion] ?? Math.max(0, ...Object.values(probs));
    const label = `${face.emotion ?? "?"} ${Math.round(confidence * 100)}%`;
    const width = ctx.measureText(label).width + 10;
    ctx.fillStyle = "rgba(0, 0, 0, 0.65)";
    ctx.fillRect(bx, Math.max(0, by - 20), width, 20);
    ctx.fillStyle = "#f8fafc";
    ctx.fillText(label, bx + 5, Math.max(14, by - 6));
  }
}

// --- live config -------------------------------------------------------------------

let presetNames = "";

function showConfig(current) {
  const config = current.config ?? {};
  ui.revision.textContent = `rev ${current.revision}`;
  const select = ui.form.elements.style;
  const styles = current.styles ?? [config.style];
  if (select.options.length !== styles.length) {
    select.replaceChildren(...styles.map((s) => new Option(s, s)));
  }
  for (const [name, value] of Object.entries(config)) {
    const input = ui.form.elements[name];
    if (!input) continue;
    if (document.activeElement !== input) input.value = value;  // never yank a slider mid-drag
    showValue(name, input.value);
  }
  const names = (current.presets ?? []).join("\n");
  if (names !== presetNames) {
    presetNames = names;
    ui.presets.replaceChildren(...(current.presets ?? []).map((name) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = name;
      button.onclick = () => send("preset.apply", { name });
      return button;
    }));
  }
  capture.configure(config);
}

function showValue(name, value) {
  const output = ui.form.querySelector(`output[data-for="${name}"]`);
  if (output) output.textContent = format(Number(value));
}

ui.form.addEventListener("input", (e) => showValue(e.target.name, e.target.value));
ui.form.addEventListener("change", (e) => {
  const { name, value } = e.target;
  send("config.update", { [name]: name === "style" ? value : Number(value) });
});

// --- messages and meters -----------------------------------------------------------

function note(level, text) {
  const first = ui.messages.firstElementChild;
  if (first && first.dataset.text === text) {  // repeated: count instead of flooding
    first.dataset.count = String(Number(first.dataset.count) + 1);
    first.lastChild.textContent = ` ×${first.dataset.count}`;
    return;
  }
  const item = document.createElement("li");
  item.className = level;
  item.dataset.text = text;
  item.dataset.count = "1";
  item.append(`${new Date().toLocaleTimeString()} ${text}`, document.createElement("span"));
  ui.messages.prepend(item);
  while (ui.messages.children.length > MAX_MESSAGES) ui.messages.lastElementChild.remove();
}

function refreshMeters() {
  ui.fps.textContent = fps.value();
  ui.p50.textContent = format(latency.percentile(50));
  ui.p95.textContent = format(latency.percentile(95));
  ui.inFlight.textContent = capture.inFlight.size;
  const v = ui.camera;
  ui.cameraSize.textContent = v.videoWidth ? `${v.videoWidth}×${v.videoHeight}` : "";
}

setInterval(refreshMeters, 250);
window.addEventListener("resize", drawFaces);
capture.start().catch((e) => note("error", `camera unavailable: ${e.message}`));
connect();
