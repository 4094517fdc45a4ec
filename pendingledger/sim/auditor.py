"""The independent checks of a run: the true exposure against the limits, and how each
reservation ended.

``Auditor`` keeps the truth the gate must never let over a limit (open positions plus orders that
can still fill) and checks it at every admission; ``Accounts`` records every end of every
reservation (by the router or by the TTL), so leaks and double ends show. Internal to the
simulation.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from pendingledger.limits import PortfolioLimits
from pendingledger.protocols import ReservationHandle
from pendingledger.sim.config import LIMIT_KINDS
from pendingledger.sim.exchange import Order

__all__ = ["Accounts", "Auditor"]


class Auditor:
    """The independent truth: open positions + orders that can still fill, per symbol.

    Told about each event at the moment it becomes true for the gate's inputs, never later:
    fills and closes are recorded under the position cache's lock together with the cache
    change, rejects before the reservation is released. Admissions are recorded right after
    ``try_enter`` returns, before the order reaches the exchange; recording an admission late
    can only make the auditor see less, never invent a breach.
    """

    def __init__(self, limits: PortfolioLimits) -> None:
        self.lock = threading.Lock()
        self.limit_positions = limits.max_concurrent_positions
        self.limit_gross = limits.max_gross_exposure
        self.limit_symbol = limits.max_symbol_exposure
        self.exposure: dict[str, int] = {}  # position + in flight, only symbols with > 0
        self.gross = 0
        self.max_positions = 0
        self.max_gross = 0
        self.max_symbol = 0
        self.breaches = 0
        self.by_limit = dict.fromkeys(LIMIT_KINDS, 0)
        self.first_breach: str | None = None

    def admit(self, order: Order) -> None:
        with self.lock:
            symbol = order.symbol
            exposure = self.exposure.get(symbol, 0) + order.notional
            self.exposure[symbol] = exposure
            self.gross += order.notional
            count = len(self.exposure)
            self.max_positions = max(self.max_positions, count)
            self.max_gross = max(self.max_gross, self.gross)
            self.max_symbol = max(self.max_symbol, exposure)
            over: list[str] = []
            if self.limit_positions is not None and count > self.limit_positions:
                over.append(f"{count} positions > {self.limit_positions}")
                self.by_limit["positions"] += 1
            if self.limit_gross is not None and self.gross > self.limit_gross:
                over.append(f"gross {self.gross} > {self.limit_gross}")
                self.by_limit["gross"] += 1
            if self.limit_symbol is not None and exposure > self.limit_symbol:
                over.append(f"{symbol} {exposure} > {self.limit_symbol}")
                self.by_limit["symbol"] += 1
            if over:
                self.breaches += 1
                if self.first_breach is None:
                    self.first_breach = (
                        f"admitting {order.order_id} ({symbol} {order.notional}): "
                        + ", ".join(over)
                    )

    def remove(self, symbol: str, amount: int) -> None:
        """An in-flight order was rejected, or a position closed."""
        if amount == 0:
            return
        with self.lock:
            left = self.exposure[symbol] - amount
            if left:
                self.exposure[symbol] = left
            else:
                del self.exposure[symbol]
            self.gross -= amount


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
