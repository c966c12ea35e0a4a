"""How fast frames move to a fallback when the stage they go to turns slow.

The runtime's own routing code (``stage_loop.Router`` with a ``Fallback``) between
in-process links of the pipeline's default capacity, with threads standing in for the
two stages: a camera-paced producer (``fps``) routes frames to a primary consumer that
takes ``fast_ms`` per frame and, at a known instant, ``slow_ms``; a fallback consumer
takes ``fast_ms`` throughout. Switching time = from the instant the primary turned slow
to the first frame the fallback served; the stream's output rate before and after the
switch shows that frames keep flowing at the fallback's pace. No GPU, no processes: it
isolates the routing decision (credits run out, frames divert) from everything else.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from comms.errors import ChannelClosed, ChannelTimeout
from comms.inprocess import inprocess_link
from comms.message import Kind, Message
from runtime.availability import StageAvailability
from runtime.metrics import StageMetrics
from runtime.stage_loop import Fallback, Router


@dataclass(frozen=True, slots=True)
class SwitchResult:
    switch_ms: float
    """From the primary turning slow to the fallback's first frame."""
    fps_before: float
    """Frames served per second (both consumers) before the switch."""
    fps_after: float
    """Frames served per second after the switch."""
    diverted: int
    """Frames the router sent to the fallback."""


def _consume(reader, cost_s, served: list[tuple[float, int]], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            msg = reader.recv(timeout=0.05)
        except ChannelTimeout:
            continue
        except ChannelClosed:
            return
        time.sleep(cost_s())
        served.append((time.monotonic(), msg.frame_id))


def measure_switch(*, fps: float = 20.0, fast_ms: float = 10.0, slow_ms: float = 400.0, before_s: float = 1.0,
                   after_s: float = 2.0, capacity: int = 2, wait_ms: float = 0.0) -> SwitchResult:
    """Run the scenario once (``before_s`` + ``after_s`` seconds) and measure it."""
    primary_out, primary_in = inprocess_link("primary", capacity)
    spare_out, spare_in = inprocess_link("fallback", capacity)
    stop = threading.Event()
    metrics = StageMetrics("producer")
    router = Router([primary_out], "round_robin", stop,
                    Fallback(outlets=[spare_out], stage="primary", wait_s=wait_ms / 1000.0,
                             availability=StageAvailability()), metrics)
    slow_since: list[float] = []
    primary_served: list[tuple[float, int]] = []
    spare_served: list[tuple[float, int]] = []

    def primary_cost() -> float:
        return (slow_ms if slow_since else fast_ms) / 1000.0

    consumers = [threading.Thread(target=_consume, args=(primary_in, primary_cost, primary_served, stop), daemon=True),
                 threading.Thread(target=_consume, args=(spare_in, lambda: fast_ms / 1000.0, spare_served, stop),
                                  daemon=True)]
    for thread in consumers:
        thread.start()
    start = time.monotonic()
    frame = 0
    while (now := time.monotonic()) < start + before_s + after_s:
        if not slow_since and now >= start + before_s:
            slow_since.append(now)
        router.send(Message(kind=Kind.DATA, session="bench", frame_id=frame))
        frame += 1
        time.sleep(max(0.0, start + frame / fps - time.monotonic()))
    time.sleep(fast_ms / 1000.0 * 3)
    stop.set()
    for thread in consumers:
        thread.join(2.0)

    turned = slow_since[0]
    after = [t for t, _ in spare_served if t >= turned]
    switch_ms = 1000.0 * (after[0] - turned) if after else float("nan")
    served = sorted(t for t, _ in primary_served + spare_served)
    before = sum(start <= t < turned for t in served) / before_s
    later = sum(t >= turned + 0.5 for t in served) / max(after_s - 0.5, 1e-9)
    return SwitchResult(switch_ms=switch_ms, fps_before=before, fps_after=later,
                        diverted=metrics.snapshot()["diverted"]["saturated"])
