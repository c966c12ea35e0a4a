// Mind Mirror lip-sync page: pick an avatar, speak or drop a WAV, watch it talk in sync.
//
// One WebSocket to /ws carries it all (wire.js). Audio goes out as 20 ms PCM16 chunks
// (kind 2), numbered from 0 in each session; output frames (kind 3) come back, frame i
// showing the session's samples [640 i, 640 (i + 1)). The server sends no audio: the page
// keeps what it sent (PcmStore) and plays each frame's slice as it paints it (AvPlayer,
// av_schedule.js has the timing rules). A reconnect starts a new session, so frame ids,
// chunk ids and sample numbers all restart at 0 and the page's copies are cleared.
// `window.mindMirrorLipSync.snapshot()` returns the page's figures (for tests).

import { MicSource, FileSource, decodeFile, micErrorText } from "./audio_in.js";
import { CHUNK_SAMPLES, levelDb, pcm16Bytes } from "./audio_pcm.js";
import { AvPlayer } from "./av_player.js";
import { PcmStore, SAMPLES_PER_FRAME } from "./av_schedule.js";
import { LatencyChart } from "./latency_chart.js";
import { FpsMeter, RollingPercentiles } from "./meters.js";
import { ModelsCard } from "./models_view.js";
import { Notes } from "./notes.js";
import { format, renderStats } from "./stats_view.js";
import { Kind, decodeFrame, encodeFrame, message, nowMs } from "./wire.js";

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), fps: $("fps"), p50: $("latency-p50"), p90: $("latency-p90"), avP50: $("av-p50"),
  canvas: $("avatar"), idle: $("avatar-idle"), avatarName: $("avatar-name"), avatarInfo: $("avatar-info"),
  maker: $("maker"), generator: $("generator"), speech: $("speech"),
  select: $("avatar-select"), mic: $("mic"), stop: $("stop"), drop: $("drop"), file: $("file"),
  sourceStatus: $("source-status"), level: $("level-bar"), sound: $("sound"), soundBlocked: $("sound-blocked"),
  e2e: { p50: $("e2e-p50"), p90: $("e2e-p90"), p99: $("e2e-p99"), count: $("e2e-count"),
    server: $("e2e-server"), buffer: $("e2e-buffer") },
  av: { offset: $("av-offset"), abs90: $("av-abs90"), late: $("late"), skipped: $("skipped"),
    rebases: $("rebases"), chunks: $("chunks") },
  histogram: $("latency-histogram"), latencyWindow: $("latency-window"), stats: $("stats"),
  models: $("models"), messages: $("messages"),
};

const LATENCY_WINDOW = 200;
const BACKOFF_MS = { first: 500, max: 8000 };
const CLOSE_REASONS = {
  1001: "server going away", 1006: "server unreachable", 1009: "message too big",
  1011: "server error", 1013: "server full, try again later",
};

const fps = new FpsMeter();
const latency = new RollingPercentiles(LATENCY_WINDOW);
const split = { server: new RollingPercentiles(LATENCY_WINDOW), buffer: new RollingPercentiles(LATENCY_WINDOW) };
const avOffset = new RollingPercentiles(LATENCY_WINDOW);
const chart = new LatencyChart(ui.histogram);
const notes = new Notes(ui.messages);
const store = new PcmStore();
const models = new ModelsCard(ui.models, (level, text) => note(level, text));
const player = new AvPlayer(ui.canvas, store, {
  onPainted, onError: (frame, e) => note("error", `frame #${frame.frameId} did not decode: ${e.message}`),
});

let socket = null;
let reconnectAttempt = 0;
let nextChunk = 0;            // chunk id of the session's next audio chunk
const sent = { chunks: 0, samples: 0, refused: 0, unsent: 0 };
let painted = 0;
let chosenAvatar = null;      // what the person picked; re-selected on every new session
let shownAvatar = null;       // what config.current says this session shows
let avatars = [];
let lastLipsync = null;       // the `lipsync` part of the painted frame's vision
const visions = new Map();    // frame id -> vision, until painted
let audio = null;             // {ctx, gain}, made on the first gesture
let source = null;            // the MicSource or FileSource streaming now
let sourceLevel = -100;

