"""The clocks a simulation runs its ledger on, besides a plain callable.

``OffsetClock`` is real time that can jump forward once at the end of a run (the demo: lost
orders expire without waiting out their TTL). ``Flights`` tells the ``ManualClock`` driver how far
it may move time without expiring an order whose answer has yet to land. Internal to the
simulation.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pendingledger.sim.exchange import Order

__all__ = ["Flights", "OffsetClock"]


class OffsetClock:
    """``time.monotonic()`` plus an offset that only grows: real time for the whole race, and one
    jump forward at the end so the last lost orders expire without the demo waiting for them."""

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self._offset

    def jump(self, seconds: float) -> None:
        self._offset += max(0.0, seconds)


class Flights:
    """Which answered orders could still be hurt by a clock step (ManualClock mode only).

    ``entering`` holds, per brain inside ``try_enter``, the clock reading taken just before the
    call (the reservation it may make cannot be older); ``live`` keeps that reading for answered
    orders the router has not finished. The driver advances the clock only while every one of
    them stays younger than the TTL after the step. (Readings taken before the call are a lower
    bound of the reservation's own time, so no backend has to expose it.)
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.entering: dict[int, float] = {}
        self.live: dict[str, float] = {}

    def enter(self, brain: int) -> None:
        with self.lock:
            self.entering[brain] = self.clock()

    def leave(self, brain: int, order: Order | None) -> None:
        with self.lock:
            entered = self.entering.pop(brain)
            if order is not None and order.outcome != "lost":
                self.live[order.order_id] = entered

    def finish(self, order_id: str) -> None:
        with self.lock:
            self.live.pop(order_id, None)

    def oldest(self) -> float:
        entering, live = self.entering, self.live
        return min(min(entering.values(), default=math.inf), min(live.values(), default=math.inf))
