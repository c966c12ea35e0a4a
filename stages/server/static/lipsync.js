// Mind Mirror lip-sync page: pick an avatar, speak or drop a WAV, watch it talk in sync.
//
// One WebSocket to /ws carries it all (wire.js). Audio goes out as 20 ms PCM16 chunks
// (kind 2), numbered from 0 in each session; output frames (kind 3) come back, frame i
// showing the session's samples [640 i, 640 (i + 1)). The server sends no audio: the page
// keeps what it sent (PcmStore) and plays each frame's slice as it paints it (AvPlayer,
// av_schedule.js has the timing rules). A reconnect starts a new session, so frame ids,
// chunk ids and sample numbers all restart at 0 and the page's copies are cleared.
// `window.mindMirrorLipSync.snapshot()` returns the page's figures (for tests).

import { carryToken } from "./access.js";
import { MicSource, FileSource, decodeFile, micErrorText } from "./audio_in.js";
import { CHUNK_SAMPLES, levelDb, pcm16Bytes } from "./audio_pcm.js";
import { AvPlayer } from "./av_player.js";
import { PcmStore, SAMPLE_RATE, SAMPLES_PER_FRAME } from "./av_schedule.js";

/** Audio the pipeline needs after a frame before it makes it (stages/lipsync/audio_windows.py: 0.4525 s). */
const LOOKAHEAD_S = 0.4525;
/** What made the mouth of the frame on screen, as the caption says it. */
const GENERATORS = {
  unet: "lip-sync U-Net",
  "mouth-synth": "non-neural mouth (follows loudness: this avatar has no trained model)",
  silence: "silence (the avatar's own frame)",
};
import { Connection } from "./connection.js";
import { FrameVisions } from "./frame_visions.js";
import { JobView } from "./job_view.js";
import { LATENCY_WINDOW, LatencyCard, ms } from "./latency_card.js";
import { mediaProblem, showMediaProblem } from "./media_access.js";
import { RollingPercentiles } from "./meters.js";
import { ModelsCard } from "./models_view.js";
import { JobBanner, statusModel, statusNote } from "./job_status.js";
import { Notes } from "./notes.js";
import { format, renderStats } from "./stats_view.js";
import { Kind, encodeFrame } from "./wire.js";

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), fps: $("fps"), p50: $("latency-p50"), p90: $("latency-p90"), avP50: $("av-p50"),
  canvas: $("avatar"), idle: $("avatar-idle"), avatarName: $("avatar-name"), avatarInfo: $("avatar-info"),
  maker: $("maker"), generator: $("generator"), speech: $("speech"),
  select: $("avatar-select"), mic: $("mic"), stop: $("stop"), drop: $("drop"), file: $("file"),
  sourceStatus: $("source-status"), level: $("level-bar"), sound: $("sound"), soundBlocked: $("sound-blocked"),
  av: { offset: $("av-offset"), abs90: $("av-abs90"), late: $("late"), skipped: $("skipped"),
    rebases: $("rebases"), chunks: $("chunks") },
  latency: $("latency"), latencyWindow: $("latency-window"), stats: $("stats"), job: $("job"),
  mediaProblem: $("media-problem"), models: $("models"), messages: $("messages"), jobStatus: $("job-status"),
};

const latency = new LatencyCard(
  { card: ui.latency, window: ui.latencyWindow, fps: ui.fps, p50: ui.p50, p90: ui.p90 }, "e2e", [
    { key: "server", label: "round trip",
      title: "the frame's own 40 ms of audio, the socket, every rank of the pipeline (with its audio look-ahead), and back" },
    { key: "buffer", label: "buffer", title: "decode the JPEG, wait in the jitter buffer for its time, paint" },
  ]);
const avOffset = new RollingPercentiles(LATENCY_WINDOW);
const notes = new Notes(ui.messages);
const job = new JobView(ui.job);
const jobBanner = new JobBanner(ui.jobStatus);
const micProblem = mediaProblem("microphone");  // null where the page may ask for the microphone
const store = new PcmStore();
const models = new ModelsCard(ui.models, (level, text) => note(level, text));
const player = new AvPlayer(ui.canvas, store, {
  onPainted, onError: (frame, e) => note("error", `frame #${frame.frameId} did not decode: ${e.message}`),
});

let nextChunk = 0;            // chunk id of the session's next audio chunk
const sent = { chunks: 0, samples: 0, refused: 0, unsent: 0 };
let chosenAvatar = null;      // what the person picked; re-selected on every new session
let shownAvatar = null;       // what config.current says this session shows
let avatars = [];
let lastLipsync = null;       // the `lipsync` part of the painted frame's vision
const visions = new FrameVisions(64);
let audio = null;             // {ctx, gain}, made on the first gesture
let source = null;            // the MicSource or FileSource streaming now
let sourceLevel = -100;