// --- connection --------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  setConnection("connecting…", "wait");
  socket.onopen = () => {
    // A new session: its chunk ids, sample numbers and frame ids start at 0.
    nextChunk = 0;
    store.reset();
    player.reset();
    visions.clear();
    if (chosenAvatar) send("avatar.select", { id: chosenAvatar });
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onText(JSON.parse(event.data));
    else onBinary(event.data);
  };
  socket.onclose = (event) => {
    const delay = Math.min(BACKOFF_MS.max, BACKOFF_MS.first * 2 ** reconnectAttempt) * (0.75 + Math.random() / 2);
    reconnectAttempt += 1;
    setConnection(`reconnecting in ${(delay / 1000).toFixed(1)} s`, "down");
    note("info", `disconnected: ${CLOSE_REASONS[event.code] ?? "closed"} (${event.code}${event.reason ? ` ${event.reason}` : ""})`);
    setTimeout(connect, delay);
  };
}

function send(type, payload) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(message(type, payload));
  else note("error", "not connected; not sent");
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
      showAvatars(payload);
      break;
    case "vision":
      visions.set(payload.frame_id, payload);
      while (visions.size > 64) visions.delete(visions.keys().next().value);
      break;
    case "stats":
      renderStats(ui.stats, payload);
      break;
    case "error":
      onError(payload);
      break;
    default:
      console.warn("unknown message type", type);
  }
}

function onError(payload) {
  if (Number.isInteger(payload.chunk_id)) {
    // The server refused one of our chunks: it is not in the session's stream, so the
    // samples after it are numbered lower there; renumber our copy the same way.
    store.drop(payload.chunk_id);
    sent.refused += 1;
  }
  if (payload.code === "unsupported_kind" && Number.isInteger(payload.chunk_id)) {
    stopSource(`the server's pipeline takes no audio: ${payload.message}`, true);
  }
  note("error", `${payload.code}: ${payload.message}`);
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
  player.show(frame);
}

function onPainted(item, paintMs) {
  const frame = item.frame;
  const paintedTs = performance.timeOrigin + paintMs;  // the wire clock
  latency.add(paintedTs - frame.clientTs);
  split.server.add(frame.receivedTs - frame.clientTs);
  split.buffer.add(paintedTs - frame.receivedTs);
  const offset = player.offsetOf(item, paintMs);
  if (Number.isFinite(offset)) avOffset.add(offset);
  fps.tick();
  painted += 1;
  ui.idle.hidden = true;
  const vision = visions.get(frame.frameId);
  for (const id of visions.keys()) if (id <= frame.frameId) visions.delete(id);
  lastLipsync = vision?.lipsync ?? lastLipsync;
  showMaker(frame.frameId);
}

// --- avatars -----------------------------------------------------------------------

function showAvatars(current) {
  const list = (Array.isArray(current.avatars) ? current.avatars : [])
    .map((a) => (typeof a === "string" ? a : a?.id)).filter((a) => typeof a === "string");
  // `avatar` is this session's choice; before it made one, the pipeline's default.
  const shown = current.avatar ?? current.default_avatar;
  shownAvatar = typeof shown === "string" ? shown : null;
  if (list.join("\n") !== avatars.join("\n")) {
    avatars = list;
    ui.select.replaceChildren(...list.map((id) => new Option(id, id)));
  }
  if (!list.length) {
    ui.select.replaceChildren(new Option("no avatars: this server runs the mirror", ""));
    ui.select.disabled = true;
    // A pipeline without avatars has no models either (GET /models would say 404).
    models.stop("this pipeline serves no models");
  } else {
    ui.select.disabled = false;
    models.start(list);
  }
  if (shownAvatar && document.activeElement !== ui.select) ui.select.value = shownAvatar;
  ui.avatarName.textContent = shownAvatar ?? "–";
}

