"""One process's part of the job, from start to orderly stop: the lifecycle only.

``RankRuntime`` composes its rank's part of the plan (``runtime.compose``), opens the
links (collective across ranks), has ``runtime.assemble`` build the pieces, and then
starts, watches and stops them. The same code runs a single process (world size 1,
every link in-process) and any torchrun layout.

Start order: links; the control plane (so a failure during setup reaches every rank);
the web server on the server rank (a port already in use fails before any model
loads); the stage runners' setup; heartbeats; then the server rank waits for every
rank to report ready. Stop order (``close``): the web server, the stop message to every
rank, this rank's leaving notice, the inbox, the runners; then links: writers close
(END), readers drain to their END and close (CLOSED), every end is joined before the
process group goes.

A worker rank lost while the job runs need not end it (``runtime.rank_loss``): the
server rank's hub decides, from the plan, whether the job goes on degraded or fails.
When the job stops after a failure or a loss, the pages are closed with 1012 (service
restart) and the reason, so they reconnect to the job torchrun restarts.
"""

from __future__ import annotations

import errno
import logging
import time

from comms.channel import ChannelReader
from comms.errors import ChannelTimeout, TransportError
from comms.link_spec import LinkSpec
from comms.links import LinkEnds, create_links
from runtime.assemble import RankPieces, assemble, assemble_runners
from runtime.compose import compose
from runtime.config import JobConfig
from runtime.control import stop_message
from runtime.lifecycle import JobFailed, Lifecycle
from runtime.live_view import LiveView
from runtime.planner import Link, LinkKind, Plan
from runtime.rank_loss import Hosting, Restarts

log = logging.getLogger(__name__)

FAILED_SHUTDOWN_S = 2.0
"""After a failure a peer may be dead or frozen and never send END: wait this long at most."""


