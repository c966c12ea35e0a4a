// Camera and microphone need a secure page: say so, and what to do, instead of failing.
//
// Browsers give `navigator.mediaDevices` (and with it getUserMedia) only to pages in a
// secure context: https://, or http:// on localhost / 127.0.0.1. The same server opened as
// http://192.168.1.5:8765/ from another machine used to fail with "Cannot read properties
// of undefined (reading 'getUserMedia')". `mediaProblem` tells that case apart before any
// camera or microphone is asked for, and says the two ways out: open the page on
// localhost (an SSH tunnel makes a remote server local), or serve HTTPS with
// `--tls-cert/--tls-key`. It is pure (Node tests it with made-up environments);
// `showMediaProblem` draws it.

import { el } from "./dom.js";

/**
 * Null when `device` ("camera" or "microphone") can be asked for here, else
 * `{title, why, steps}`: plain text, where `code` stands between backticks.
 * @param {string} device
 * @param {{isSecureContext?: boolean, navigator?: object, location?: object}} env the page's window
 */
export function mediaProblem(device, env = globalThis) {
  const secure = env.isSecureContext !== false;
  if (secure && typeof env.navigator?.mediaDevices?.getUserMedia === "function") return null;
  const loc = env.location ?? {};
  const port = loc.port ? `:${loc.port}` : "";
  const page = `${loc.pathname ?? "/"}${loc.search ?? ""}`;
  if (!secure) {
    // A tunnel's local end needs no root: below 1024 (a server on 80) it listens on 8765.
    const remotePort = Number(loc.port) || 80;
    const localPort = remotePort < 1024 ? 8765 : remotePort;
    const tunnelled = localPort === remotePort ? "that same address" : `\`http://localhost:${localPort}${page}\``;
    return {
      title: `No ${device} on this address: it is not a secure page`,
      why: `This page is open at \`${loc.protocol ?? "http:"}//${loc.host ?? "?"}\` over plain HTTP, and browsers `
        + `let a page use the ${device} only over HTTPS or on localhost.`,
      steps: [
        `On the machine running the server, open \`http://localhost${port}${page}\`.`,
        `From another machine, tunnel first: \`ssh -L ${localPort}:localhost:${remotePort} <server>\`, then open ${tunnelled} there.`,
        `Or start the server with \`--tls-cert cert.pem --tls-key key.pem\` (see the README) and open `
          + `\`https://${loc.host ?? "<server>"}${page}\`.`,
      ],
    };
  }
  return {
    title: `No ${device}: this browser gives the page no media devices`,
    why: "The page is secure, but navigator.mediaDevices is missing: the browser is too old, or a policy turned it off.",
    steps: ["Try a current Chrome, Edge, Firefox or Safari."],
  };
}

/** "open `x` now" -> [{text: "open "}, {code: "x"}, {text: " now"}]. */
export function textParts(text) {
  return String(text).split("`").map((part, i) => (i % 2 ? { code: part } : { text: part })).filter((p) => (p.code ?? p.text) !== "");
}

function paragraph(tag, text) {
  const node = el(tag);
  for (const part of textParts(text)) node.append(part.code !== undefined ? el("code", null, part.code) : part.text);
  return node;
}

/** Fill `box` (hidden until now) with the problem; hide it when there is none. */
export function showMediaProblem(box, problem) {
  box.hidden = !problem;
  if (!problem) return;
  const steps = el("ul");
  for (const step of problem.steps) steps.append(paragraph("li", step));
  box.replaceChildren(el("b", null, problem.title), paragraph("p", problem.why), steps);
}