ui.select.addEventListener("change", () => {
  chosenAvatar = ui.select.value;
  send("avatar.select", { id: chosenAvatar });
});

function showMaker(frameId) {
  const l = lastLipsync;
  ui.avatarInfo.textContent = `#${frameId}${Number.isInteger(l?.avatar_frame) ? ` · avatar frame ${l.avatar_frame}` : ""}`;
  ui.maker.hidden = !l;
  if (!l) return;
  if (typeof l.avatar === "string") ui.avatarName.textContent = l.avatar;
  ui.generator.textContent = typeof l.generator === "string" ? l.generator : "–";
  const loud = Number.isFinite(l.loudness_db) ? ` ${format(l.loudness_db)} dBFS` : "";
  ui.speech.textContent = `${l.speech ? "speech" : "quiet"}${loud}`;
}

// --- audio out: chunks to the server -----------------------------------------------

function sendChunk(pcm, ts) {
  sourceLevel = Math.max(levelDb(pcm), sourceLevel - 3);  // a meter that falls back slowly
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    sent.unsent += 1;  // no session to put it in: the stream simply has no such samples
    return;
  }
  const id = nextChunk;
  nextChunk = (nextChunk + 1) >>> 0;
  store.append(id, pcm);
  socket.send(encodeFrame(Kind.AUDIO_CHUNK, id, ts, pcm16Bytes(pcm)));
  sent.chunks += 1;
  sent.samples += pcm.length;
}

/** The AudioContext, made and resumed inside a user gesture (browsers require one). */
function audioContext() {
  if (!audio) {
    const ctx = new AudioContext({ latencyHint: "interactive" });
    const gain = ctx.createGain();
    gain.gain.value = ui.sound.checked ? 1 : 0;  // muted still schedules, so A/V is still measured
    gain.connect(ctx.destination);
    audio = { ctx, gain };
    player.setAudio(ctx, gain);
    ctx.onstatechange = showSoundState;
  }
  if (audio.ctx.state === "suspended") audio.ctx.resume().catch(() => {});
  showSoundState();
  return audio.ctx;
}

function showSoundState() {
  ui.soundBlocked.hidden = !audio || audio.ctx.state !== "suspended";
}

ui.sound.addEventListener("change", () => {
  if (audio) audio.gain.gain.value = ui.sound.checked ? 1 : 0;
});
document.addEventListener("click", () => { if (audio?.ctx.state === "suspended") audio.ctx.resume(); });

function setStatus(text, level = "dim") {
  ui.sourceStatus.textContent = text;
  ui.sourceStatus.className = `status ${level}`;
}

function stopSource(reason = "Stopped.", isError = false) {
  source?.stop();
  source = null;
  ui.stop.disabled = true;
  ui.mic.disabled = false;
  ui.mic.classList.remove("on");
  setStatus(reason, isError ? "error" : "dim");
}

ui.mic.addEventListener("click", async () => {
  const ctx = audioContext();
  stopSource();
  const mic = new MicSource(ctx, sendChunk);
  ui.mic.disabled = true;
  setStatus("asking for the microphone…");
  try {
    await mic.start();
  } catch (e) {
    mic.stop();
    const text = micErrorText(e);
    stopSource(text, true);
    note("error", text);
    return;
  }
  source = mic;
  ui.mic.classList.add("on");
  ui.stop.disabled = false;
  setStatus(`microphone on (${mic.kind}, ${ctx.sampleRate} Hz → 16 kHz)`, "ok");
});

ui.stop.addEventListener("click", () => stopSource());

