"""The limit rules, written once: ``worst_case`` and ``first_failing_rule``.

Every gate decides with these functions: the in-process gate under its ledger lock, the broken
demonstration gate, the tests' reference model and the benchmarks' straightforward port. The
Redis server code (``pendingledger/redis/gate.lua``) is the one copy, and the conformance suite
holds it to this one.

Figures and limits are integers of units (``pendingledger._units``), positions signed (long > 0,
short < 0). Outcome, side and state codes are small ints, not Enum members, because hashing an
Enum runs Python code; ``REASONS`` (in ``decision``) maps an outcome code to its reason, and
``SIDES``/``STATES`` (in ``trading``) map the others.

The figures the limits bound, over symbols s with position p, and pending buys b, sells s and
orders of unknown side u:

* a symbol's **worst case** ``max(|p + b + u|, |p - s - u|)``: its exposure if the pending orders
  of one direction all filled (with no side given anywhere: ``|p| + u``, the side-blind figure);
* **gross**: the sum of the worst cases; **concurrent positions**: symbols open or reserved;
* **net**: ``max(|P + B + U|, |P - S - U|)`` over the sums of all symbols.

The one rule: a limit denies an order only if admitting it would *raise* the figure that limit
bounds *and* the raised figure would exceed the limit. An order that raises no figure (a sell
that reduces a long) is admitted however full the gate is; in ``REDUCING`` only such orders are.

The order caps bound the flow of orders rather than a figure of the book: one order's notional,
the outstanding reservations in all and per symbol, and the admissions in a sliding window.

Scopes: with strategy budgets (``PortfolioGate(..., budgets=)``) a decision is made at two
scopes in one critical section: ``first_failing_rule`` with the strategy's limits over the
figures of that strategy's own positions and reservations, then with the account's limits over
everything (the account's position on a symbol is the sum of its strategies' and its own). The
first failure wins, and ``Decision.scope`` says where: the strategy's name, or None.
"""

from __future__ import annotations

import operator
from typing import Final

from . import _units
from .limits import PortfolioLimits

__all__ = [
    "UnitLimits",
    "first_failing_rule",
    "loss_to_latch",
    "next_reset",
    "unit_limits",
    "uses_net",
    "worst_case",
    "worst_cases",
]

ADMIT: Final = 0
HALTED: Final = 1
REDUCING_ONLY: Final = 2
MAX_CONCURRENT_POSITIONS: Final = 3
MAX_GROSS_EXPOSURE: Final = 4
MAX_SYMBOL_EXPOSURE: Final = 5
MAX_NET_EXPOSURE: Final = 6
MAX_ORDER_NOTIONAL: Final = 7
MAX_OPEN_ORDERS: Final = 8
MAX_OPEN_ORDERS_PER_SYMBOL: Final = 9
MAX_ORDERS_PER_INTERVAL: Final = 10
BACKEND_UNAVAILABLE: Final = 11
BOOK_NOT_RESTORED: Final = 12
LOCK_TIMEOUT: Final = 13
NO_LIMIT: Final = -1
NO_WINDOW: Final = float("-inf")  # the stamp first_failing_rule gets when no window is full

# Side codes (trading.SIDES) and trading state codes (trading.STATES).
UNKNOWN_SIDE: Final = 0
BUY: Final = 1
SELL: Final = 2
ACTIVE: Final = 0
REDUCING: Final = 1
HALTED_STATE: Final = 2
# Why the loss latch fires (LATCH_REASONS names them).
NO_LATCH: Final = 0
DAILY_LOSS: Final = 1
DRAWDOWN: Final = 2
LATCH_REASONS: Final = ("", "max_daily_loss", "max_drawdown")
DAY_SECONDS: Final = 86400


