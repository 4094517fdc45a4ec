"""The portfolio gate: check-and-reserve against open positions plus outstanding reservations.

``PortfolioGate.try_enter`` decides and, when it admits, reserves in the same critical section of
the ledger lock, so no other thread can be admitted on the strength of the same room. The gate is
a thin facade: arguments are validated and turned into units here, the rules live in
``pendingledger.rules``, and the critical section in ``pendingledger._core``.

Where positions come from:

* the gate's **owned book** (``positions=None``, kept by ``set_position``/``confirm_fill``) is
  read under the lock from running totals: the fastest way, and the same API as the Redis gate;
* a caller's **mapping**, or a zero-argument **callable** returning one, is read *before* the
  lock (``pendingledger._positions``), and the decision commits only if no reservation ended or
  shrank meanwhile; otherwise it reads again (a callable is then called again). A symbol open in
  the read but not reserved may have closed since: it needs a slot of its own
  (``pendingledger._core`` explains both).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from . import _units, rules
from ._core import BUSY, DUPLICATE, RETRY, GateCore, LedgerCore, Reservation
from ._positions import read_positions
from .decision import DENIED, REASONS, Decision
from .ledger import PendingEntryLedger, check_timeout
from .limits import PortfolioLimits
from .rules import UnitLimits
from .stats import GateStats

if TYPE_CHECKING:
    from .protocols import Gate

__all__ = ["GateStats", "PortfolioGate", "Positions"]

# Keys are Any, not str: Mapping is invariant in its key type, and a cache typed with a narrower
# or wider key must still type-check.
Positions = Mapping[Any, _units.Number] | Callable[[], Mapping[Any, _units.Number]]
"""Open positions: symbol -> exposure (its absolute value counts; a key present means open),
or a zero-argument callable returning such a mapping."""

MAX_READS: Final = 64
"""Reads of a caller's positions one decision makes at most before it is denied with
``LOCK_TIMEOUT`` (every read went stale: reservations kept ending meanwhile)."""


class PortfolioGate:
    """Portfolio limits enforced with check-and-reserve on a ``PendingEntryLedger``.

    A decision sees the open positions plus every outstanding reservation, and the entry it
    admits is reserved before any other thread can decide. The rules, first failure wins, are
    ``pendingledger.rules.first_failing_rule``: halted, concurrent positions, gross exposure,
    symbol exposure.

    Thread-safe. Several gates on one ledger share its reservations and its owned position book,
    each with its own limits, halt flag and counters.
    """

    __slots__ = ("_core", "_ledger", "_limits")

    def __init__(self, ledger: object, limits: object) -> None:
        if not isinstance(ledger, PendingEntryLedger):
            raise TypeError(f"ledger must be a PendingEntryLedger, got {ledger!r}")
        self._ledger = ledger
        self._limits = rules.unit_limits(limits)
        self._core = GateCore(ledger.core)

    @property
    def ledger(self) -> PendingEntryLedger:
        return self._ledger

    @property
    def limits(self) -> PortfolioLimits:
        """The limits in force. Assign a new ``PortfolioLimits`` at any time: each decision reads
        the attribute once, so it uses either the old set or the new one, never a mixture."""
        return self._limits.source

    @limits.setter
    def limits(self, limits: object) -> None:
        self._limits = rules.unit_limits(limits)

    @property
    def halted(self) -> bool:
        return self._core.halted

    def halt(self) -> None:
        """Deny every entry with ``DenyReason.HALTED`` until ``resume()``.

        Set under the ledger lock: no decision that starts after this returns is admitted.
        Outstanding reservations stay and end as usual.
        """
        self._ledger.core.refuse_reentry("halt()")
        self._core.set_halted(True)

    def resume(self) -> None:
        self._ledger.core.refuse_reentry("resume()")
        self._core.set_halted(False)

    def stats(self) -> GateStats:
        """Counts of admitted and denied decisions (every ``DenyReason`` is a key)."""
        counts = self._core.counts()
        denied = {reason: counts[code] for code, reason in enumerate(REASONS) if reason}
        return GateStats(admitted=counts[rules.ADMIT], denied=MappingProxyType(denied))

    # ------------------------------------------------------------------ the owned position book

    def set_position(self, symbol: object, exposure: object) -> None:
        """Open ``symbol`` in the gate's own position book, or update its exposure.

        Used by ``try_enter(..., positions=None)``. The absolute value counts; 0 is an open
        position with no exposure (it still holds a concurrency slot). Updated under the ledger
        lock, so a decision sees the book and the reservations in one state.
        """
        name = _units.check_symbol(symbol)
        units = _units.units("exposure", exposure, True)
        core = self._ledger.core
        core.refuse_reentry("set_position()")
        core.set_position(name, units, exposure)

    def close_position(self, symbol: object) -> bool:
        """Remove ``symbol`` from the owned book; True if it was open."""
        name = _units.check_symbol(symbol)
        core = self._ledger.core
        core.refuse_reentry("close_position()")
        return core.close_position(name)

    def confirm_fill(
        self,
        order_id: object,
        position_exposure: object,
        *,
        symbol: object = None,
        filled: object = None,
    ) -> bool:
        """Record a fill: set its symbol's position to ``position_exposure`` and end the order's
        reservation, in one step under the lock (the safe hand-off, with no gap at all).

        With ``filled`` (a finite amount > 0, for a partial fill) the reservation is reduced by
        it instead, as ``reduce_order`` does (it ends as FILLED once nothing remains), in that
        same step: no decision sees the position without the reduction, nor the other way round.

        Returns True if the reservation was outstanding. If it already ended (expired,
        released), the position is still recorded when ``symbol`` is given, so a late fill is
        never lost; without ``symbol`` nothing changes and False is returned. A ``symbol`` that
        is not the reservation's raises ``ValueError`` and records nothing.
        """
        oid = _units.check_order_id(order_id)
        name = "" if symbol is None else _units.check_symbol(symbol)
        units = _units.units("position_exposure", position_exposure, True)
        fill = _NO_FILL if filled is None else _fill_of("filled", filled)
        core = self._ledger.core
        core.refuse_reentry("confirm_fill()")
        return core.confirm_fill(oid, units, position_exposure, name, fill)

    def reduce_order(self, order_id: object, amount: object) -> bool:
        """Reduce the reservation of ``order_id`` by ``amount`` (a partial fill), as
        ``Reservation.reduce`` does: an ``amount`` at least what remains ends it as FILLED.

        For a fill router that keeps order ids, not ``Reservation`` objects. Returns True if the
        reservation was outstanding, False if not (ended, or never made). ``amount`` must be a
        finite number > 0. Inside this thread's ``lock()`` block it acts through that block.
        """
        oid = _units.check_order_id(order_id)
        down, up, kind = _fill_of("amount", amount)
        return self._ledger.core.reduce_order(oid, down, up, kind)

    def positions(self) -> dict[str, _units.Number]:
        """A snapshot of the owned book: symbol -> exposure as it was set."""
        core = self._ledger.core
        core.refuse_reentry("positions()")
        return core.positions()  # type: ignore[return-value]

    def release(self, symbol: object) -> bool:
        """``ledger.release(symbol)``: drop every reservation on ``symbol``."""
        return self._ledger.release(symbol)

    def release_order(self, order_id: object) -> bool:
        """``ledger.release_order(order_id)``: drop that order's reservation."""
        return self._ledger.release_order(order_id)

    # ------------------------------------------------------------------ the decision

    def try_enter(
        self,
        symbol: object,
        notional: object,
        positions: object = None,
        *,
        order_id: object = None,
        timeout: object = None,
    ) -> Decision:
        """Check the limits and, if they pass, reserve ``notional`` on ``symbol``, atomically.

        ``positions`` is ``None`` (the default) for the gate's own book, or a mapping of each
        open symbol to its exposure, or a zero-argument callable returning one (read before the
        lock; see the module docstring). ``order_id`` is the client order id (a non-empty str);
        without one the ledger names the order. If the lock is not had within ``timeout``
        seconds (``None``: wait for ever), the decision is denied with ``LOCK_TIMEOUT``.

        The returned ``Decision`` is truthy when admitted and then carries the ``Reservation``:
        release it on an exchange reject; ``confirm_fill`` it (or release it once the fill is in
        your positions); otherwise it expires after the ledger's TTL.

        Bad arguments raise ``ValueError``/``TypeError`` and change nothing; so does an
        ``order_id`` that already has an outstanding reservation, and so does a NaN exposure in
        ``positions`` (fail closed). An exception from a ``positions`` callable propagates with
        nothing reserved.
        """
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        ledger = self._ledger.core
        oid = ledger.check_new_order_id(order_id)
        wait = -1.0 if timeout is None else check_timeout(timeout)
        limits = self._limits
        ledger.refuse_reentry("try_enter()")
        res = Reservation(ledger, name, oid, notional, units)
        code = self._decide(positions, ledger, res, limits, wait)
        if code == rules.ADMIT:
            return Decision(None, res)
        if code == DUPLICATE:
            raise ValueError(f"order_id {oid!r} already has an outstanding reservation")
        return DENIED[code - 1]

    def _decide(
        self,
        positions: object,
        ledger: LedgerCore,
        res: Reservation,
        limits: UnitLimits,
        wait: float,
    ) -> int:
        """Decide, waiting for a busy lock and reading a caller's positions again while a read
        goes stale (see the module docstring); ``LOCK_TIMEOUT`` past ``wait`` or ``MAX_READS``."""
        deadline = time.monotonic() + wait if wait > 0 else 0.0
        reads = 0
        while True:
            snapshot = None
            if positions is not None:
                snapshot = read_positions(positions, res.symbol, ledger.epoch)
            code = self._core.try_decide(res, limits, ledger.now(), snapshot)
            if code == BUSY:
                left = wait if wait <= 0 else max(0.0, deadline - time.monotonic())
                if ledger.wait_free(left):
                    continue
            elif code != RETRY:
                return code
            else:
                reads += 1
                if reads < MAX_READS:
                    continue
            self._core.count_timeout()
            return rules.LOCK_TIMEOUT


_NO_FILL: Final = (0, 0, 0)  # confirm_fill without filled=: the reservation ends whole


def _fill_of(name: str, amount: object) -> tuple[int, int, int]:
    """A partial fill as ``(down, up, kind)`` for the core, all read before its lock (the kind
    check may run a caller's ABC code)."""
    down, up = _units.reduction_units(name, amount)
    return down, up, _units.kind_of(amount)


if TYPE_CHECKING:  # mypy proves PortfolioGate offers the whole backend-neutral surface.

    def _conforms(gate: PortfolioGate) -> Gate:
        return gate