async function playFile(file) {
  const ctx = audioContext();
  stopSource();
  setStatus(`decoding ${file.name}…`);
  let samples;
  try {
    samples = await decodeFile(ctx, file);
  } catch (e) {
    const text = `${file.name} could not be decoded as audio: ${e.message ?? e}`;
    stopSource(text, true);
    note("error", text);
    return;
  }
  // Pad with silence to a whole video frame, so the last words get their frame too.
  const pad = (SAMPLES_PER_FRAME - ((store.length + samples.length) % SAMPLES_PER_FRAME)) % SAMPLES_PER_FRAME;
  const padded = new Int16Array(samples.length + pad);
  padded.set(samples);
  const stream = new FileSource(padded, sendChunk, () => {
    if (source === stream) stopSource(`${file.name}: all ${stream.seconds.toFixed(1)} s sent.`);
  });
  source = stream;
  ui.stop.disabled = false;
  stream.start();
  const tick = () => {
    if (source !== stream) return;
    setStatus(`streaming ${file.name}: ${stream.position.toFixed(1)} / ${stream.seconds.toFixed(1)} s`, "ok");
    setTimeout(tick, 250);
  };
  tick();
}

ui.file.addEventListener("change", () => {
  const file = ui.file.files?.[0];
  if (file) playFile(file);
  ui.file.value = "";  // the same file again is a new change
});
ui.drop.addEventListener("dragover", (e) => { e.preventDefault(); ui.drop.classList.add("over"); });
ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
ui.drop.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.drop.classList.remove("over");
  const file = e.dataTransfer?.files?.[0];
  if (file) playFile(file);
});

// --- meters ------------------------------------------------------------------------

function note(level, text) {
  notes.add(level, text);
}

function ms(v) {
  return Number.isFinite(v) ? v.toFixed(Math.abs(v) < 100 ? 1 : 0) : "–";
}

function e2e() {
  return { p50: latency.percentile(50), p90: latency.percentile(90), p99: latency.percentile(99),
    count: latency.samples.length };
}

function avFigures() {
  const abs = new RollingPercentiles(LATENCY_WINDOW);
  for (const v of avOffset.samples) abs.add(Math.abs(v));
  return { p50: avOffset.percentile(50), abs_p90: abs.percentile(90), count: avOffset.samples.length };
}

function refreshMeters() {
  const g = e2e();
  const av = avFigures();
  const counts = player.counts;
  ui.fps.textContent = fps.value();
  ui.p50.textContent = ms(g.p50);
  ui.p90.textContent = ms(g.p90);
  ui.avP50.textContent = ms(av.p50);
  ui.e2e.p50.textContent = ms(g.p50);
  ui.e2e.p90.textContent = ms(g.p90);
  ui.e2e.p99.textContent = ms(g.p99);
  ui.e2e.count.textContent = String(g.count);
  ui.e2e.server.textContent = ms(split.server.percentile(50));
  ui.e2e.buffer.textContent = ms(split.buffer.percentile(50));
  ui.av.offset.textContent = ms(av.p50);
  ui.av.abs90.textContent = ms(av.abs_p90);
  ui.av.late.textContent = String(counts.late);
  ui.av.skipped.textContent = String(counts.audio_skipped);
  ui.av.rebases.textContent = String(counts.rebases);
  ui.av.chunks.textContent = String(sent.chunks);
  chart.update(latency.samples, [g.p50, g.p90]);
  sourceLevel = source ? sourceLevel : -100;
  ui.level.style.width = `${Math.max(0, Math.min(100, (sourceLevel + 60) / 60 * 100))}%`;
}

window.mindMirrorLipSync = Object.freeze({
  snapshot: () => ({
    connection: ui.connection.textContent, avatars: [...avatars], avatar: shownAvatar, painted,
    fps: fps.value(), e2e: e2e(), av: avFigures(), sent: { ...sent, seconds: sent.samples / 16000 },
    stored_samples: store.length, player: { ...player.counts }, chunk_samples: CHUNK_SAMPLES,
    lipsync: lastLipsync, audio: audio ? audio.ctx.state : "none", source: ui.sourceStatus.textContent,
  }),
});

ui.latencyWindow.textContent = String(LATENCY_WINDOW);
setInterval(refreshMeters, 250);
connect();