class RankRuntime:
    def __init__(self, config: JobConfig, plan: Plan, rank: int, restarts: Restarts = Restarts()) -> None:
        self.config = config
        self.plan = plan
        self.restarts = restarts
        """Whether torchrun restarts a failed job (``Restarts.from_environment``), for the pages."""
        self.part = compose(plan, rank, config)
        self.lifecycle = Lifecycle()
        self.live = LiveView(1, config.runtime)
        self.links: LinkEnds | None = None
        self.pieces: RankPieces | None = None
        self.url: str | None = None
        """The page's address, once the server rank is ready."""
        self._signalled: str | None = None

    @property
    def failure(self) -> str | None:
        return self.lifecycle.failure

    # -- starting --------------------------------------------------------------------

    def start(self) -> None:
        """Open the links and start everything; returns when this rank (and, on the server
        rank, every rank) is ready. Raises ``JobFailed`` if the job failed meanwhile."""
        # Every cross-rank link on every rank (setting them up is collective), and the
        # in-process links of this rank only.
        self.links = create_links([_spec(link) for link in self.plan.links
                                   if not link.local or link.src_rank == self.part.rank], self.config.transport)
        self.pieces = pieces = assemble(self.part, self.config, self.links, self.live, self.lifecycle, self.health,
                                        hosting=Hosting.of(self.plan, self.config.pipeline), restarts=self.restarts)
        for side in (pieces.hub, pieces.client):
            if side is not None:
                side.start()
        if pieces.front is not None:
            self._start_server()
        pieces.runners = assemble_runners(self.part, self.config, self.links, pieces, self.live, self.lifecycle)
        deadline = time.monotonic() + self.config.transport.init_timeout_s
        for runner in pieces.runners:
            runner.start()
        for runner in pieces.runners:
            if not runner.ready.wait(max(0.0, deadline - time.monotonic())):
                self.lifecycle.fail(f"stage {runner.name} did not finish setup in "
                                    f"{self.config.transport.init_timeout_s} s")
        self._raise_if_failed()
        if pieces.client is not None:
            pieces.client.report_ready()
        if pieces.hub is not None:
            self._wait_for_ranks(deadline)
        if pieces.front is not None:
            self.url = pieces.front.server.url
            log.info("pipeline %r ready on %d rank(s); open %s", self.plan.pipeline, self.plan.world_size, self.url)

    def _start_server(self) -> None:
        server, config = self.pieces.front.server, self.config.server
        try:
            server.start()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                self.lifecycle.fail(f"port {config.port} on {config.host} is already in use by another program: "
                                    f"stop it, or choose a free port with --port (e.g. --port {config.port + 1})")
            else:
                self.lifecycle.fail(f"cannot serve on {config.host}:{config.port}: {e.strerror or e}")
        except TimeoutError as e:
            self.lifecycle.fail(str(e))
        self._raise_if_failed()

    def _wait_for_ranks(self, deadline: float) -> None:
        hub = self.pieces.hub
        while not hub.all_reported.wait(0.2):
            if self.lifecycle.stopping.is_set():
                break  # a rank already said why it cannot start
            if time.monotonic() > deadline:
                missing = [hub.describe(r) for r in hub.unreported()]
                self.lifecycle.fail(f"not ready in {self.config.transport.init_timeout_s} s: {', '.join(missing)}")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.lifecycle.failure is not None:
            raise JobFailed(self.lifecycle.failure)

    # -- running ---------------------------------------------------------------------

    def note_signal(self, name: str) -> None:
        """For signal handlers: only records the signal. Stopping takes locks, and a
        handler runs on the main thread, which may hold one of them at that moment."""
        self._signalled = name

    def wait(self) -> None:
        """Until the job stops: a signal, a stop from another rank, or a failure."""
        while not self.lifecycle.stopping.wait(0.1):
            if self._signalled:
                self.lifecycle.request_stop(self._signalled)

    def fail(self, reason: str) -> None:
        self.lifecycle.fail(reason)

    def health(self) -> dict:
        """What ``GET /health`` shows (asked only once the web server runs, after assembly)."""
        liveness = self.pieces.liveness()
        ranks = [{"rank": a.rank, "role": a.role, "node": a.node, "device": a.device,
                  "alive": liveness.get(a.rank, (False, 0.0))[0],
                  "last_seen_s": round(liveness.get(a.rank, (False, 0.0))[1], 2)}
                 for a in self.plan.ranks]
        return {"ok": self.failure is None and all(r["alive"] for r in ranks),
                "pipeline": self.plan.pipeline, "world_size": self.plan.world_size,
                "revision": self.live.get().revision, "failure": self.failure,
                "lost": list(self.lifecycle.losses), "ranks": ranks}

    # -- stopping --------------------------------------------------------------------

    def close(self) -> None:
        """Orderly stop: no new frames, every rank told, stages end, links end (END),
        inbound links drained, every link end joined. Bounded by ``shutdown_budget``."""
        self.lifecycle.request_stop("shutting down")
        deadline = time.monotonic() + self.shutdown_budget()
        pieces = self.pieces
        if pieces is not None:
            self._stop_pieces(pieces, deadline)
        if self.links is not None:
            self._close_links(deadline)
        failure = self.lifecycle.failure
        log.info("stopped%s", " after a failure" if failure else "")

    def _stop_pieces(self, pieces: RankPieces, deadline: float) -> None:
        if pieces.front is not None:
            pieces.front.server.stop(restart_reason=self._restart_reason())
        if pieces.hub is not None:
            pieces.hub.broadcast(stop_message(self.lifecycle.reason, failed=self.failure is not None))
            if not pieces.hub.flush(max(0.1, deadline - time.monotonic())):
                log.warning("the stop message did not reach every rank in time")
        if pieces.client is not None:
            pieces.client.leave(self.lifecycle.reason, failed=self.failure is not None)
        if pieces.front is not None and pieces.front.inbox is not None:
            pieces.front.inbox.close()
        for runner in pieces.runners:
            if not runner.join(max(0.1, deadline - time.monotonic())):
                log.warning("stage %s did not stop in time", runner.name)

    def _close_links(self, deadline: float) -> None:
        links = self.links
        for writer in links.writers.values():
            writer.close()  # END follows every message already sent
        control = {link.name for link in self.part.links if link.kind is not LinkKind.DATA}
        for name, reader in links.readers.items():
            # Control links are drained by the control plane's own listeners.
            if name not in control:
                _drain(reader, deadline)
        for reader in links.readers.values():
            # CLOSED: a writer whose END nobody will read (a listener that already
            # returned, a link not drained in time) is finished without waiting.
            reader.close()
        for end in [*links.writers.values(), *links.readers.values()]:
            # A torch end's threads must be done before the process group they use goes.
            if not end.join(max(0.0, deadline - time.monotonic())):
                log.debug("link %s: not finished by the shutdown deadline", end.name)

    def _restart_reason(self) -> str | None:
        """Why the pages should reconnect (they are closed with 1012), or None for a plain
        stop (1001): the job ends because of a lost rank, after a failure, or while it
        runs degraded (under torchrun, the stop that restarts the workers)."""
        told = self.pieces.front.status.current() if self.pieces and self.pieces.front else None
        if told is not None and told["state"] != "degraded":
            return told["message"]  # what the pages were just told: the job ends for a lost rank
        if self.failure is not None:
            return "the job failed (its log says why); reconnect once it is restarted"
        if told is not None:
            return f"the job is stopping ({self.lifecycle.reason}) while degraded: {told['message']}"
        return None

    def shutdown_budget(self) -> float:
        """Seconds an orderly stop may take: shorter after a failure or a lost rank, when a
        peer may never answer."""
        budget = self.config.control.shutdown_timeout_s
        if self.failure is None and not self.lifecycle.degraded:
            return budget
        return min(budget, FAILED_SHUTDOWN_S)


def _spec(link: Link) -> LinkSpec:
    return LinkSpec(name=link.name, src_rank=link.src_rank, dst_rank=link.dst_rank, transport=link.transport,
                    backend=link.backend, src_device=link.src_device, dst_device=link.dst_device)


def _drain(reader: ChannelReader, deadline: float) -> None:
    """Consume what is left on an inbound link until its sender's END (bounded)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("link %s: no END from its sender before the shutdown deadline", reader.name)
            return
        try:
            reader.recv(timeout=min(remaining, 0.5))
        except ChannelTimeout:
            continue
        except TransportError:  # ChannelClosed (END) or a broken link: nothing more comes
            return
