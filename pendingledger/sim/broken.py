"""``BrokenGate``: the classic check-then-act bug, kept so the harness can prove it catches
breaches. Never use it outside tests and demos.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from pendingledger import _units, rules
from pendingledger.gate import PortfolioGate, Positions
from pendingledger.ledger import PendingEntryLedger, PendingMap
from pendingledger.limits import REASONS, Decision, Number, PortfolioLimits, denied
from pendingledger.stats import GateStats

if TYPE_CHECKING:
    from pendingledger.protocols import Gate

__all__ = ["GAP", "BrokenGate"]

GAP: Final = 0.0001
"""Seconds ``BrokenGate`` spends between its check and its reservation (and the router of a
``release_first`` run between its release and its cache update)."""


class BrokenGate:
    """The classic check-then-act bug, kept so the harness can prove it catches breaches.

    It decides with the one rule function, ``pendingledger.rules.first_failing_rule``, on the
    same state as ``PortfolioGate`` (open positions plus outstanding reservations, in units), but
    checks in one acquisition of the ledger lock and reserves in a second one. Between the two,
    other threads check against a state that does not yet hold this entry, so several can be
    admitted on the strength of the same room. The 0.1 ms sleep in the gap stands for the work a
    real bot does there (building, logging and sending the order). It does not create the bug; it
    makes it show up within seconds, where a bare ``sleep(0)`` hands the GIL over too rarely to be
    a dependable demonstration.

    Everything but ``try_enter`` is passed on to ``book``, a ``PortfolioGate`` on the same ledger
    (one is made when none is given), so a ``BrokenGate`` is a ``pendingledger.Gate``: with the
    gate-owned position book, positions are read from ``book.positions()`` before the check, and
    ``set_position``/``close_position``/``confirm_fill`` go to the book. A caller's positions
    (a mapping or a callable) are read before the check too, as ``PortfolioGate`` reads them.
    ``stats()`` are the book's: they do not count the broken gate's own decisions.

    Never use this outside tests and demos.
    """

    __slots__ = ("_book", "_ledger", "_limits")

    def __init__(
        self,
        ledger: PendingEntryLedger,
        limits: PortfolioLimits,
        *,
        book: PortfolioGate | None = None,
    ) -> None:
        self._ledger = ledger
        self._limits = rules.unit_limits(limits)
        self._book = PortfolioGate(ledger, limits) if book is None else book

    # ---------------------------------------------------------------- passed on to the book

    def set_position(self, symbol: str, exposure: Number) -> None:
        self._book.set_position(symbol, exposure)

    def close_position(self, symbol: str) -> bool:
        return self._book.close_position(symbol)

    def confirm_fill(
        self,
        order_id: str,
        position_exposure: Number,
        *,
        symbol: str | None = None,
        filled: Number | None = None,
    ) -> bool:
        return self._book.confirm_fill(order_id, position_exposure, symbol=symbol, filled=filled)

    def reduce_order(self, order_id: str, amount: Number) -> bool:
        return self._book.reduce_order(order_id, amount)

    def positions(self) -> dict[str, Number]:
        return self._book.positions()

    def release(self, symbol: str) -> bool:
        return self._book.release(symbol)

    def release_order(self, order_id: str) -> bool:
        return self._book.release_order(order_id)

    def halt(self) -> None:
        self._book.halt()

    def resume(self) -> None:
        self._book.resume()

    @property
    def halted(self) -> bool:
        return self._book.halted

    def stats(self) -> GateStats:
        return self._book.stats()

    @property
    def limits(self) -> PortfolioLimits:
        return self._limits.source

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None:
        self._limits = rules.unit_limits(limits)

    # ---------------------------------------------------------------- the bug

    def try_enter(
        self,
        symbol: str,
        notional: Number,
        positions: Positions | None = None,
        *,
        order_id: str | None = None,
    ) -> Decision:
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        limits = self._limits
        seen = _exposures(self._book.positions() if positions is None else positions)
        with self._ledger.lock() as pending:  # first acquisition: check
            figures = _figures(seen, pending, name)
        code = rules.first_failing_rule(limits, self._book.halted, *figures, units)
        reason = REASONS[code]
        if reason is not None:
            return denied(reason)
        time.sleep(GAP)  # the gap: another brain can check against the same room now
        with self._ledger.lock() as pending:  # second acquisition: act
            reservation = pending.reserve(name, notional, order_id=order_id)
        return Decision(reservation=reservation)


def _exposures(positions: object) -> dict[str, int]:
    """Open positions (a mapping, or a callable returning one), read before the lock as
    ``PortfolioGate`` reads them: symbol -> exposure in units (rounded away from zero)."""
    if isinstance(positions, Mapping):
        book = positions
    elif callable(positions):
        book = positions()
    else:
        raise TypeError(f"positions must be a mapping or a callable returning one: {positions!r}")
    return {
        _units.check_symbol(symbol): _units.units("positions", exposure, True)
        for symbol, exposure in dict(book).items()
    }


def _figures(
    exposures: dict[str, int], pending: PendingMap, symbol: str
) -> tuple[int, bool, int, int]:
    """``(open_count, symbol_open, gross, symbol_exposure)`` in units, as the rules read them:
    the open ``exposures`` plus what ``pending`` holds (lock held)."""
    reserved = _units.units("reserved", pending.gross_notional(), True)
    reserved_here = _units.units("reserved", pending.symbol_notional(symbol), True)
    return (
        len(exposures) + pending.new_slots(exposures.__contains__),
        symbol in exposures or symbol in pending,
        sum(map(abs, exposures.values())) + reserved,
        abs(exposures.get(symbol, 0)) + reserved_here,
    )


if TYPE_CHECKING:  # mypy proves BrokenGate offers the whole backend-neutral surface.

    def _conforms(gate: BrokenGate) -> Gate:
        return gate
