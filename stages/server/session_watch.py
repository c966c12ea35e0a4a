"""``SessionWatch``: the server's work over all sessions at once, on its event loop.

Two ticks, each a task of the server:

- **stats**: every ``stats_interval_s`` each page gets a ``stats`` message (the runtime's
  figures plus its own session's), on a fixed cadence so a slow tick does not push the
  next ones back;
- **slow readers**: a page that stops reading (a frozen tab, a script that only sends)
  costs rank 0 little, because TCP backpressure stops the sends and the session's queues
  are bounded, but it would hold its socket, its session slot and a blocked send forever:
  websockets' keepalive ping queues behind the same full buffer, so it never times out.
  A session whose current send has waited ``slow_reader_close_s`` is closed with 1008 and
  a reason. Its close frame waits behind the data the page did not read, so if the page
  has not taken it within ``close_timeout_s`` the connection is cut outright.

And the job's word to every page: a ``status`` when it lost a rank (to every session,
and to one that connects later while the job is degraded), and, when the job ends for
it, a 1012 close (service restart) with the reason, after that ``status`` went out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode

from stages.server import protocol
from stages.server.hooks import PipelineHooks, hook_or_none
from stages.server.limits import LimitMetrics
from stages.server.session import Session

log = logging.getLogger(__name__)


class SessionWatch:
    """Ticks over ``sessions`` (the server's own dict, event loop only)."""

    def __init__(self, sessions: dict[str, Session], hooks: PipelineHooks, limits: LimitMetrics, *,
                 close_timeout_s: float, stats_interval_s: float) -> None:
        self._sessions = sessions
        self._hooks = hooks
        self._limits = limits
        self._close_timeout_s = close_timeout_s
        self._stats_interval_s = stats_interval_s
        self._started_at = time.monotonic()
        self._closing: set[asyncio.Task[None]] = set()  # held so the loop does not drop them

    def describe(self) -> list[dict[str, Any]]:
        """Every session as its ``stats`` shows it, plus what its socket's buffer holds and
        why the server is closing it (None when it is not)."""
        return [{**s.summary(), "write_buffer_bytes": write_buffer(s.connection), "closing": s.closing_reason}
                for s in self._sessions.values()]

    async def stats_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        failing = False
        while True:
            due += self._stats_interval_s  # a fixed cadence: slow ticks do not push later ones back
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not self._sessions:
                continue
            try:
                runtime = self._hooks.stats()
                failing = False
            except Exception as e:
                if not failing:  # once per outage, not once per tick
                    log.exception("hooks.stats() failed")
                failing = True
                runtime = {"error": protocol.describe_exception(e)}
            server = {"sessions": len(self._sessions), "uptime_s": round(time.monotonic() - self._started_at, 3)}
            for session in list(self._sessions.values()):
                payload = {**runtime, "server": {**server, "session": session.summary()}}
                session.push_stats(protocol.encode_message(protocol.STATS, payload))

    async def slow_reader_loop(self, limit_s: float) -> None:
        """Close every session whose socket took nothing for ``limit_s``; checked four
        times in ``limit_s`` (at least every 250 ms), so a close comes within 1.25 x it."""
        interval = min(0.25, limit_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if session.closing_reason is None and session.stalled_s(now) >= limit_s:
                    session.closing_reason = f"slow reader: nothing could be sent for {limit_s:g} s"
                    task = asyncio.create_task(self._close_stalled(session), name=f"mm-close-{session.id}")
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)

    async def _close_stalled(self, session: Session) -> None:
        assert session.closing_reason is not None
        log.warning("closing session %s: %s (%d B waiting in its socket, %d frames dropped)", session.id,
                    session.closing_reason, write_buffer(session.connection), session.counters.frames_dropped)
        self._limits.sessions_closed.labels(reason="slow_reader").inc()
        try:
            # close() writes the close frame, then waits to drain it: forever, on this socket.
            await asyncio.wait_for(session.connection.close(CloseCode.POLICY_VIOLATION, session.closing_reason),
                                   self._close_timeout_s)
        except TimeoutError:
            session.connection.transport.abort()


    def push_status_all(self, text: str) -> None:
        for session in self._sessions.values():
            session.push_status(text)

    def push_job_status(self, session: Session) -> None:
        """A session that connects while the job is degraded hears it at once."""
        current = hook_or_none(self._hooks, "job_status")
        try:
            status = current() if current is not None else None
            if status is not None:
                session.push_status(protocol.status_message(status["state"], status["message"], status["lost"]))
        except Exception:
            log.exception("job_status() failed for session %s", session.id)

    async def close_for_restart(self, reason: str, timeout_s: float) -> None:
        """Every session closed with 1012 (service restart) and ``reason``, each after its
        waiting ``status`` went out; within ``timeout_s``, so a page that stopped reading
        cannot hold up the stop (the server's own close then cuts it)."""
        closing = [session.finish(CloseCode.SERVICE_RESTART, protocol.close_reason(reason), flush_s=timeout_s / 2)
                   for session in list(self._sessions.values())]
        if not closing:
            return
        log.info("closing %d session(s) with 1012 (service restart): %s", len(closing), reason)
        try:
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), timeout_s)
        except TimeoutError:
            log.warning("sessions did not take their 1012 close in time")


def write_buffer(connection: ServerConnection) -> int:
    """Bytes waiting in the connection's transport (on top of what the kernel took)."""
    transport = connection.transport
    return transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0
