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

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from . import _units, rules
from ._core import (
    BUSY,
    BY_BUDGET,
    DUPLICATE,
    RETRY,
    GateCore,
    GateCounts,
    LatchRecord,
    LedgerCore,
    Reservation,
    read_clock,
)
from ._positions import read_positions
from .budgets import Limits, check_budgets
from .decision import REASONS, Admitted, Decision, Denials, DenyReason
from .events import Decided, Listener, Listeners, StateChanged, log_change
from .ledger import PendingEntryLedger, check_timeout
from .limits import PortfolioLimits
from .rules import UnitLimits
from .stats import GateStats, ScopeStats
from .trading import STATES, Latch, TradingState, loss_state_code, reset_offset, side_code

if TYPE_CHECKING:
    from .protocols import Gate

__all__ = ["GateStats", "PortfolioGate", "Positions"]

logger = logging.getLogger("pendingledger")
_perf: Final = time.perf_counter

# Keys are Any, not str: Mapping is invariant in its key type, and a cache typed with a narrower
# or wider key must still type-check.
Positions = Mapping[Any, _units.Number] | Callable[[], Mapping[Any, _units.Number]]
"""Open positions: symbol -> signed exposure (long > 0, short < 0; a key present means open),
or a zero-argument callable returning such a mapping."""

MAX_READS: Final = 64
"""Reads of a caller's positions one decision makes at most before it is denied with
``LOCK_TIMEOUT`` (every read went stale: reservations kept ending meanwhile)."""


