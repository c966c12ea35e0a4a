// A page's one WebSocket to /ws on its own origin (protocol: wire.js), kept open.
//
// It reconnects with exponential backoff and shows its state in the header's pill:
// "connecting…", "reconnecting in 1.2 s", and "live" once the server's `config.current`
// says the session is up. After a 1012 close (the server's job is restarting) it tries
// every second for the first 20 tries, so the page is back within about a second of the
// restarted job serving; then it backs off as usual. Text messages go to the page's
// handler for their `type`; binary ones are decoded, and output frames go to `onFrame`
// stamped with `receivedTs`.
// A server that wants a token gets the one in the page's address (access.js).

import { TOKEN, authFetch, socketUrl } from "./access.js";
import { Kind, decodeFrame, message, nowMs } from "./wire.js";

export const BACKOFF_MS = { first: 500, max: 8000, restarting: 1000, restartingTries: 20 };
const SERVICE_RESTART = 1012;
const CLOSE_REASONS = {
  1001: "server going away", 1006: "server unreachable", 1008: "refused by the server", 1009: "message too big",
  1011: "server error", 1012: "server restarting", 1013: "server full, try again later",
};

/** Milliseconds to wait before reconnect `attempt` (0, 1, ...): doubling up to a cap, ±25%.
 *  `restarting` (a close was 1012): a low cap for the first tries, as the server is expected back soon. */
export function reconnectDelay(attempt, random = Math.random(), restarting = false) {
  const cap = restarting && attempt < BACKOFF_MS.restartingTries ? BACKOFF_MS.restarting : BACKOFF_MS.max;
  return Math.min(cap, BACKOFF_MS.first * 2 ** attempt) * (0.75 + random / 2);
}

/** Why the server refused the socket, for a person: `status` is what GET /ws with the
 *  page's token answered (401: no or wrong token, 403: an origin it does not allow). */
export function refusedText(status, hasToken) {
  if (status === 401) {
    return hasToken ? "the server did not accept the token in this page's address (?token=…)"
      : "the server needs a token: open this page as /?token=… with the server's token (server.token or MINDMIRROR_TOKEN)";
  }
  return "the server refused this page's origin: open the page from the server's own address, or add this origin to server.allowed_origins";
}

/** The note for a closed socket: "disconnected: server unreachable (1006)". */
export function closeText({ code, reason }) {
  return `disconnected: ${CLOSE_REASONS[code] ?? "closed"} (${code}${reason ? ` ${reason}` : ""})`;
}

export class Connection {
  /**
   * @param {HTMLElement} pill the header's connection state
   * @param {{messages: Object<string, (payload: object) => void>, onFrame: (frame: object) => void,
   *   note: (level: string, text: string) => void, onOpen?: () => void, onClose?: () => void}} hooks
   *   `messages` has a handler per text message type; onOpen and onClose run first thing
   *   when a socket opens or closes (a new socket is a new session)
   */
  constructor(pill, { messages, onFrame, note, onOpen = () => {}, onClose = () => {} }) {
    this.pill = pill;
    this.messages = new Map(Object.entries(messages));
    this.onFrame = onFrame;
    this.note = note;
    this.onOpen = onOpen;
    this.onClose = onClose;
    this.socket = null;
    this.attempt = 0;  // reconnects since the last session that went live
    this.restarting = false;  // closed with 1012 since the last session that went live
  }

  connect() {
    const socket = new WebSocket(socketUrl(location, TOKEN));  // the token of the page's address, if any
    this.socket = socket;
    socket.binaryType = "arraybuffer";
    this.#show("connecting…", "wait");
    let opened = false;
    socket.onopen = () => {
      opened = true;
      this.onOpen();
    };
    socket.onmessage = (event) => {
      if (typeof event.data === "string") this.#onText(JSON.parse(event.data));
      else this.#onBinary(event.data);
    };
    socket.onclose = (event) => {
      this.onClose();
      if (event.code === SERVICE_RESTART) this.restarting = true;
      const delay = reconnectDelay(this.attempt, Math.random(), this.restarting);
      this.attempt += 1;
      this.#show(`reconnecting in ${(delay / 1000).toFixed(1)} s`, "down");
      this.note("info", closeText(event));
      if (!opened) this.#askWhy();
      setTimeout(() => this.connect(), delay);
    };
  }

  get open() {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  /** What the pill says ("live", "connecting…", ...). */
  get status() {
    return this.pill.textContent;
  }

  /** Send a text message; false when there is no open socket. */
  send(type, payload) {
    if (!this.open) return false;
    this.socket.send(message(type, payload));
    return true;
  }

  /** Send a binary message; false when there is no open socket or more than
   *  `maxBufferedBytes` wait in it already (the socket is backed up). */
  sendBytes(data, maxBufferedBytes = Infinity) {
    if (!this.open || this.socket.bufferedAmount > maxBufferedBytes) return false;
    this.socket.send(data);
    return true;
  }

  /** A handshake the server refused (no token, a wrong one, another origin) closes as 1006
   *  here, just like a server that is down; asking GET /ws with the same token tells which. */
  async #askWhy() {
    try {
      const response = await authFetch("ws", { cache: "no-store" });
      if (response.status === 401 || response.status === 403) this.note("error", refusedText(response.status, TOKEN !== null));
    } catch {
      // unreachable: the close note says so already
    }
  }

  #onText({ type, payload }) {
    if (type === "config.current") {  // the server's word that this session is up
      this.attempt = 0;
      this.restarting = false;
      this.#show("live", "ok");
    }
    const handler = this.messages.get(type);
    if (handler) handler(payload);
    else console.warn("unknown message type", type);
  }

  #onBinary(buffer) {
    let frame;
    try {
      frame = decodeFrame(buffer);
    } catch (e) {
      this.note("error", `bad frame from server: ${e.message}`);
      return;
    }
    if (frame.kind !== Kind.OUTPUT_FRAME) return;
    frame.receivedTs = nowMs();
    this.onFrame(frame);
  }

  #show(text, state) {
    this.pill.textContent = text;
    this.pill.className = `pill pill-${state}`;
  }
}
