"""``BrokenGate``: the classic check-then-act bug, kept so the harness can prove it catches
breaches. Never use it outside tests and demos.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from pendingledger import _units, rules
from pendingledger.decision import Admitted, Decision, Denials
from pendingledger.gate import PortfolioGate, Positions
from pendingledger.ledger import PendingEntryLedger, PendingMap
from pendingledger.limits import Number, PortfolioLimits
from pendingledger.protocols import ReservationHandle
from pendingledger.stats import GateStats
from pendingledger.trading import STATES, Latch, Side, TradingState, side_code

if TYPE_CHECKING:
    from pendingledger.protocols import Gate

__all__ = ["GAP", "BrokenGate", "check_budgets"]

GAP: Final = 0.0001
"""Seconds ``BrokenGate`` spends between its check and its reservation (and the router of a
``release_first`` run between its release and its cache update)."""

_STATE_CODES: Final = {state: code for code, state in enumerate(STATES)}
_NONE: Final[Mapping[str, PortfolioLimits]] = MappingProxyType({})
_FREE: Final = PortfolioLimits()  # no limit at all: the broken gate's second step


def _sleep_the_gap() -> None:
    time.sleep(GAP)


def check_budgets(budgets: object) -> dict[str, PortfolioLimits]:
    """``budgets`` (a mapping of strategy name to ``PortfolioLimits``, or None) as the spec of
    ``PortfolioGate(budgets=)`` checks it: exact non-empty ``str`` names, ``PortfolioLimits``
    values that set no loss limit (those are the account's)."""
    if budgets is None:
        return {}
    if not isinstance(budgets, Mapping):
        raise TypeError(f"budgets must be a mapping of strategy name to limits, got {budgets!r}")
    checked: dict[str, PortfolioLimits] = {}
    for name, limits in list(budgets.items()):
        if type(name) is not str or not name:
            error = ValueError if isinstance(name, str) else TypeError
            raise error(f"budgets: a strategy's name must be a non-empty str, got {name!r}")
        if not isinstance(limits, PortfolioLimits):
            raise TypeError(f"budgets[{name!r}] must be a PortfolioLimits, got {limits!r}")
        if limits.has_loss_limits:
            raise ValueError(f"budgets[{name!r}]: loss limits are the account's, got {limits!r}")
        checked[name] = limits
    return checked


class _Rates:
    """The stamps of a scope's most recent admissions, as many as its rate count needs: the
    ``window_start`` of ``rules.first_failing_rule``. When a count is raised, the history kept
    so far is what counts (as the real gates keep it)."""

    __slots__ = ("stamps",)

    def __init__(self) -> None:
        self.stamps: deque[float] = deque(maxlen=1)

    def window_start(self, limits: rules.UnitLimits) -> float:
        count = limits.rate_count
        stamps = self.stamps
        if count <= rules.NO_LIMIT or len(stamps) < count:
            return rules.NO_WINDOW
        return stamps[-count]

    def admitted(self, limits: rules.UnitLimits, stamp: float) -> None:
        count = max(1, limits.rate_count)
        if self.stamps.maxlen is not None and self.stamps.maxlen < count:
            self.stamps = deque(self.stamps, maxlen=count)
        self.stamps.append(stamp)


class BrokenGate:
    """The classic check-then-act bug, kept so the harness can prove it catches breaches.

    It decides with the one rule function, ``pendingledger.rules.first_failing_rule``, on the
    same figures as ``PortfolioGate`` (signed positions plus outstanding reservations counted
    under their sides, per-symbol worst cases, gross, net, in units; the order caps: this
    order's notional, the outstanding reservations in all and on the symbol, the rate window),
    at the same scopes (a strategy's budget over its own positions and reservations, then the
    account's limits over everything), but reads the trading state before it takes the lock,
    checks in one acquisition of the ledger lock and reserves in a second one. Between the two,
    other threads check against a state that does not yet hold this entry, so several can be
    admitted on the strength of the same room, at either scope, and a loss latch that fires in
    the gap does not stop the entry.

    ``between`` runs in the gap; by default a 0.1 ms sleep that stands for the work a real bot
    does there (building, logging and sending the order). It does not create the bug; it makes
    it show up within seconds, where a bare ``sleep(0)`` hands the GIL over too rarely to be a
    dependable demonstration. Tests pass an event-driven ``between`` to hold the gap open for
    exactly the interleaving they want.

    Everything but ``try_enter`` is passed on to ``book``, a ``PortfolioGate`` on the same ledger
    (one is made when none is given), so a ``BrokenGate`` is a ``pendingledger.Gate``: its
    trading state, loss latch, ``record_pnl`` and ``set_equity`` are the book's; with the
    gate-owned position book, positions are read from ``book.positions()`` (and a strategy's
    from ``book.positions(strategy=)``) before the check, and
    ``set_position``/``close_position``/``confirm_fill`` go to the book. A caller's positions
    (a mapping or a callable) are read before the check too, as ``PortfolioGate`` reads them.
    ``stats()`` are the book's: they do not count the broken gate's own decisions.

    What this gate counts of the ledger: the notional of every outstanding reservation and
    their number (the account's ``orders``); the sides, strategies, per-symbol order counts
    and rate windows of the reservations it made itself (in the simulation, all of them). A
    strategy's order is reserved through a second ``PortfolioGate`` on the ledger with no
    limits at all, so the reservation belongs to its strategy as the real gate's would.

    Never use this outside tests and demos.
    """

    __slots__ = (
        "_account_rates",
        "_between",
        "_book",
        "_budgets",
        "_denials",
        "_ledger",
        "_limits",
        "_mine",
        "_reserver",
        "_strategy_rates",
    )

    def __init__(
        self,
        ledger: PendingEntryLedger,
        limits: PortfolioLimits,
        *,
        budgets: Mapping[str, PortfolioLimits] | None = None,
        book: PortfolioGate | None = None,
        between: Callable[[], object] | None = None,
    ) -> None:
        self._ledger = ledger
        self._limits = rules.unit_limits(limits)
        checked = check_budgets(budgets)
        self._budgets = {name: rules.unit_limits(b) for name, b in checked.items()}
        if book is None:
            book = PortfolioGate(ledger, limits, budgets=checked) if checked else None
            book = PortfolioGate(ledger, limits) if book is None else book
        self._book = book
        self._between = _sleep_the_gap if between is None else between
        self._reserver: PortfolioGate | None = None
        self._set_reserver(checked)
        self._denials = Denials()
        # The reservations this gate made: order id -> (side code, strategy or "", reservation).
        # Read and pruned under the ledger lock (a PendingMap has no per-side sums to read).
        self._mine: dict[str, tuple[int, str, ReservationHandle]] = {}
        self._account_rates = _Rates()
        self._strategy_rates: dict[str, _Rates] = {}

    def _set_reserver(self, budgets: Mapping[str, PortfolioLimits]) -> None:
        """The gate that reserves a strategy's orders without checking anything. It keeps every
        strategy it ever had: a decision that read the old budgets may still reserve."""
        if not budgets:
            return
        if self._reserver is None:
            free = dict.fromkeys(budgets, _FREE)
            self._reserver = PortfolioGate(self._ledger, _FREE, budgets=free)
        else:
            self._reserver.budgets = {**self._reserver.budgets, **dict.fromkeys(budgets, _FREE)}

    # ---------------------------------------------------------------- passed on to the book

    def set_position(self, symbol: str, exposure: Number, *, strategy: str | None = None) -> None:
        self._book.set_position(symbol, exposure, strategy=strategy)

    def close_position(self, symbol: str, *, strategy: str | None = None) -> bool:
        return self._book.close_position(symbol, strategy=strategy)

    def confirm_fill(
        self,
        order_id: str,
        position_exposure: Number,
        *,
        symbol: str | None = None,
        filled: Number | None = None,
        strategy: str | None = None,
    ) -> bool:
        return self._book.confirm_fill(
            order_id, position_exposure, symbol=symbol, filled=filled, strategy=strategy
        )

    def reduce_order(self, order_id: str, amount: Number) -> bool:
        return self._book.reduce_order(order_id, amount)

    def positions(self, *, strategy: str | None = None) -> dict[str, Number]:
        return self._book.positions(strategy=strategy)

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

    @property
    def budgets(self) -> Mapping[str, PortfolioLimits]:
        budgets = self._budgets
        if not budgets:
            return _NONE
        return MappingProxyType({name: unit.source for name, unit in budgets.items()})

    @budgets.setter
    def budgets(self, budgets: Mapping[str, PortfolioLimits] | None) -> None:
        checked = check_budgets(budgets)
        units = {name: rules.unit_limits(b) for name, b in checked.items()}
        self._set_reserver(checked)
        self._budgets = units

    # ---------------------------------------------------------------- the bug

    def try_enter(
        self,
        symbol: str,
        notional: Number,
        positions: Positions | None = None,
        *,
        order_id: str | None = None,
        side: Side | str | None = None,
        strategy: str | None = None,
    ) -> Decision:
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        code_of_side = side_code(side)
        limits, budgets = self._limits, self._budgets
        budget, scope = None, ""
        if strategy is not None:
            budget = budgets.get(strategy) if type(strategy) is str else None
            if budget is None:
                known = ", ".join(map(repr, sorted(budgets))) or "none"
                raise ValueError(f"strategy {strategy!r} has no budget (budgets: {known})")
            if positions is not None:
                raise ValueError(
                    f"strategy={strategy!r}: strategy budgets are decided on the gate's own book"
                )
            scope = strategy
        state = _STATE_CODES[self._book.state]  # read outside the lock: the latch's bug
        if state == rules.HALTED_STATE:
            return self._denials.of(rules.HALTED, None)
        seen = _exposures(self._book.positions() if positions is None else positions)
        own = _exposures(self._book.positions(strategy=scope)) if budget is not None else {}
        now = self._ledger.clock()
        order = (name, code_of_side, units)
        with self._ledger.lock() as pending:  # first acquisition: check
            account, mine = self._pending(pending, scope)
            figures = _figures(seen, positions is None, account, order)
            orders, symbol_orders = len(pending), _orders_on(account, name)
            mine_figures = _figures(own, True, mine, order) if budget is not None else None
        if budget is not None and mine_figures is not None:
            rates = self._strategy_rates.get(scope)
            window = rules.NO_WINDOW if rates is None else rates.window_start(budget)
            code = rules.first_failing_rule(
                budget, state, *mine_figures, units, _count(mine), _orders_on(mine, name),
                window, now,
            )  # fmt: skip
            if code != rules.ADMIT:
                return self._denials.of(code, scope)
        window = self._account_rates.window_start(limits)
        code = rules.first_failing_rule(
            limits, state, *figures, units, orders, symbol_orders, window, now
        )
        if code != rules.ADMIT:
            return self._denials.of(code, None)
        self._between()  # the gap: another brain can check against the same room now
        reservation = self._reserve(name, notional, order_id, side, scope)
        stamp = reservation.reserved_at
        self._account_rates.admitted(limits, stamp)
        if budget is not None:
            self._strategy_rates.setdefault(scope, _Rates()).admitted(budget, stamp)
        return Admitted(reservation)

    def _reserve(
        self,
        symbol: str,
        notional: Number,
        order_id: str | None,
        side: Side | str | None,
        strategy: str,
    ) -> ReservationHandle:
        """The second acquisition: reserve without checking (through the limit-free gate for a
        strategy's order, so the reservation is the strategy's)."""
        code = side_code(side)
        if strategy:
            assert self._reserver is not None
            decision = self._reserver.try_enter(
                symbol, notional, order_id=order_id, side=side, strategy=strategy
            )
            handle = decision.reservation
            if handle is None:  # the limit-free gate denies only on its own state
                raise RuntimeError(f"the broken gate could not reserve: {decision!r}")
            with self._ledger.lock():
                self._mine[handle.order_id] = (code, strategy, handle)
            return handle
        with self._ledger.lock() as pending:  # second acquisition: act
            reservation = pending.reserve(symbol, notional, order_id=order_id, side=side)
            self._mine[reservation.order_id] = (code, "", reservation)
        return reservation

    def _pending(self, pending: PendingMap, strategy: str) -> tuple[_Books, _Books]:
        """What is reserved (lock held), per symbol as ``[0, buys, sells, unknown, orders]``:
        for the account (every reservation; the ones this gate did not make as of unknown
        side, with no order count on their symbol) and for ``strategy`` (its own)."""
        account: _Books = {}
        for sym in pending:
            notional = pending.symbol_notional(sym)
            account[sym] = [0, 0, 0, _units.units("reserved", notional, True), 0]
        mine: _Books = {}
        for oid, (code, owner, res) in list(self._mine.items()):
            if not res.active:
                del self._mine[oid]
                continue
            left = _units.units("reserved", res.notional, True)
            book = account[res.symbol]
            book[_UNKNOWN] -= left  # counted as of unknown side above: move it under its side
            book[_SLOT[code]] += left
            book[_ORDERS] += 1
            if strategy and owner == strategy:
                own = mine.setdefault(res.symbol, [0, 0, 0, 0, 0])
                own[_SLOT[code]] += left
                own[_ORDERS] += 1
        return account, mine


# A symbol's pending in a scope: [0, pending buys, sells, unknown side, reservations].
_Books = dict[str, list[int]]
_UNKNOWN: Final = 3
_ORDERS: Final = 4
# Where a side's pending units go in a [position, buys, sells, unknown] book.
_SLOT: Final = {rules.BUY: 1, rules.SELL: 2, rules.UNKNOWN_SIDE: 3}


def _orders_on(books: _Books, symbol: str) -> int:
    book = books.get(symbol)
    return 0 if book is None else book[_ORDERS]


def _count(books: _Books) -> int:
    return sum(book[_ORDERS] for book in books.values())


def _figures(
    exposures: dict[str, int],
    own_book: bool,
    pending: _Books,
    order: tuple[str, int, int],
) -> tuple[int, bool, int, int, int, int, int]:
    """``(open_count, symbol_open, gross, before, after, net_before, net_after)`` in units, as
    the rules read them, of one scope: the signed ``exposures`` plus what ``pending`` holds,
    each under its side, with ``order`` (symbol, side code, units) added. As ``PortfolioGate``
    reads them, a caller's positions cannot vouch that a symbol not reserved is still open: it
    needs a slot of its own beside the others; the gate's own book can."""
    symbol, side, units = order
    books: dict[str, list[int]] = {s: [p, 0, 0, 0] for s, p in exposures.items()}
    for sym, held in pending.items():
        book = books.setdefault(sym, [0, 0, 0, 0])
        for i in (1, 2, 3):
            book[i] += held[i]
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
    open_count = len(books)
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