class PortfolioGate:
    """Portfolio limits enforced with check-and-reserve on a ``PendingEntryLedger``.

    A decision sees the open positions plus every outstanding reservation, and the entry it
    admits is reserved before any other thread can decide. The rules, first failure wins, are
    ``pendingledger.rules.first_failing_rule``: the trading state, concurrent positions, gross,
    symbol and net exposure, each on worst-case figures, each denying only an order that raises
    its figure.

    The loss latch (``record_pnl``, ``set_equity``, armed by the limits' ``max_daily_loss`` and
    ``max_drawdown``) puts the gate in ``on_loss`` (``REDUCING`` or ``HALTED``) until the next
    ``daily_reset`` (a time of day in UTC on ``wall_clock``, seconds since the epoch) or
    ``resume()``.

    ``budgets`` maps a strategy's name to its own ``PortfolioLimits``: an order made with
    ``try_enter(..., strategy=name)`` is checked, in the same critical section, against that
    budget over the strategy's own positions and reservations, then against ``limits`` over the
    whole account (``Decision.scope`` says which denied it). The account's position on a symbol
    is the sum of its strategies' (``set_position(..., strategy=)``) and its own.

    Thread-safe. Several gates on one ledger share its reservations and its owned position book,
    each with its own limits, budgets, trading state, loss latch and counters.
    """

    __slots__ = (
        "_config_lock",
        "_core",
        "_denials",
        "_ledger",
        "_limits",
        "_listeners",
        "_wall_clock",
    )

    def __init__(
        self,
        ledger: object,
        limits: object,
        *,
        budgets: object = None,
        on_loss: object = TradingState.REDUCING,
        daily_reset: object = datetime.time(0, 0),
        wall_clock: object = time.time,
    ) -> None:
        if not isinstance(ledger, PendingEntryLedger):
            raise TypeError(f"ledger must be a PendingEntryLedger, got {ledger!r}")
        if not callable(wall_clock):
            raise TypeError(f"wall_clock must be a zero-argument callable, got {wall_clock!r}")
        self._ledger = ledger
        self._limits = Limits(rules.unit_limits(limits), check_budgets(budgets))
        self._config_lock = threading.Lock()  # orders replacements of limits and budgets
        self._denials = Denials()
        self._wall_clock: Callable[[], object] = wall_clock
        self._core = GateCore(ledger.core, loss_state_code(on_loss), reset_offset(daily_reset))
        self._listeners = Listeners()

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: Listener, *, timed: object = False) -> None:
        """Call ``listener`` with every ``pendingledger.events.Event``: each decision of this
        gate (``Decided``), each end of a reservation on its ledger (``Ended``: released,
        filled, reduced to nothing, expired) and each change of its trading state or latch
        (``StateChanged``).

        The listener runs in the thread that caused the event, after the ledger lock is
        released; what it raises is logged (``pendingledger`` logger, one warning line) and
        never reaches that thread. Subscribing again is counted: the listener still hears each
        event once, until it is unsubscribed as many times. With ``timed`` the decisions are
        timed (``Decided.seconds``; otherwise None). ``TypeError`` if it is not callable.
        """
        self._listeners.add(listener, timed)
        self._ledger.core.listeners.add(listener)

    def unsubscribe(self, listener: Listener) -> bool:
        """Undo one ``subscribe(listener)``; whether there was one to undo."""
        if not self._listeners.remove(listener):
            return False
        self._ledger.core.listeners.remove(listener)
        return True

    def _announce(self) -> None:
        """Log and tell the listeners the state changes the core queued (lock released)."""
        for was, now, record in self._core.take_changes():
            latch = _latch(record)
            event = StateChanged(STATES[now], STATES[was], latch)
            log_change(event)
            self._listeners.emit(event)

    @property
    def ledger(self) -> PendingEntryLedger:
        return self._ledger

    @property
    def limits(self) -> PortfolioLimits:
        """The account's limits in force. Assign a new ``PortfolioLimits`` at any time: each
        decision reads the limits and the budgets together once, so it uses one pair as it
        was at some moment, never a mixture."""
        return self._limits.account.source

    @limits.setter
    def limits(self, limits: object) -> None:
        account = rules.unit_limits(limits)
        with self._config_lock:
            self._limits = Limits(account, self._limits.budgets)

    @property
    def budgets(self) -> Mapping[str, PortfolioLimits]:
        """Each strategy's limits (read-only). Assign a new mapping (or None: no budgets) at
        any time, as ``limits``; a strategy with no entry can no longer trade."""
        return self._limits.sources()

    @budgets.setter
    def budgets(self, budgets: object) -> None:
        checked = check_budgets(budgets)
        with self._config_lock:
            self._limits = Limits(self._limits.account, checked)

    @property
    def halted(self) -> bool:
        """Whether the gate is ``HALTED`` (by ``halt()`` or by the loss latch)."""
        return self.state is TradingState.HALTED

    @property
    def state(self) -> TradingState:
        """The trading state in force: the stricter of the operator's and the loss latch's."""
        return STATES[self._trading()[0]]

    @property
    def latch(self) -> Latch | None:
        """Why and when the loss latch fired, while it holds; None otherwise."""
        return _latch(self._trading()[1])

    def halt(self) -> None:
        """Deny every entry with ``DenyReason.HALTED`` until ``resume()``.

        Set under the ledger lock: no decision that starts after this returns is admitted.
        Outstanding reservations stay and end as usual.
        """
        self._ledger.core.refuse_reentry("halt()")
        self._core.set_operator(rules.HALTED_STATE)
        self._announce()

    def reduce_only(self) -> None:
        """Admit only orders that raise no figure a limit bounds (``DenyReason.REDUCING_ONLY``
        for the others) until ``resume()``; set under the ledger lock, as ``halt()``."""
        self._ledger.core.refuse_reentry("reduce_only()")
        self._core.set_operator(rules.REDUCING)
        self._announce()

    def resume(self) -> None:
        """Back to ``ACTIVE``: ends a ``halt()`` or ``reduce_only()``, and clears the loss latch
        with its measuring period (the day's P&L starts again from 0, the peak from the last
        equity), so the latch fires again only on new losses."""
        self._ledger.core.refuse_reentry("resume()")
        self._core.resume()
        self._announce()

    def record_pnl(self, amount: object) -> None:
        """Add ``amount`` (signed: a loss < 0) to the day's realized P&L, and latch if it has
        reached ``-limits.max_daily_loss``, in the same critical section: no decision after
        this returns is admitted on the old state. Call it with each fill's or close's P&L.

        If the wall clock fails, the amount is still counted, in the day under way and, a loss,
        in the next one too (its day is not known); a latch it fires holds until ``resume()``;
        then the error is raised."""
        units = _units.units("amount", amount, False)  # a loss counts at least as big
        kind = _units.kind_of(amount)
        self._ledger.core.refuse_reentry("record_pnl()")
        limits = self._limits.account
        try:
            wall = read_clock(self._wall_clock)
        except Exception:
            self._core.record_pnl(limits, units, kind, _NO_TIME)  # never lose a loss
            self._announce()
            raise
        self._core.record_pnl(limits, units, kind, wall)
        self._announce()

    def set_equity(self, equity: object) -> None:
        """Record the account's ``equity``, and latch if it is ``limits.max_drawdown`` or more
        below its peak since the last reset, in the same critical section (as ``record_pnl``)."""
        units = _units.units("equity", equity, False)
        kind = _units.kind_of(equity)
        self._ledger.core.refuse_reentry("set_equity()")
        limits = self._limits.account
        try:
            wall = read_clock(self._wall_clock)
        except Exception:
            self._core.set_equity(limits, units, kind, _NO_TIME)
            self._announce()
            raise
        self._core.set_equity(limits, units, kind, wall)
        self._announce()

    def stats(self) -> GateStats:
        """Counts of admitted and denied decisions (every ``DenyReason`` is a key), in all and
        per scope (``GateStats.scopes``), with the trading state and the latch as of the same
        moment."""
        if self._core.tracking:
            self._trading()  # the day may have ended: roll first
        counts = self._core.counts()
        return GateStats(
            admitted=counts.codes[rules.ADMIT],
            denied=_by_reason(counts.codes),
            state=STATES[counts.state],
            latch=_latch(counts.latch),
            scopes=MappingProxyType(_scopes(counts, self._limits.budgets)),
        )

    def _trading(self) -> tuple[int, LatchRecord | None]:
        core = self._core
        wall = _NO_TIME
        if core.tracking and self._ledger.core.own_block() is None:
            wall = read_clock(self._wall_clock)
        trading = core.trading(wall)
        self._announce()
        return trading

    # ------------------------------------------------------------------ the owned position book

    def set_position(self, symbol: object, exposure: object, *, strategy: object = None) -> None:
        """Open ``symbol`` in the gate's own position book, or update its exposure: the
        ``strategy``'s part of it (None: the account's own part).

        Used by ``try_enter(..., positions=None)``. Signed: long > 0, short < 0 (the sign tells
        a reducing order from one that adds); 0 is an open position with no exposure (it still
        holds a concurrency slot). The account's position is the sum of its parts. Updated under
        the ledger lock, so a decision sees the book and the reservations in one state.
        """
        name = _units.check_symbol(symbol)
        units = _units.units("exposure", exposure, True)
        owner = _units.check_strategy(strategy)
        kind = _units.kind_of(exposure)
        core = self._ledger.core
        core.refuse_reentry("set_position()")
        core.set_position(name, units, exposure, kind, owner)

    def close_position(self, symbol: object, *, strategy: object = None) -> bool:
        """Remove ``strategy``'s part of ``symbol`` (None: the account's own) from the owned
        book; True if it was open. The account's symbol stays open while a part is."""
        name = _units.check_symbol(symbol)
        owner = _units.check_strategy(strategy)
        core = self._ledger.core
        core.refuse_reentry("close_position()")
        return core.close_position(name, owner)

    def confirm_fill(
        self,
        order_id: object,
        position_exposure: object,
        *,
        symbol: object = None,
        filled: object = None,
        strategy: object = None,
    ) -> bool:
        """Record a fill: set its symbol's position to ``position_exposure`` and end the order's
        reservation, in one step under the lock (the safe hand-off, with no gap at all). The
        position set is the part of the reservation's strategy (``set_position``).

        With ``filled`` (a finite amount > 0, for a partial fill) the reservation is reduced by
        it instead, as ``reduce_order`` does (it ends as FILLED once nothing remains), in that
        same step: no decision sees the position without the reduction, nor the other way round.

        Returns True if the reservation was outstanding. If it already ended (expired,
        released), the position is still recorded when ``symbol`` is given, so a late fill is
        never lost (as ``strategy``'s part: None, the account's own); without ``symbol`` nothing
        changes and False is returned. A ``symbol``, or a ``strategy``, that is not the
        reservation's raises ``ValueError`` and records nothing.
        """
        oid = _units.check_order_id(order_id)
        name = "" if symbol is None else _units.check_symbol(symbol)
        units = _units.units("position_exposure", position_exposure, True)
        owner = None if strategy is None else _units.check_strategy(strategy)
        fill = _NO_FILL if filled is None else _fill_of("filled", filled)
        position = (units, position_exposure, _units.kind_of(position_exposure))
        core = self._ledger.core
        core.refuse_reentry("confirm_fill()")
        return core.confirm_fill(oid, position, name, fill, owner)

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

    def positions(self, *, strategy: object = None) -> dict[str, _units.Number]:
        """A snapshot of the owned book: symbol -> exposure. The account's (None) sums each
        symbol's parts (a position with one part comes back as it was set, a sum in the kind
        of amounts given); a ``strategy``'s is its own, as set."""
        owner = _units.check_strategy(strategy)
        core = self._ledger.core
        core.refuse_reentry("positions()")
        return core.positions(owner)  # type: ignore[return-value]

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
        side: object = None,
        strategy: object = None,
        timeout: object = None,
    ) -> Decision:
        """Check the limits and, if they pass, reserve ``notional`` on ``symbol``, atomically.

        ``positions`` is ``None`` (the default) for the gate's own book, or a mapping of each
        open symbol to its exposure, or a zero-argument callable returning one (read before the
        lock; see the module docstring). ``order_id`` is the client order id (a non-empty str);
        without one the ledger names the order. ``side`` is ``Side.BUY``, ``Side.SELL`` (or
        ``"buy"``/``"sell"``), or ``None``: an order of unknown side counts in both directions
        (the worst case). ``strategy`` names the budget the order counts against (a key of
        ``budgets``; ``None``: the account's own order), decided on the owned book. If the lock
        is not had within ``timeout`` seconds (``None``: wait for ever), the decision is denied
        with ``LOCK_TIMEOUT``.

        The returned ``Decision`` is truthy when admitted and then carries the ``Reservation``:
        release it on an exchange reject; ``confirm_fill`` it (or release it once the fill is in
        your positions); otherwise it expires after the ledger's TTL.

        Bad arguments raise ``ValueError``/``TypeError`` and change nothing; so does an
        ``order_id`` that already has an outstanding reservation, and so does a NaN exposure in
        ``positions`` (fail closed), and so does a ``strategy`` with no budget (a typo must not
        trade without limits) or with ``positions`` given (a caller's positions carry no
        strategy). An exception from a ``positions`` callable propagates with nothing reserved.
        """
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        ledger = self._ledger.core
        oid = ledger.check_new_order_id(order_id)
        code_of_side = side_code(side)
        wait = -1.0 if timeout is None else check_timeout(timeout)
        limits = self._limits  # the account's and the budgets, read once: one consistent pair
        owner = ""
        budget = None
        if strategy is not None:
            owner, budget = limits.budget_of(strategy, positions)
        ledger.refuse_reentry("try_enter()")
        res = Reservation(ledger, name, oid, notional, units, code_of_side, owner)
        listeners = self._listeners
        listening = bool(listeners.active)
        start = _perf() if listening and listeners.timing else -1.0
        code = self._decide(positions, ledger, res, limits.account, budget, wait)
        if code == rules.ADMIT:
            decision: Decision = Admitted(res)
        elif code == DUPLICATE:
            raise ValueError(f"order_id {oid!r} already has an outstanding reservation")
        else:
            decision = self._denied(code, owner, name, notional)
        self._announce()
        if listening:
            seconds = None if start < 0 else _perf() - start
            event = Decided(decision, res, seconds)
            self._listeners.emit(event)
        return decision

    def _denied(self, code: int, owner: str, symbol: str, notional: object) -> Decision:
        if code > BY_BUDGET:
            decision = self._denials.of(code - BY_BUDGET, owner)
        else:
            decision = self._denials.of(code, None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("denied %s %r on %r", decision.reason, notional, symbol)
        return decision

    def _decide(
        self,
        positions: object,
        ledger: LedgerCore,
        res: Reservation,
        limits: UnitLimits,
        budget: UnitLimits | None,
        wait: float,
    ) -> int:
        """Decide, waiting for a busy lock and reading a caller's positions again while a read
        goes stale (see the module docstring); ``LOCK_TIMEOUT`` past ``wait`` or ``MAX_READS``."""
        deadline = time.monotonic() + wait if wait > 0 else 0.0
        reads = 0
        core = self._core
        while True:
            snapshot = None
            if positions is not None:
                epoch = ledger.epoch  # before the sided symbols: see LedgerCore.epoch
                snapshot = read_positions(positions, res.symbol, epoch, ledger.sided_symbols())
            # The wall clock only matters to a latch, which it may clear (a new day).
            wall = read_clock(self._wall_clock) if core.latched else -_INF
            code = core.try_decide(res, limits, budget, ledger.now(), wall, snapshot)
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
            self._core.count_timeout(res)
            return rules.LOCK_TIMEOUT


_INF: Final = float("inf")
_NO_TIME: Final = -_INF  # the wall clock was not read (or failed): no new day begins
_NO_FILL: Final = (0, 0, 0)  # confirm_fill without filled=: the reservation ends whole


def _by_reason(codes: list[int]) -> MappingProxyType[DenyReason, int]:
    return MappingProxyType({reason: codes[code] for code, reason in enumerate(REASONS) if reason})


def _scopes(counts: GateCounts, budgets: Mapping[str, UnitLimits]) -> dict[str | None, ScopeStats]:
    """``GateStats.scopes``: each strategy's counts, and the account's own (the rest)."""
    scopes: dict[str | None, ScopeStats] = {}
    own = list(counts.codes)
    own_orders = counts.orders
    for name in sorted(budgets.keys() | counts.by_strategy.keys() | counts.orders_by.keys()):
        codes = counts.by_strategy.get(name, _NO_COUNTS)
        orders = counts.orders_by.get(name, 0)
        own = [mine - theirs for mine, theirs in zip(own, codes, strict=True)]
        own_orders -= orders
        scopes[name] = ScopeStats(codes[rules.ADMIT], _by_reason(codes), orders)
    scopes[None] = ScopeStats(own[rules.ADMIT], _by_reason(own), own_orders)
    return scopes


_NO_COUNTS: Final = [0] * len(REASONS)


def _latch(record: LatchRecord | None) -> Latch | None:
    if record is None:
        return None
    return Latch(
        state=STATES[record.state],
        reason=rules.LATCH_REASONS[record.code],
        limit=_units.to_number(record.limit, record.kinds),
        value=_units.to_number(record.value, record.kinds),
        at=record.at,
        until=record.until,
    )


def _fill_of(name: str, amount: object) -> tuple[int, int, int]:
    """A partial fill as ``(down, up, kind)`` for the core, all read before its lock (the kind
    check may run a caller's ABC code)."""
    down, up = _units.reduction_units(name, amount)
    return down, up, _units.kind_of(amount)


if TYPE_CHECKING:  # mypy proves PortfolioGate offers the whole backend-neutral surface.

    def _conforms(gate: PortfolioGate) -> Gate:
        return gate
