"""The independent checks of a run: the true worst-case exposure and the order flow against the
limits of every scope, and how each reservation ended.

``Auditor`` keeps the truth the gate must never let over a limit (signed open positions plus
orders that can still fill, per side; the open orders; the admissions' stamps) for the account
and for each strategy, and checks it at every admission; ``Accounts`` records every end of every
reservation (by the router or by the TTL), so leaks and double ends show. Internal to the
simulation.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Hashable, Mapping
from dataclasses import fields
from typing import Any

from pendingledger import rules
from pendingledger.limits import PortfolioLimits
from pendingledger.protocols import ReservationHandle
from pendingledger.sim.config import ACCOUNT, CAP_KINDS, LIMIT_KINDS
from pendingledger.sim.exchange import Order

__all__ = ["Accounts", "Auditor", "ScopeAudit"]

# A symbol's book: [position, pending buys, pending sells, pending of unknown side], the
# arguments of rules.worst_case.
_POS, _BUYS, _SELLS, _UNKNOWN = range(4)


def _slot(side: int) -> int:
    return _BUYS if side == rules.BUY else _SELLS if side == rules.SELL else _UNKNOWN


class ScopeAudit:
    """The truth of one scope (the account, or one strategy) and what its limits allow.

    Exposure: per symbol the signed position and the orders that can still fill, by side (a
    lost order never fills, so it is no exposure). Open orders: admitted orders not yet
    finished (rejected, or filled to the last part); a lost order is left out, as its end is
    the gate's TTL, which the auditor cannot see independently: so the count is never above
    what the gate counts. Rate: the stamps (``Reservation.reserved_at``, the ledger clock) of
    every admission, lost ones and closes included, kept sorted, since admissions are told in
    whatever order their threads get here.
    """

    def __init__(
        self, name: str, limits: PortfolioLimits, breached: set[str] | None = None
    ) -> None:
        self.name = name
        self.limits = limits
        self.books: dict[str, list[int]] = {}  # only symbols with something in them
        self.totals = [0, 0, 0, 0]
        self.gross = 0
        self.orders = 0
        self.orders_on: dict[str, int] = {}
        self.stamps: list[float] = []
        self.stamp_ids: list[str] = []
        self.peaks = dict.fromkeys(_PEAKS, 0)
        self.by_kind: dict[str, set[str]] = {kind: set() for kind in (*LIMIT_KINDS, *CAP_KINDS)}
        self.breached: set[str] = set()
        # every scope's breaching admissions, shared with the auditor
        self.all_breached: set[str] = set() if breached is None else breached
        self.first_breach: str | None = None
        rate = limits.max_orders_per_interval
        self.rate: tuple[int, float] | None = None if rate is None else (rate[0], float(rate[1]))

    # ---------------------------------------------------------------- what happened

    def admit(self, order: Order, stamp: float) -> tuple[bool, list[str]]:
        """Record an admitted order stamped ``stamp``; (whether it raised no exposure figure,
        what it took over a limit). Lock held."""
        over: list[tuple[str, str]] = []
        reducing = False
        if order.outcome != "lost":
            reducing = self._exposure(order, over)
            self._open(order, over)
        limit = self.limits.max_order_notional
        self._peak("max_order_seen", order.notional)
        if limit is not None and order.notional > limit:
            over.append(("order_notional", f"order {order.notional} > {limit}"))
        for kind, _ in over:
            self.by_kind[kind].add(order.order_id)
        if over:
            self.breached.add(order.order_id)
            self.all_breached.add(order.order_id)
        texts = [text for _, text in over]
        texts += self._stamp(order.order_id, stamp)
        if texts and self.first_breach is None:
            self.first_breach = ", ".join(texts)
        return reducing, texts

    def _exposure(self, order: Order, over: list[tuple[str, str]]) -> bool:
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
        self._peak("max_positions_seen", count)
        self._peak("max_gross_seen", self.gross)
        self._peak("max_symbol_seen", after)
        self._peak("max_net_seen", net)
        limits = self.limits
        raised = after > before
        positions = limits.max_concurrent_positions
        if opened and positions is not None and count > positions:
            over.append(("positions", f"{count} positions > {positions}"))
        gross = limits.max_gross_exposure
        if raised and gross is not None and self.gross > gross:
            over.append(("gross", f"gross {self.gross} > {gross}"))
        on_symbol = limits.max_symbol_exposure
        if raised and on_symbol is not None and after > on_symbol:
            over.append(("symbol", f"{symbol} {after} > {on_symbol}"))
        net_limit = limits.max_net_exposure
        if net > net_before and net_limit is not None and net > net_limit:
            over.append(("net", f"net {net} > {net_limit}"))
        return not opened and not raised and net <= net_before

    def _open(self, order: Order, over: list[tuple[str, str]]) -> None:
        self.orders += 1
        on_symbol = self.orders_on[order.symbol] = self.orders_on.get(order.symbol, 0) + 1
        self._peak("max_open_orders_seen", self.orders)
        self._peak("max_symbol_orders_seen", on_symbol)
        cap = self.limits.max_open_orders
        if cap is not None and self.orders > cap:
            over.append(("open_orders", f"{self.orders} open orders > {cap}"))
        cap = self.limits.max_open_orders_per_symbol
        if cap is not None and on_symbol > cap:
            over.append(("symbol_orders", f"{on_symbol} open orders on {order.symbol} > {cap}"))

    def _stamp(self, order_id: str, stamp: float) -> list[str]:
        """Add an admission's stamp; an admission breaches the rate if the ``count``-th
        admission before it (in stamp order) lies inside its window, ``stamp - seconds <``
        that stamp: as ``rules.first_failing_rule`` decides. Inserting a stamp can only fill
        windows (an admission flagged stays flagged), and changes the count-th predecessor of
        the ``count`` admissions after it and of itself only."""
        stamps, ids = self.stamps, self.stamp_ids
        at = bisect.bisect_right(stamps, stamp)
        stamps.insert(at, stamp)
        ids.insert(at, order_id)
        rate = self.rate
        seconds = rate[1] if rate is not None else 0.0
        if rate is not None:
            # the peak: most admissions in one window, over the windows ending at a stamp
            # that the new one is in
            last = bisect.bisect_right(stamps, stamp + seconds)
            for i in range(at, last):
                first = bisect.bisect_right(stamps, stamps[i] - seconds)
                self._peak("max_window_seen", i - first + 1)
        if rate is None:
            return []
        count = rate[0]
        texts: list[str] = []
        flagged = self.by_kind["rate"]
        for i in range(max(at, count), min(len(stamps), at + count + 1)):
            if ids[i] not in flagged and stamps[i - count] > stamps[i] - seconds:
                flagged.add(ids[i])
                self.breached.add(ids[i])
                self.all_breached.add(ids[i])
                texts.append(f"{count + 1} admissions within {seconds:g} s (at {ids[i]})")
        return texts

    def fill(self, order: Order, qty: int) -> None:
        """``qty`` of an admitted order filled: it moves from pending to the position (the
        order is finished when this is its last part). Lock held."""
        self._apply(order.symbol, _slot(order.side_code), -qty, order.sign * qty)
        if order.filled + qty >= order.notional:
            self._finish(order)

    def reject(self, order: Order) -> None:
        """An admitted order will never fill (what is left of it leaves the books)."""
        self._apply(order.symbol, _slot(order.side_code), -(order.notional - order.filled), 0)
        self._finish(order)

    def close(self, symbol: str) -> None:
        """The position of ``symbol`` is gone (the run's final flattening only)."""
        book = self.books.get(symbol)
        if book is not None:
            self._apply(symbol, _POS, 0, -book[_POS])

    def _finish(self, order: Order) -> None:
        self.orders -= 1
        left = self.orders_on[order.symbol] - 1
        if left:
            self.orders_on[order.symbol] = left
        else:
            del self.orders_on[order.symbol]

    def _apply(self, symbol: str, slot: int, pending: int, position: int) -> None:
        if pending == 0 and position == 0:
            return
        # A symbol may have left the account's books while its strategies' parts netted to
        # nothing: closing one part brings it back.
        book = self.books.get(symbol)
        if book is None:
            book = self.books[symbol] = [0, 0, 0, 0]
        before = rules.worst_case(*book)
        book[slot] += pending
        book[_POS] += position
        self.totals[slot] += pending
        self.totals[_POS] += position
        self.gross += rules.worst_case(*book) - before
        if not any(book):
            del self.books[symbol]

    def _peak(self, name: str, value: int) -> None:
        self.peaks[name] = max(self.peaks[name], value)

    # ---------------------------------------------------------------- figures

    def figures(self) -> dict[str, Any]:
        """The scope's limits, peaks and breaches as plain values (``SimResult.scopes``)."""
        return {
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(PortfolioLimits)},
            **self.peaks,
            "breaches": len(self.breached),
            "breaches_by_limit": {kind: len(ids) for kind, ids in self.by_kind.items()},
            "first_breach": self.first_breach,
        }