class UnitLimits:
    """A ``PortfolioLimits`` in units, as the rules read it; ``NO_LIMIT`` where none is set."""

    __slots__ = (
        "caps",
        "has_gross",
        "has_net",
        "has_order",
        "has_symbol",
        "loss_kinds",
        "max_daily_loss",
        "max_drawdown",
        "max_gross",
        "max_net",
        "max_open_orders",
        "max_order",
        "max_positions",
        "max_symbol",
        "max_symbol_orders",
        "rate_count",
        "rate_seconds",
        "source",
    )

    def __init__(self, source: PortfolioLimits) -> None:
        self.source = source
        count = source.max_concurrent_positions
        # An exact int: an int subclass's comparisons would run its code under the lock.
        self.max_positions: int = NO_LIMIT if count is None else operator.index(count)
        self.max_gross: int = _limit("max_gross_exposure", source.max_gross_exposure)
        self.max_symbol: int = _limit("max_symbol_exposure", source.max_symbol_exposure)
        self.max_net: int = _limit("max_net_exposure", source.max_net_exposure)
        self.max_daily_loss: int = _limit("max_daily_loss", source.max_daily_loss)
        self.max_drawdown: int = _limit("max_drawdown", source.max_drawdown)
        # The kinds of amount the loss limits were given in: a latch reports them so.
        self.loss_kinds: int = _kind(source.max_daily_loss) | _kind(source.max_drawdown)
        self.max_order: int = _limit("max_order_notional", source.max_order_notional)
        self.max_open_orders: int = _count(source.max_open_orders)
        self.max_symbol_orders: int = _count(source.max_open_orders_per_symbol)
        rate = source.max_orders_per_interval
        # rate_count NO_LIMIT: no window; else at most rate_count admissions in rate_seconds.
        self.rate_count: int = NO_LIMIT if rate is None else operator.index(rate[0])
        self.rate_seconds: float = 0.0 if rate is None else float(rate[1])
        # An amount limit may be past a machine word (up to MAX_AMOUNT units of 1e-9 each), and
        # compiled code compares such an int through the C API: whether one is set is a bool,
        # so the rule compares a big limit once (measured in benchmarks/README.md).
        self.has_gross: bool = self.max_gross > NO_LIMIT
        self.has_symbol: bool = self.max_symbol > NO_LIMIT
        self.has_net: bool = self.max_net > NO_LIMIT
        self.has_order: bool = self.max_order > NO_LIMIT
        # Whether any order cap is set: most limits set none, and their rule skips four tests.
        self.caps: bool = (
            self.has_order
            or self.max_open_orders > NO_LIMIT
            or self.max_symbol_orders > NO_LIMIT
            or self.rate_count > NO_LIMIT
        )


def unit_limits(limits: object) -> UnitLimits:
    """``limits`` (a ``PortfolioLimits``) in units; ``TypeError`` for anything else."""
    if not isinstance(limits, PortfolioLimits):
        raise TypeError(f"limits must be a PortfolioLimits, got {limits!r}")
    return UnitLimits(limits)


def worst_case(position: int, buys: int, sells: int, unknown: int) -> int:
    """``max(|position + buys + unknown|, |position - sells - unknown|)``: the exposure if the
    pending orders of one direction all filled (per symbol, or over the sums: the net figure)."""
    up = position + buys + unknown
    down = position - sells - unknown
    if up < 0:
        up = -up
    if down < 0:
        down = -down
    return up if up > down else down


def worst_cases(
    position: int, buys: int, sells: int, unknown: int, side: int, units: int
) -> tuple[int, int]:
    """``worst_case`` before and after an order of ``units`` on ``side`` (``UNKNOWN_SIDE``:
    counted in both directions), the ends summed once: a decision needs both."""
    up = position + buys + unknown
    down = position - sells - unknown
    up_after = up if side == SELL else up + units
    down_after = down if side == BUY else down - units
    if up < 0:
        up = -up
    if down < 0:
        down = -down
    if up_after < 0:
        up_after = -up_after
    if down_after < 0:
        down_after = -down_after
    return (up if up > down else down), (up_after if up_after > down_after else down_after)


