"""Helpers for testing code that uses pendingledger, without sleeping and without lost errors.

``ManualClock`` replaces ``time.monotonic`` so TTL behaviour is tested by moving time, never by
waiting for it, and ``ManualWallClock`` replaces ``time.time`` for the gate's loss latch and its
daily reset (the Redis gate takes both from the server: ``pendingledger.redis.testing`` moves
that clock instead). ``run_concurrently`` starts worker threads together behind a barrier
and re-raises the first exception any of them hit, so a failing assertion in a thread fails the
test.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["ManualClock", "ManualWallClock", "run_concurrently"]


class ManualClock:
    """A clock that only moves when told to: ``clock()`` returns seconds, ``advance()`` moves it.

    Pass it as ``clock=`` to the ledger. Time never goes backwards: a negative step raises
    ``ValueError`` and leaves the clock where it was. Safe to read and advance from many threads.
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 0.0) -> None:
        self._now = _finite_seconds("start", start, allow_negative=True)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def now(self) -> float:
        """The current reading; the same as calling the clock."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (finite, >= 0) and return the new reading."""
        step = _finite_seconds("seconds", seconds, allow_negative=False)
        with self._lock:
            self._now += step
            return self._now

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now!r})"


class ManualWallClock(ManualClock):
    """A wall clock (seconds since the Unix epoch, UTC) that only moves when told to.

    Pass it as ``wall_clock=`` to ``PortfolioGate``: no test waits for midnight. ``start`` is a
    ``datetime`` (naive ones are taken as UTC) or seconds since the epoch; by default the start
    of 2026-01-01 UTC. ``advance_to`` moves it forward to a given moment.
    """

    __slots__ = ()

    def __init__(self, start: datetime.datetime | float = datetime.datetime(2026, 1, 1)) -> None:
        super().__init__(_epoch_seconds("start", start))

    def utc(self) -> datetime.datetime:
        """The current reading as an aware UTC ``datetime``."""
        return datetime.datetime.fromtimestamp(self(), datetime.UTC)

    def advance_to(self, when: datetime.datetime) -> float:
        """Move forward to ``when`` (not before the current reading) and return the reading."""
        return self.advance(_epoch_seconds("when", when) - self())

    def __repr__(self) -> str:
        return f"ManualWallClock({self.utc().isoformat()})"


def _epoch_seconds(name: str, value: object) -> float:
    if isinstance(value, datetime.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
        return aware.timestamp()
    return _finite_seconds(name, value, allow_negative=True)


def _finite_seconds(name: str, value: object, *, allow_negative: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if seconds < 0 and not allow_negative:
        raise ValueError(f"time can't go backwards: {name}={value!r}")
    return seconds


def run_concurrently(
    worker: Callable[..., object],
    nthreads: int,
    args: Sequence[object] = (),
    *,
    timeout: float = 30.0,
) -> None:
    """Run ``worker(index, *args)`` on ``nthreads`` threads released together by a barrier.

    Returns when all have finished. The first exception raised in any worker is re-raised here;
    a worker still running after ``timeout`` seconds raises ``TimeoutError`` (a likely deadlock).
    """
    if isinstance(nthreads, bool) or not isinstance(nthreads, int) or nthreads < 1:
        raise ValueError(f"nthreads must be a positive int, got {nthreads!r}")
    barrier = threading.Barrier(nthreads)
    errors: list[BaseException] = []
    errors_lock = threading.Lock()

    def run(index: int) -> None:
        try:
            barrier.wait()
            worker(index, *args)
        except BaseException as exc:
            with errors_lock:
                errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=run, args=(i,), name=f"worker-{i}", daemon=True)
        for i in range(nthreads)
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    if stuck:
        raise TimeoutError(f"{len(stuck)} worker(s) still running after {timeout}s (deadlock?)")
    if errors:
        raise errors[0]
