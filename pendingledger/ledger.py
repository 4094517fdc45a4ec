"""The pending-entry ledger: reservations per order, under one ``threading.Lock``.

A reservation stands for an order that a gate admitted and whose fill has not reached the
position cache yet. While it is outstanding the gate counts it, so no other thread can be admitted
into the same room. It ends exactly once: released (exchange reject, or the fill is visible),
filled (``confirm_fill``, or reduced to zero by partial fills), or expired after the ledger's TTL.

``PendingEntryLedger`` is a thin facade: the state and the lock live in ``pendingledger._core``,
which documents what the lock guards.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from . import _units
from ._core import LedgerCore, LockBlock, PendingMap, Reservation, ReservationState
from .stats import LedgerStats

__all__ = [
    "LedgerStats",
    "PendingEntryLedger",
    "PendingMap",
    "Reservation",
    "ReservationState",
]

Clock = Callable[[], float]


class PendingEntryLedger:
    """Outstanding reservations, guarded by one ``threading.Lock``.

    ``ttl`` (seconds, finite, > 0) is how long a reservation lives if nothing ends it: the safety
    net when no fill source releases it. Until it expires the gate counts it; erring that way
    over-blocks, which is the safe failure for a risk gate. ``clock`` is a zero-argument callable
    returning seconds (``time.monotonic`` by default; tests pass a
    ``pendingledger.testing.ManualClock``); it is read before the lock is taken. ``on_expire``
    is called with each reservation that expires, in the thread that noticed, after the lock is
    released; an exception it raises is logged and swallowed.

    Expired reservations are dropped by the next decision, ``lock()`` block or write to the owned
    book (at most ``SWEEP_LIMIT`` per acquisition), so no background thread runs.
    """

    __slots__ = ("_core",)

    def __init__(
        self,
        ttl: object,
        *,
        clock: Clock = time.monotonic,
        on_expire: Callable[[Reservation], object] | None = None,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise TypeError(f"ttl must be a number of seconds, got {ttl!r}")
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be finite and > 0 seconds, got {ttl!r}")
        if not callable(clock):
            raise TypeError(
                f"clock must be a zero-argument callable returning seconds, got {clock!r}"
            )
        if on_expire is not None and not callable(on_expire):
            raise TypeError(f"on_expire must be callable or None, got {on_expire!r}")
        self._core = LedgerCore(float(ttl), clock, on_expire)

    @property
    def ttl(self) -> float:
        return self._core.ttl

    @property
    def clock(self) -> Clock:
        return self._core.clock  # type: ignore[return-value]

    @property
    def core(self) -> LedgerCore:
        """The state behind this ledger, for ``PortfolioGate`` (not for applications)."""
        return self._core

    def lock(self, timeout: object = None) -> LockBlock:
        """Hold the ledger lock for a ``with`` block and get the ``PendingMap`` view.

        Raises ``LockTimeout`` if the lock is not acquired within ``timeout`` seconds (``None``
        waits for ever), and ``ReentrantLockError`` at once if this thread already holds it. The
        block is atomic: if it raises, every change it made through the view is undone. The view
        is valid only inside the block. Keep the block short and free of I/O: every other thread
        that wants the ledger waits for it.
        """
        return self._core.lock(check_timeout(timeout))

    def release(self, symbol: object) -> bool:
        """Drop every reservation on ``symbol`` (its fill is now visible in the position cache).

        Update the position cache first and call this after, never the other way round: in the
        gap the gate would see neither the reservation nor the position. Idempotent; returns True
        if anything was released.
        """
        return self._core.release_symbol(_units.check_symbol(symbol))

    def release_order(self, order_id: object) -> bool:
        """Drop the reservation of ``order_id`` (exchange reject, or its fill is visible).

        Idempotent; returns True if it was outstanding.
        """
        return self._core.release_order(_units.check_order_id(order_id))

    def stats(self) -> LedgerStats:
        """A consistent snapshot (taken under the lock, after dropping expired reservations).

        Inside this thread's ``lock()`` block it reads the block's current state.
        """
        outstanding, reserved, kinds, released, expired = self._core.counts()
        return LedgerStats(
            outstanding=outstanding,
            gross_notional=_units.to_number(reserved, kinds),
            reserved=outstanding + released + expired,
            released=released,
            expired=expired,
        )

    def audit(self) -> list[str]:
        """Recompute every running total from the reservations and the book, under the lock.

        Returns the differences found, one line each: an empty list means the books agree.
        """
        return self._core.audit()

    def locked(self) -> bool:
        """Whether some thread holds the ledger lock right now (a hint, like ``Lock.locked``)."""
        return self._core.locked()

    def __repr__(self) -> str:
        return f"PendingEntryLedger(ttl={self.ttl!r})"


def check_timeout(timeout: object) -> float:
    """A lock timeout in seconds: ``None`` waits for ever (-1.0); else finite, >= 0."""
    if timeout is None:
        return -1.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not 0 <= timeout <= threading.TIMEOUT_MAX:
        raise ValueError(
            f"timeout must be >= 0 and at most threading.TIMEOUT_MAX seconds, got {timeout!r}"
        )
    return float(timeout)