def first_failing_rule(  # noqa: PLR0911 - one return per rule, in DenyReason order
    limits: UnitLimits,
    state: int,
    open_count: int,
    symbol_open: bool,
    gross: int,
    before: int,
    after: int,
    net_before: int,
    net_after: int,
    units: int,
    orders: int,
    symbol_orders: int,
    window_start: float,
    now: float,
) -> int:
    """The first rule an order of ``units`` fails at one scope (a strategy's budget, or the
    account), or ``ADMIT``; in ``DenyReason`` order:

    1. ``HALTED`` in the ``HALTED`` state.
    2. ``REDUCING_ONLY`` in the ``REDUCING`` state, for an order that raises any figure: it
       opens a symbol (not ``symbol_open``: neither open nor reserved), raises the symbol's
       worst case (``before`` to ``after``) or the net figure (``net_before`` to
       ``net_after``).
    3. ``MAX_CONCURRENT_POSITIONS``: the order opens a symbol and the symbols open or reserved
       (``open_count``) already reach the limit.
    4. ``MAX_GROSS_EXPOSURE``: the order raises the symbol's worst case, and ``gross`` (the sum
       of the worst cases before the order) with the symbol's raised would exceed the limit.
    5. ``MAX_SYMBOL_EXPOSURE``: the order raises the symbol's worst case past the limit.
    6. ``MAX_NET_EXPOSURE``: the order raises the net figure past the limit.
    7. ``MAX_ORDER_NOTIONAL``: ``units`` exceed the limit (any order, reducing ones too).
    8. ``MAX_OPEN_ORDERS``: the scope's outstanding reservations (``orders``) reach the limit.
    9. ``MAX_OPEN_ORDERS_PER_SYMBOL``: the symbol's (``symbol_orders``) reach it.
    10. ``MAX_ORDERS_PER_INTERVAL``: ``(count, seconds)``: the scope's ``count``-th most recent
        admission was stamped at ``window_start`` (``NO_WINDOW`` if there were fewer), and
        ``now - seconds < window_start``: ``count`` admissions already lie in the sliding
        window ``(now - seconds, now]`` of the gate's monotonic clock. Denials do not count.

    A figure that lands exactly on its limit is admitted; the order caps (7 to 10) apply to
    every order, as an exchange's do, so a closing order is still one order.
    """
    if state == HALTED_STATE:
        return HALTED
    raises = after > before
    if state == REDUCING and (not symbol_open or raises or net_after > net_before):
        return REDUCING_ONLY
    if not symbol_open and NO_LIMIT < limits.max_positions <= open_count:
        return MAX_CONCURRENT_POSITIONS
    if raises:
        if limits.has_gross and gross - before + after > limits.max_gross:
            return MAX_GROSS_EXPOSURE
        if limits.has_symbol and after > limits.max_symbol:
            return MAX_SYMBOL_EXPOSURE
    if limits.has_net and net_before < net_after and net_after > limits.max_net:
        return MAX_NET_EXPOSURE
    if not limits.caps:
        return ADMIT
    if limits.has_order and units > limits.max_order:
        return MAX_ORDER_NOTIONAL
    if NO_LIMIT < limits.max_open_orders <= orders:
        return MAX_OPEN_ORDERS
    if NO_LIMIT < limits.max_symbol_orders <= symbol_orders:
        return MAX_OPEN_ORDERS_PER_SYMBOL
    if limits.rate_count > NO_LIMIT and window_start > now - limits.rate_seconds:
        return MAX_ORDERS_PER_INTERVAL
    return ADMIT


def uses_net(limits: UnitLimits, state: int) -> bool:
    """Whether ``first_failing_rule`` reads ``net_before`` and ``net_after``: only when the net
    limit is set or the state is ``REDUCING`` (a gate may pass 0 for both otherwise)."""
    return limits.has_net or state == REDUCING


def loss_to_latch(limits: UnitLimits, day_pnl: int, drawdown: int) -> int:
    """Why the loss latch fires, or ``NO_LATCH``: the day's realized P&L (``day_pnl``, signed
    units) has reached ``-max_daily_loss``, or equity has fallen ``max_drawdown`` below its peak
    (``drawdown``, units >= 0). Reaching a limit exactly latches."""
    if limits.max_daily_loss > NO_LIMIT and -day_pnl >= limits.max_daily_loss:
        return DAILY_LOSS
    if limits.max_drawdown > NO_LIMIT and drawdown >= limits.max_drawdown:
        return DRAWDOWN
    return NO_LATCH


def next_reset(now: float, offset: float) -> float:
    """The first daily reset after ``now`` (wall-clock seconds since the epoch; a reset exactly
    at ``now`` is the day's start, not its end), for resets ``offset`` seconds after midnight UTC
    (POSIX time has no leap seconds, so every UTC day is ``DAY_SECONDS`` long)."""
    days = (now - offset) // DAY_SECONDS
    return offset + (days + 1) * DAY_SECONDS


def _kind(value: object) -> int:
    return 0 if value is None else _units.kind_of(value)


def _count(value: int | None) -> int:
    return NO_LIMIT if value is None else operator.index(value)


def _limit(name: str, value: object) -> int:
    return NO_LIMIT if value is None else _units.limit_units(name, value)