const connection = new Connection(ui.connection, {
  messages: {
    "config.current": showAvatars,
    vision: (payload) => visions.add(payload),
    stats: (payload) => {
      job.update(payload);
      const { ranks, ...rest } = payload;  // ranks: the "Links and ranks" card shows them by node
      renderStats(ui.stats, rest);
    },
    error: onError,
    status: (payload) => {  // the job lost a rank: it goes on degraded, or restarts
      jobBanner.show(payload);
      note(statusModel(payload).level === "warn" ? "info" : "error", statusNote(payload));
    },
  },
  onFrame: (frame) => player.show(frame),
  onOpen: () => {
    jobBanner.clear();  // a job still degraded says so again at once
    // A new session: its chunk ids, sample numbers and frame ids start at 0.
    nextChunk = 0;
    store.reset();
    player.reset();
    visions.clear();
    if (chosenAvatar) send("avatar.select", { id: chosenAvatar });
  },
  note,
});

function send(type, payload) {
  if (!connection.send(type, payload)) note("error", "not connected; not sent");
}

// --- incoming ----------------------------------------------------------------------

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

function onPainted(item, paintMs) {
  const frame = item.frame;
  const paintedTs = performance.timeOrigin + paintMs;  // the wire clock
  latency.add(paintedTs - frame.clientTs,
    { server: frame.receivedTs - frame.clientTs, buffer: paintedTs - frame.receivedTs });
  const offset = player.offsetOf(item, paintMs);
  if (Number.isFinite(offset)) avOffset.add(offset);
  ui.idle.hidden = true;
  lastLipsync = visions.take(frame.frameId)?.lipsync ?? lastLipsync;
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
  ui.generator.textContent = typeof l.generator === "string" ? (GENERATORS[l.generator] ?? l.generator) : "–";
  const loud = Number.isFinite(l.loudness_db) ? ` ${format(l.loudness_db)} dBFS` : "";
  ui.speech.textContent = `${l.speech ? "speech" : "quiet"}${loud}`;
}

// --- audio out: chunks to the server -----------------------------------------------

function sendChunk(pcm, ts) {
  sourceLevel = Math.max(levelDb(pcm), sourceLevel - 3);  // a meter that falls back slowly
  if (!connection.open) {
    sent.unsent += 1;  // no session to put it in: the stream simply has no such samples
    return;
  }
  const id = nextChunk;
  nextChunk = (nextChunk + 1) >>> 0;
  store.append(id, pcm);
  connection.sendBytes(encodeFrame(Kind.AUDIO_CHUNK, id, ts, pcm16Bytes(pcm)));
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
  ui.mic.disabled = micProblem !== null;
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
  // Pad with silence to a whole video frame, plus the pipeline's look-ahead: a frame is made
  // once the audio 0.45 s after it has arrived, so without the tail the file's last words
  // would never get their frames.
  const tail = Math.ceil((LOOKAHEAD_S * SAMPLE_RATE) / SAMPLES_PER_FRAME + 1) * SAMPLES_PER_FRAME;
  const pad = tail + (SAMPLES_PER_FRAME - ((store.length + samples.length) % SAMPLES_PER_FRAME)) % SAMPLES_PER_FRAME;
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

function avFigures() {
  const abs = new RollingPercentiles(LATENCY_WINDOW);
  for (const v of avOffset.samples) abs.add(Math.abs(v));
  return { p50: avOffset.percentile(50), abs_p90: abs.percentile(90), count: avOffset.samples.length };
}

function refreshMeters() {
  latency.refresh();
  const av = avFigures();
  const counts = player.counts;
  ui.avP50.textContent = ms(av.p50);
  ui.av.offset.textContent = ms(av.p50);
  ui.av.abs90.textContent = ms(av.abs_p90);
  ui.av.late.textContent = String(counts.late);
  ui.av.skipped.textContent = String(counts.audio_skipped);
  ui.av.rebases.textContent = String(counts.rebases);
  ui.av.chunks.textContent = String(sent.chunks);
  sourceLevel = source ? sourceLevel : -100;
  ui.level.style.width = `${Math.max(0, Math.min(100, (sourceLevel + 60) / 60 * 100))}%`;
}

window.mindMirrorLipSync = Object.freeze({
  snapshot: () => ({
    connection: connection.status, avatars: [...avatars], avatar: shownAvatar, painted: latency.painted,
    fps: latency.fps.value(), e2e: latency.summary(), av: avFigures(), sent: { ...sent, seconds: sent.samples / 16000 },
    stored_samples: store.length, player: { ...player.counts }, chunk_samples: CHUNK_SAMPLES,
    lipsync: lastLipsync, audio: audio ? audio.ctx.state : "none", source: ui.sourceStatus.textContent,
    job: job.snapshot(), microphone: micProblem ? "unavailable" : "allowed", jobStatus: jobBanner.state,
  }),
});

// Without a secure page there is no microphone: say why and what to do; a dropped WAV file
// needs none and still works.
carryToken();
showMediaProblem(ui.mediaProblem, micProblem);
if (micProblem) {
  ui.mic.disabled = true;
  ui.mic.title = micProblem.title;
  setStatus(`${micProblem.title}. A WAV file still works.`, "warn");
}
setInterval(refreshMeters, 250);
connection.connect();
