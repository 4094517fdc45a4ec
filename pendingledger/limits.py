"""What a gate enforces: ``PortfolioLimits``; and, from ``decision``, what it answers.

These are plain values shared by every gate backend (in-process and Redis), so a bot can switch
backend without touching the code that reads decisions.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from . import _units
from .decision import DENIED, REASONS, Decision, DenyReason, denied

__all__ = ["DENIED", "REASONS", "Decision", "DenyReason", "PortfolioLimits", "denied"]

Number = int | float | Decimal | Fraction

MAX_RATE_COUNT = 1_000_000_000
"""The largest count of ``max_orders_per_interval``: a gate keeps that many admission stamps."""


@dataclass(frozen=True, slots=True)
class PortfolioLimits:
    """The portfolio-wide limits a gate enforces. ``None`` means no limit.

    ``max_concurrent_positions=0`` means no new position may open (entries on symbols already open
    in the gate's own book, or already reserved, still pass this rule; a caller's positions, read
    before the lock, cannot vouch that a symbol is still open). Exposure limits compare with
    ``>``: an entry that lands exactly on the limit is admitted. Limits are validated here, once,
    so a gate never meets a NaN or negative limit at decision time; exposure limits count in
    units of ``1e-9`` rounded down (``pendingledger._units``).

    Exposures are worst cases (``pendingledger.rules``): a symbol's is what it would be if its
    pending orders of one direction all filled, and ``max_net_exposure`` bounds the same figure
    over the whole book. A limit only denies an order that would raise its figure, so a reducing
    order passes however full the gate is. ``max_daily_loss`` and ``max_drawdown`` (amounts
    > 0) arm the gate's loss latch (``PortfolioGate.record_pnl`` and ``set_equity``); they are
    the account's, so a strategy's budget may not set them.

    The order caps apply to every order, reducing ones too: ``max_order_notional`` bounds one
    order's notional (``>``, as the exposures), ``max_open_orders`` and
    ``max_open_orders_per_symbol`` the outstanding reservations (an order that would make one
    more than the limit is denied), and ``max_orders_per_interval=(count, seconds)`` the
    admitted decisions in any sliding window of ``seconds`` on the gate's clock (denials do not
    count). The same limits serve as a strategy's budget (``PortfolioGate(..., budgets=)``).
    """

    max_concurrent_positions: int | None = None
    max_gross_exposure: Number | None = None
    max_symbol_exposure: Number | None = None
    max_net_exposure: Number | None = None
    max_daily_loss: Number | None = None
    max_drawdown: Number | None = None
    max_order_notional: Number | None = None
    max_open_orders: int | None = None
    max_open_orders_per_symbol: int | None = None
    max_orders_per_interval: tuple[int, Number] | None = None

    def __post_init__(self) -> None:
        _check_count("max_concurrent_positions", self.max_concurrent_positions)
        _check_amount_limit("max_gross_exposure", self.max_gross_exposure)
        _check_amount_limit("max_symbol_exposure", self.max_symbol_exposure)
        _check_amount_limit("max_net_exposure", self.max_net_exposure)
        _check_loss_limit("max_daily_loss", self.max_daily_loss)
        _check_loss_limit("max_drawdown", self.max_drawdown)
        _check_amount_limit("max_order_notional", self.max_order_notional)
        _check_count("max_open_orders", self.max_open_orders)
        _check_count("max_open_orders_per_symbol", self.max_open_orders_per_symbol)
        _check_rate("max_orders_per_interval", self.max_orders_per_interval)

    @property
    def has_loss_limits(self) -> bool:
        """Whether ``max_daily_loss`` or ``max_drawdown`` is set (the account's alone)."""
        return self.max_daily_loss is not None or self.max_drawdown is not None


def _check_count(name: str, count: object) -> None:
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{name} must be an int or None, got {count!r}")
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count!r}")


def _check_rate(name: str, rate: object) -> None:
    """``(count, seconds)``: an int count from 1 to ``MAX_RATE_COUNT`` and a finite number of
    seconds > 0."""
    if rate is None:
        return
    if not isinstance(rate, tuple) or len(rate) != 2:
        raise TypeError(f"{name} must be a (count, seconds) tuple or None, got {rate!r}")
    count, seconds = rate
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{name}: count must be an int, got {rate!r}")
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ValueError(f"{name}: count must be from 1 to {MAX_RATE_COUNT:,}, got {rate!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (numbers.Real, Decimal)):
        raise TypeError(f"{name}: seconds must be a number, got {rate!r}")
    try:
        length = float(seconds)
    except (OverflowError, ValueError):  # past a float, or a signalling NaN
        length = math.nan
    if not 0 < length < math.inf:
        raise ValueError(f"{name}: seconds must be finite and > 0, got {rate!r}")


def _check_amount_limit(name: str, value: object) -> None:
    if value is not None:
        _units.limit_units(name, value)


def _check_loss_limit(name: str, value: object) -> None:
    # 0 would latch at the first P&L of the day: a loss limit is a positive amount.
    if value is not None and _units.limit_units(name, value) <= 0:
        raise ValueError(f"{name} must be > 0 (or None), got {value!r}")
