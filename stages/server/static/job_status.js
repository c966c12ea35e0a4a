// The job's word on a lost rank: a `status` message ({state, message, lost}) shown as a
// banner above the panes while it holds, and as a line in the page's messages.
//
// "degraded": the job goes on without the rank (another replica or a fallback serves its
// frames), so the session stays and frames keep coming. "restarting" / "stopping": the
// job ends because of it; the server then closes the socket with 1012 and the page
// reconnects (connection.js), to the restarted job if torchrun restarts it. A new
// session clears the banner: a job still degraded says so again at once.

const HEADLINES = { degraded: "Running degraded", restarting: "Restarting", stopping: "Stopping" };

/** The banner's headline and text for a `status` payload. */
export function statusModel({ state, message, lost }) {
  const ranks = Array.isArray(lost) ? lost.map((r) => `rank ${r.rank} (${r.role}) ${r.cause}`) : [];
  return {
    headline: HEADLINES[state] ?? String(state),
    text: String(message ?? ""),
    lost: ranks,
    level: state === "degraded" ? "warn" : "bad",
  };
}

/** The line for the page's messages: "degraded: rank 3 (generator) died; ...". */
export function statusNote(payload) {
  return `${payload.state}: ${payload.message}`;
}

export class JobBanner {
  /** @param {HTMLElement} element a `.banner` that starts hidden */
  constructor(element) {
    this.element = element;
    this.state = null;
  }

  show(payload) {
    const model = statusModel(payload);
    const headline = document.createElement("b");
    headline.textContent = `${model.headline}: `;
    this.element.replaceChildren(headline, model.text);
    this.element.className = `banner job-status job-${model.level}`;
    this.element.title = model.lost.join("\n");
    this.element.hidden = false;
    this.state = payload.state;
  }

  clear() {
    this.element.hidden = true;
    this.element.replaceChildren();
    this.state = null;
  }
}
