"""``BrokenGate``: the classic check-then-act bug, kept so the harness can prove it catches
breaches. Never use it outside tests and demos.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from pendingledger import _units, rules
from pendingledger.gate import PortfolioGate, Positions
from pendingledger.ledger import PendingEntryLedger, PendingMap
from pendingledger.limits import REASONS, Decision, Number, PortfolioLimits, denied
from pendingledger.stats import GateStats
from pendingledger.trading import STATES, Latch, Side, TradingState, side_code

if TYPE_CHECKING:
    from pendingledger._core import Reservation
    from pendingledger.protocols import Gate

__all__ = ["GAP", "BrokenGate"]

GAP: Final = 0.0001
"""Seconds ``BrokenGate`` spends between its check and its reservation (and the router of a
``release_first`` run between its release and its cache update)."""

_STATE_CODES: Final = {state: code for code, state in enumerate(STATES)}


def _sleep_the_gap() -> None:
    time.sleep(GAP)


class BrokenGate:
    """The classic check-then-act bug, kept so the harness can prove it catches breaches.

    It decides with the one rule function, ``pendingledger.rules.first_failing_rule``, on the
    same figures as ``PortfolioGate`` (signed positions plus outstanding reservations counted
    under their sides, per-symbol worst cases, gross, net, in units), but reads the trading
    state before it takes the lock, checks in one acquisition of the ledger lock and reserves
    in a second one. Between the two, other threads check against a state that does not yet
    hold this entry, so several can be admitted on the strength of the same room, and a loss
    latch that fires in the gap does not stop the entry.

    ``between`` runs in the gap; by default a 0.1 ms sleep that stands for the work a real bot
    does there (building, logging and sending the order). It does not create the bug; it makes
    it show up within seconds, where a bare ``sleep(0)`` hands the GIL over too rarely to be a
    dependable demonstration. Tests pass an event-driven ``between`` to hold the gap open for
    exactly the interleaving they want.

    Everything but ``try_enter`` is passed on to ``book``, a ``PortfolioGate`` on the same ledger
    (one is made when none is given), so a ``BrokenGate`` is a ``pendingledger.Gate``: its
    trading state, loss latch, ``record_pnl`` and ``set_equity`` are the book's; with the
    gate-owned position book, positions are read from ``book.positions()`` before the check, and
    ``set_position``/``close_position``/``confirm_fill`` go to the book. A caller's positions
    (a mapping or a callable) are read before the check too, as ``PortfolioGate`` reads them.
    ``stats()`` are the book's: they do not count the broken gate's own decisions.

    Never use this outside tests and demos.
    """

    __slots__ = ("_between", "_book", "_ledger", "_limits", "_sides")

    def __init__(
        self,
        ledger: PendingEntryLedger,
        limits: PortfolioLimits,
        *,
        book: PortfolioGate | None = None,
        between: Callable[[], object] | None = None,
    ) -> None:
        self._ledger = ledger
        self._limits = rules.unit_limits(limits)
        self._book = PortfolioGate(ledger, limits) if book is None else book
        self._between = _sleep_the_gap if between is None else between
        # The side of each reservation this gate made (a PendingMap has no per-side sums to
        # read): order id -> (side code, reservation). Read and pruned under the ledger lock.
        self._sides: dict[str, tuple[int, Reservation]] = {}

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

    def reduce_only(self) -> None:
        self._book.reduce_only()

    def resume(self) -> None:
        self._book.resume()

    def record_pnl(self, amount: Number) -> None:
        self._book.record_pnl(amount)

    def set_equity(self, equity: Number) -> None:
        self._book.set_equity(equity)

    @property
    def halted(self) -> bool:
        return self._book.halted

    @property
    def state(self) -> TradingState:
        return self._book.state

    @property
    def latch(self) -> Latch | None:
        return self._book.latch

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
        side: Side | str | None = None,
    ) -> Decision:
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        code_of_side = side_code(side)
        limits = self._limits
        state = _STATE_CODES[self._book.state]  # read outside the lock: the latch's bug
        seen = _exposures(self._book.positions() if positions is None else positions)
        with self._ledger.lock() as pending:  # first acquisition: check
            figures = self._figures(seen, positions is None, pending, name, code_of_side, units)
        code = rules.first_failing_rule(limits, state, *figures)
        reason = REASONS[code]
        if reason is not None:
            return denied(reason)
        self._between()  # the gap: another brain can check against the same room now
        with self._ledger.lock() as pending:  # second acquisition: act
            reservation = pending.reserve(name, notional, order_id=order_id, side=side)
            self._sides[reservation.order_id] = (code_of_side, reservation)
        return Decision(reservation=reservation)

    def _figures(
        self,
        exposures: dict[str, int],
        own_book: bool,
        pending: PendingMap,
        symbol: str,
        side: int,
        units: int,
    ) -> tuple[int, bool, int, int, int, int, int]:
        """``(open_count, symbol_open, gross, before, after, net_before, net_after)`` in units,
        as the rules read them: the signed ``exposures`` plus what ``pending`` holds, each
        reservation under its side (lock held). As ``PortfolioGate`` reads them, a caller's
        positions cannot vouch that a symbol not reserved is still open: it needs a slot of
        its own beside the others; the gate's own book can."""
        books: dict[str, list[int]] = {s: [p, 0, 0, 0] for s, p in exposures.items()}
        for sym in pending:
            books.setdefault(sym, [0, 0, 0, 0])[3] += _units.units(
                "reserved", pending.symbol_notional(sym), True
            )
        for oid, (code, res) in list(self._sides.items()):
            if not res.active:
                del self._sides[oid]
                continue
            left = _units.units("reserved", res.notional, True)
            book = books[res.symbol]
            book[3] -= left  # counted as of unknown side above: move it under its own side
            book[_SLOT[code]] += left
        totals = [0, 0, 0, 0]
        gross = 0
        for book in books.values():
            gross += rules.worst_case(*book)
            for i in range(4):
                totals[i] += book[i]
        here = books.get(symbol, [0, 0, 0, 0])
        before = rules.worst_case(*here)
        net_before = rules.worst_case(*totals)
        slot = _SLOT[side]
        here[slot] += units
        totals[slot] += units
        open_count = len(exposures) + pending.new_slots(exposures.__contains__)
        symbol_open = symbol in pending
        if not symbol_open and symbol in exposures:
            if own_book:
                symbol_open = True
            else:
                open_count -= 1
        return (
            open_count,
            symbol_open,
            gross,
            before,
            rules.worst_case(*here),
            net_before,
            rules.worst_case(*totals),
        )


# Where a side's pending units go in a [position, buys, sells, unknown] book.
_SLOT: Final = {rules.BUY: 1, rules.SELL: 2, rules.UNKNOWN_SIDE: 3}


def _exposures(positions: object) -> dict[str, int]:
    """Open positions (a mapping, or a callable returning one), read before the lock as
    ``PortfolioGate`` reads them: symbol -> signed exposure in units (rounded away from zero)."""
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


if TYPE_CHECKING:  # mypy proves BrokenGate offers the whole backend-neutral surface.

    def _conforms(gate: BrokenGate) -> Gate:
        return gate
