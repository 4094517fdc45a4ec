"""``BrokenGate``: the classic check-then-act bug, kept so the harness can prove it catches
breaches. Never use it outside tests and demos.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Final

from pendingledger.gate import GateStats, PortfolioGate, Positions
from pendingledger.ledger import PendingEntryLedger
from pendingledger.limits import Decision, DenyReason, Number, PortfolioLimits

if TYPE_CHECKING:
    from pendingledger.protocols import Gate

__all__ = ["GAP", "BrokenGate"]

GAP: Final = 0.0001
"""Seconds ``BrokenGate`` spends between its check and its reservation (and the router of a
``release_first`` run between its release and its cache update)."""


class BrokenGate:
    """The classic check-then-act bug, kept so the harness can prove it catches breaches.

    It applies the same rules as ``PortfolioGate`` to the same state (open positions plus
    outstanding reservations), but checks in one acquisition of the ledger lock and reserves in a
    second one. Between the two, other threads check against a state that does not yet hold this
    entry, so several can be admitted on the strength of the same room. The 0.1 ms sleep in the
    gap stands for the work a real bot does there (building, logging and sending the order). It
    does not create the bug; it makes it show up within seconds on every CPython, where a bare
    ``sleep(0)`` hands the GIL over too rarely on 3.10 to be a dependable demonstration.

    Everything but ``try_enter`` is passed on to ``book``, a ``PortfolioGate`` on the same ledger
    (one is made when none is given), so a ``BrokenGate`` is a ``pendingledger.Gate``: with the
    gate-owned position book, positions are read from ``book.positions()`` before the check, and
    ``set_position``/``close_position``/``confirm_fill`` go to the book. ``stats()`` are the
    book's: they do not count the broken gate's own decisions.

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
        self._limits = limits
        self._book = PortfolioGate(ledger, limits) if book is None else book

    # ---------------------------------------------------------------- passed on to the book

    def set_position(self, symbol: Hashable, exposure: Number) -> None:
        self._book.set_position(symbol, exposure)

    def close_position(self, symbol: Hashable) -> bool:
        return self._book.close_position(symbol)

    def confirm_fill(
        self, order_id: Hashable, position_exposure: Number, *, symbol: Hashable | None = None
    ) -> bool:
        return self._book.confirm_fill(order_id, position_exposure, symbol=symbol)

    def positions(self) -> dict[Hashable, Number]:
        return self._book.positions()

    def release(self, symbol: Hashable) -> bool:
        return self._book.release(symbol)

    def release_order(self, order_id: Hashable) -> bool:
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
        return self._limits

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None:
        self._limits = limits

    # ---------------------------------------------------------------- the bug

    def try_enter(
        self,
        symbol: Hashable,
        notional: Number,
        positions: Positions | None = None,
        *,
        order_id: Hashable | None = None,
    ) -> Decision:
        limits = self._limits
        if self._book.halted:
            return Decision(DenyReason.HALTED)
        if positions is None:
            seen: Mapping[Any, Number] = self._book.positions()  # takes the ledger lock: before
        with self._ledger.lock() as pending:  # first acquisition: check
            if positions is not None:
                seen = positions() if callable(positions) else positions
            reason = _first_failing_rule(limits, seen, pending, symbol, notional)
        if reason is not None:
            return Decision(reason)
        time.sleep(GAP)  # the gap: another brain can check against the same room now
        with self._ledger.lock() as pending:  # second acquisition: act
            reservation = pending.reserve(symbol, notional, order_id=order_id)
        return Decision(reservation=reservation)


def _first_failing_rule(
    limits: PortfolioLimits,
    positions: Mapping[Any, Any],
    pending: Any,
    symbol: Hashable,
    notional: Number,
) -> DenyReason | None:
    max_positions = limits.max_concurrent_positions
    if (
        max_positions is not None
        and symbol not in positions
        and symbol not in pending
        and len(positions) + pending.new_slots(positions.__contains__) >= max_positions
    ):
        return DenyReason.MAX_CONCURRENT_POSITIONS
    max_gross = limits.max_gross_exposure
    if max_gross is not None:
        gross = sum(abs(v) for v in positions.values()) + pending.gross_notional() + notional
        if gross > max_gross:
            return DenyReason.MAX_GROSS_EXPOSURE
    max_symbol = limits.max_symbol_exposure
    if max_symbol is not None:
        exposure = abs(positions.get(symbol, 0)) + pending.symbol_notional(symbol) + notional
        if exposure > max_symbol:
            return DenyReason.MAX_SYMBOL_EXPOSURE
    return None


if TYPE_CHECKING:  # mypy proves BrokenGate offers the whole backend-neutral surface.

    def _conforms(gate: BrokenGate) -> Gate:
        return gate
