// Mind Mirror page: camera out, portraits and face boxes in, live settings, latency and stats.
//
// One WebSocket to /ws on this page's origin carries everything (protocol: wire.js).
// Reconnects with exponential backoff; the camera keeps running meanwhile and simply
// sends nothing while there is no socket. Where the browser gives this page no camera
// (plain http:// on an address other than localhost) it says why and what to do, and
// still shows the pipeline's figures. `window.mindMirror.snapshot()` returns the page's
// own figures (tests/stages/server/browser_check.py reads them).

import { carryToken } from "./access.js";
import { Capture } from "./capture.js";
import { Connection } from "./connection.js";
import { FrameVisions } from "./frame_visions.js";
import { JobBanner, statusModel, statusNote } from "./job_status.js";
import { JobView } from "./job_view.js";
import { LatencyCard } from "./latency_card.js";
import { mediaProblem, showMediaProblem } from "./media_access.js";
import { Notes } from "./notes.js";
import { drawFaces } from "./overlay.js";
import { Portrait } from "./portrait.js";
import { SettingsForm } from "./settings_form.js";
import { renderStats } from "./stats_view.js";
import { nowMs } from "./wire.js";

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"), fps: $("fps"), p50: $("latency-p50"), p90: $("latency-p90"),
  inFlight: $("in-flight"), camera: $("camera"), overlay: $("overlay"), cameraSize: $("camera-size"),
  faceCount: $("face-count"), portrait: $("portrait"), portraitInfo: $("portrait-info"),
  maker: $("maker"), generator: $("generator"), styleName: $("style-name"), styleEmotion: $("style-emotion"),
  latency: $("latency"), latencyWindow: $("latency-window"),
  revision: $("revision"), form: $("config-form"), presets: $("presets"), sessionCount: $("session-count"),
  stats: $("stats"), job: $("job"), mediaProblem: $("media-problem"), messages: $("messages"),
  jobStatus: $("job-status"),
};

const MAX_BUFFERED_BYTES = 1 << 20;  // past this the socket is backed up: skip frames
const MAX_MESSAGES = 12;

// Where the glass-to-glass time goes, per frame: capture + JPEG encode + send in this
// page, the server's round trip (socket, every rank, back), decode + wait for paint.
const latency = new LatencyCard(
  { card: ui.latency, window: ui.latencyWindow, fps: ui.fps, p50: ui.p50, p90: ui.p90 }, "g2g", [
    { key: "encode_send", label: "encode", title: "draw the camera frame, JPEG-encode it, hand it to the socket" },
    { key: "server_round_trip", label: "round trip", title: "socket, every rank of the pipeline, and back" },
    { key: "decode_paint", label: "paint", title: "decode the portrait JPEG, wait for the next paint" },
  ]);
const notes = new Notes(ui.messages, MAX_MESSAGES);
const job = new JobView(ui.job);
const jobBanner = new JobBanner(ui.jobStatus);
let lastVision = null;               // newest `vision` message: the camera's face boxes
let lastLabels = [];
let shownVision = null;              // the `vision` of the portrait on screen
const visions = new FrameVisions(32);
let lastRevision = null;             // live config revision last shown

const connection = new Connection(ui.connection, {
  messages: {
    "config.current": (payload) => {
      // A new revision flushes frames queued under the old one; they will never be
      // answered, so stop waiting for them instead of stalling capture until they expire.
      if (payload.revision !== lastRevision) capture.reset();
      lastRevision = payload.revision;
      settings.show(payload);
      capture.configure(payload.config ?? {});
    },
    vision: (payload) => {
      lastVision = payload;
      visions.add(payload);
      redrawFaces();
    },
    stats: (payload) => {
      job.update(payload);
      const { ranks, ...rest } = payload;  // ranks: the "Links and ranks" card shows them by node
      renderStats(ui.stats, rest);
      showSessions(payload.server?.sessions);
    },
    error: (payload) => note("error", `${payload.code}: ${payload.message}`),
    status: (payload) => {  // the job lost a rank: it goes on degraded, or restarts
      jobBanner.show(payload);
      note(statusModel(payload).level === "warn" ? "info" : "error", statusNote(payload));
    },
  },
  onFrame,
  onOpen: () => jobBanner.clear(),  // a new session: a job still degraded says so again
  onClose: () => {
    capture.reset();
    lastVision = null;
    visions.clear();
    redrawFaces();
  },
  note,
});
const capture = new Capture(ui.camera, (data) => connection.sendBytes(data, MAX_BUFFERED_BYTES));
const settings = new SettingsForm(ui, send);
const portrait = new Portrait(ui.portrait, onPainted,
  (frame, e) => note("error", `portrait #${frame.frameId} did not decode: ${e.message}`));

function send(type, payload) {
  if (!connection.send(type, payload)) note("error", "not connected; change not sent");
}

// --- frames ------------------------------------------------------------------------

function onFrame(frame) {
  capture.ack(frame.frameId);
  portrait.show(frame);
}

function onPainted(frame) {
  const paintedTs = nowMs();
  const sent = capture.sent.get(frame.frameId);
  const parts = sent && sent.clientTs === frame.clientTs ? {  // while this frame's send is known
    encode_send: sent.sentTs - sent.clientTs,
    server_round_trip: frame.receivedTs - sent.sentTs,
    decode_paint: paintedTs - frame.receivedTs,
  } : null;
  latency.add(paintedTs - frame.clientTs, parts);  // same clock that stamped the camera frame
  ui.portraitInfo.textContent = `${ui.portrait.width}×${ui.portrait.height} · #${frame.frameId}`;
  showMaker(visions.take(frame.frameId) ?? lastVision);
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

function refreshMeters() {
  latency.refresh();
  ui.inFlight.textContent = capture.inFlight.size;
  const v = ui.camera;
  ui.cameraSize.textContent = v.videoWidth ? `${v.videoWidth}×${v.videoHeight}` : "";
}

window.mindMirror = Object.freeze({
  /** The page's own figures: painted frames, FPS, glass-to-glass (ms), histogram, labels. */
  snapshot: () => ({
    connection: connection.status, painted: latency.painted, seconds: latency.seconds(),
    fps: latency.fps.value(), g2g: latency.summary(), split_p50_ms: latency.partsP50(),
    histogram: { ...latency.chart.last }, generator: shownVision?.generator ?? null,
    style: shownVision?.style ?? null, faces: lastVision?.faces?.length ?? 0, labels: lastLabels,
    job: job.snapshot(), camera: cameraProblem ? "unavailable" : "asked", jobStatus: jobBanner.state,
  }),
  /** Forget latency samples and painted frames, e.g. after a warm-up. */
  resetMeters: () => latency.clear(),
});

setInterval(refreshMeters, 250);
window.addEventListener("resize", redrawFaces);
carryToken();
const cameraProblem = mediaProblem("camera");
showMediaProblem(ui.mediaProblem, cameraProblem);
if (cameraProblem) note("error", cameraProblem.title);
else capture.start().catch((e) => note("error", `camera unavailable: ${e.message}`));
connection.connect();
