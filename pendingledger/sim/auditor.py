"""The independent checks of a run: the true worst-case exposure against the limits, and how
each reservation ended.

``Auditor`` keeps the truth the gate must never let over a limit (signed open positions plus
orders that can still fill, per side) and checks it at every admission; ``Accounts`` records
every end of every reservation (by the router or by the TTL), so leaks and double ends show.
Internal to the simulation.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from pendingledger import rules
from pendingledger.limits import PortfolioLimits
from pendingledger.protocols import ReservationHandle
from pendingledger.sim.config import LIMIT_KINDS
from pendingledger.sim.exchange import Order

__all__ = ["Accounts", "Auditor"]

# A symbol's book: [position, pending buys, pending sells, pending of unknown side], the
# arguments of rules.worst_case.
_POS, _BUYS, _SELLS, _UNKNOWN = range(4)


def _slot(side: int) -> int:
    return _BUYS if side == rules.BUY else _SELLS if side == rules.SELL else _UNKNOWN


class Auditor:
    """The independent truth: per symbol, the signed position and what orders that can still
    fill add on each side; the figures the limits bound are ``rules.worst_case`` of it.

    Told about each event at the moment it becomes true for the gate's inputs, never later:
    fills and closes are recorded under the position cache's lock together with the cache
    change, rejects before the reservation is released. Admissions are recorded right after
    ``try_enter`` returns, before the order reaches the exchange. Every event but an admission
    can only lower a worst case (a fill moves its quantity from pending to the position, which
    never raises ``max(|p + b + u|, |p - s - u|)``), so recording an admission late can only
    make the auditor see less, never invent a breach. The simulation never changes a position
    behind the gate's back while the race runs: it closes positions with orders the gate
    admits (a close with sells pending past the position would raise the worst case).

    A breach is counted per limit, as the rule reads the limits: an admission that raised the
    figure the limit bounds (opened a symbol, raised the symbol's worst case and so the gross,
    or raised the net) to a value over the limit.
    """

    def __init__(self, limits: PortfolioLimits) -> None:
        self.lock = threading.Lock()
        self.limit_positions = limits.max_concurrent_positions
        self.limit_gross = limits.max_gross_exposure
        self.limit_symbol = limits.max_symbol_exposure
        self.limit_net = limits.max_net_exposure
        self.books: dict[str, list[int]] = {}  # only symbols with something in them
        self.totals = [0, 0, 0, 0]
        self.gross = 0
        self.max_positions = 0
        self.max_gross = 0
        self.max_symbol = 0
        self.max_net = 0
        self.breaches = 0
        self.by_limit = dict.fromkeys(LIMIT_KINDS, 0)
        self.first_breach: str | None = None
        self.reducing = 0  # admissions that raised no figure

    def admit(self, order: Order) -> bool:
        """Record an admitted order; True if it raised no figure (a reducing order)."""
        with self.lock:
            symbol = order.symbol
            book = self.books.get(symbol)
            opened = book is None
            if book is None:
                book = self.books[symbol] = [0, 0, 0, 0]
            before = rules.worst_case(*book)
            net_before = rules.worst_case(*self.totals)
            slot = _slot(order.side_code)
            book[slot] += order.notional
            self.totals[slot] += order.notional
            after = rules.worst_case(*book)
            net = rules.worst_case(*self.totals)
            self.gross += after - before
            count = len(self.books)
            self.max_positions = max(self.max_positions, count)
            self.max_gross = max(self.max_gross, self.gross)
            self.max_symbol = max(self.max_symbol, after)
            self.max_net = max(self.max_net, net)
            raised = after > before
            over: list[str] = []
            if opened and self.limit_positions is not None and count > self.limit_positions:
                over.append(f"{count} positions > {self.limit_positions}")
                self.by_limit["positions"] += 1
            if raised and self.limit_gross is not None and self.gross > self.limit_gross:
                over.append(f"gross {self.gross} > {self.limit_gross}")
                self.by_limit["gross"] += 1
            if raised and self.limit_symbol is not None and after > self.limit_symbol:
                over.append(f"{symbol} {after} > {self.limit_symbol}")
                self.by_limit["symbol"] += 1
            if net > net_before and self.limit_net is not None and net > self.limit_net:
                over.append(f"net {net} > {self.limit_net}")
                self.by_limit["net"] += 1
            if over:
                self.breaches += 1
                if self.first_breach is None:
                    self.first_breach = (
                        f"admitting {order.order_id} ({symbol} {order.side} {order.notional}): "
                        + ", ".join(over)
                    )
            reducing = not opened and not raised and net <= net_before
            if reducing:
                self.reducing += 1
            return reducing

    def fill(self, order: Order, qty: int) -> None:
        """``qty`` of an admitted order filled: it moves from pending to the position."""
        self._change(order.symbol, _slot(order.side_code), -qty, order.sign * qty)

    def reject(self, order: Order) -> None:
        """An admitted order will never fill (what is left of it leaves the books)."""
        self._change(order.symbol, _slot(order.side_code), -(order.notional - order.filled), 0)

    def close(self, symbol: str) -> None:
        """The position of ``symbol`` is gone (the run's final flattening only)."""
        with self.lock:
            book = self.books.get(symbol)
            if book is not None:
                self._apply(symbol, book, _POS, 0, -book[_POS])

    def _change(self, symbol: str, slot: int, pending: int, position: int) -> None:
        if pending == 0 and position == 0:
            return
        with self.lock:
            self._apply(symbol, self.books[symbol], slot, pending, position)

    def _apply(self, symbol: str, book: list[int], slot: int, pending: int, position: int) -> None:
        before = rules.worst_case(*book)
        book[slot] += pending
        book[_POS] += position
        self.totals[slot] += pending
        self.totals[_POS] += position
        self.gross += rules.worst_case(*book) - before
        if not any(book):
            del self.books[symbol]


class Accounts:
    """How each reservation ended, as seen by the router and by ``on_expire``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ends: dict[Hashable, list[str]] = {}
        self.unknown_expiries = 0

    def end(self, order_id: Hashable, how: str) -> None:
        with self.lock:
            self.ends.setdefault(order_id, []).append(how)

    def on_expire(self, reservation: ReservationHandle) -> None:
        self.end(reservation.order_id, "expired")