_PEAKS = (
    "max_positions_seen",
    "max_gross_seen",
    "max_symbol_seen",
    "max_net_seen",
    "max_open_orders_seen",
    "max_symbol_orders_seen",
    "max_order_seen",
    "max_window_seen",
)


class Auditor:
    """The independent truth of every scope: the account's (every order) and, with strategy
    budgets, each strategy's (its own orders and positions); see ``ScopeAudit``.

    Told about each event at the moment it becomes true for the gate's inputs, never later:
    fills and closes are recorded under the position cache's lock together with the cache
    change, rejects before the reservation is released. Admissions are recorded right after
    ``try_enter`` returns, before the order reaches the exchange. Every event but an admission
    can only lower a worst case (a fill moves its quantity from pending to the position, which
    never raises ``max(|p + b + u|, |p - s - u|)``) or an open-order count, so recording an
    admission late can only make the auditor see less, never invent a breach. The simulation
    never changes a position behind the gate's back while the race runs: it closes positions
    with orders the gate admits (a close with sells pending past the position would raise the
    worst case). The rate is judged on the admissions' own stamps (the ledger clock's reading
    the reservation was made at), so when they are told does not matter.

    A breach is counted per limit, as the rule reads the limits: an admission that raised the
    figure the limit bounds (opened a symbol, raised the symbol's worst case and so the gross,
    or raised the net) to a value over the limit; an order over the notional cap; an admission
    that made the open orders (in all, or on its symbol) more than the cap; an admission whose
    window holds more admissions than the rate allows.
    """

    def __init__(
        self, limits: PortfolioLimits, budgets: Mapping[str, PortfolioLimits] | None = None
    ) -> None:
        self.lock = threading.Lock()
        self.admitted = threading.Condition(self.lock)  # notified at every admission
        self.breached: set[str] = set()
        self.account = ScopeAudit(ACCOUNT, limits, self.breached)
        self.strategies = {
            name: ScopeAudit(name, b, self.breached) for name, b in (budgets or {}).items()
        }
        self.first_breach: str | None = None
        self.reducing = 0  # admissions that raised no figure (at the account)

    @property
    def breaches(self) -> int:
        """Admissions over some limit, at any scope."""
        return len(self.breached)

    @property
    def by_limit(self) -> dict[str, int]:
        return {kind: len(self._over(kind)) for kind in LIMIT_KINDS}

    @property
    def by_cap(self) -> dict[str, int]:
        return {kind: len(self._over(kind)) for kind in CAP_KINDS}

    def _over(self, kind: str) -> set[str]:
        ids = set(self.account.by_kind[kind])
        for scope in self.strategies.values():
            ids |= scope.by_kind[kind]
        return ids

    def scopes(self) -> list[ScopeAudit]:
        return [self.account, *self.strategies.values()]

    # account figures, as before strategies
    @property
    def max_positions(self) -> int:
        return self.account.peaks["max_positions_seen"]

    @property
    def max_gross(self) -> int:
        return self.account.peaks["max_gross_seen"]

    @property
    def max_symbol(self) -> int:
        return self.account.peaks["max_symbol_seen"]

    @property
    def max_net(self) -> int:
        return self.account.peaks["max_net_seen"]

    def admit(self, order: Order) -> bool:
        """Record an admitted order (lost ones too: they count against the order caps); True
        if it raised no exposure figure of the account (a reducing order)."""
        stamp = order.reservation.reserved_at
        with self.lock:
            texts: list[str] = []
            scope = self._scope_of(order)
            if scope is not None:
                _, over = scope.admit(order, stamp)
                texts += [f"{scope.name}: {text}" for text in over]
            reducing, over = self.account.admit(order, stamp)
            texts += [f"{ACCOUNT}: {text}" for text in over]
            if texts and self.first_breach is None:
                self.first_breach = (
                    f"admitting {order.order_id} ({order.symbol} {order.side} {order.notional}"
                    + (f" for {order.strategy}" if order.strategy else "")
                    + "): "
                    + ", ".join(texts)
                )
            if reducing and order.outcome != "lost":
                self.reducing += 1
            self.admitted.notify_all()
            return reducing

    def wait_for_admissions(self, count: int, timeout: float) -> bool:
        """Block until ``count`` admissions were recorded (False if ``timeout`` passed first)."""
        with self.admitted:
            return self.admitted.wait_for(lambda: len(self.account.stamps) >= count, timeout)

    def _scope_of(self, order: Order) -> ScopeAudit | None:
        if order.strategy is None:
            return None
        scope = self.strategies.get(order.strategy)
        if scope is None:  # no budget: audited with no limits, to count its figures
            scope = self.strategies[order.strategy] = ScopeAudit(
                order.strategy, PortfolioLimits(), self.breached
            )
        return scope

    def fill(self, order: Order, qty: int) -> None:
        """``qty`` of an admitted order filled: it moves from pending to the position."""
        with self.lock:
            for scope in self._both(order):
                scope.fill(order, qty)

    def reject(self, order: Order) -> None:
        """An admitted order will never fill (what is left of it leaves the books)."""
        with self.lock:
            for scope in self._both(order):
                scope.reject(order)

    def close(self, symbol: str, strategy: str | None = None) -> None:
        """The position of ``symbol`` (``strategy``'s part, or the whole account's) is gone
        (the run's final flattening only)."""
        with self.lock:
            if strategy is None:
                self.account.close(symbol)
                return
            scope = self.strategies.get(strategy)
            book = None if scope is None else scope.books.get(symbol)
            if scope is None or book is None or not book[_POS]:
                return
            part = book[_POS]
            scope.close(symbol)
            self.account._apply(symbol, _POS, 0, -part)

    def _both(self, order: Order) -> tuple[ScopeAudit, ...]:
        if order.strategy is None:
            return (self.account,)
        return (self.strategies[order.strategy], self.account)


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
