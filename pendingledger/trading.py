"""What an order and a gate are in trading terms: ``Side``, ``TradingState`` and ``Latch``.

Plain values shared by every backend. ``Side`` and ``TradingState`` are ``str`` enums, so
``"buy"`` and ``"reducing"`` work where a member does; the core reads them as the small ints of
``pendingledger.rules`` (``SIDE_CODES``, ``STATE_CODES``), because hashing an Enum runs Python
code.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

__all__ = ["Latch", "Side", "TradingState", "loss_state_code", "reset_offset", "side_code"]


class Side(enum.StrEnum):
    """The direction of an order: a buy raises a position, a sell lowers it."""

    BUY = "buy"
    SELL = "sell"


class TradingState(enum.StrEnum):
    """What a gate admits, strictest last."""

    ACTIVE = "active"
    """Every rule applies."""
    REDUCING = "reducing"
    """Only orders that raise no figure a limit bounds (``DenyReason.REDUCING_ONLY``)."""
    HALTED = "halted"
    """Nothing (``DenyReason.HALTED``)."""


@dataclass(frozen=True, slots=True)
class Latch:
    """Why and when the loss latch fired: it holds ``state`` until the next daily reset or an
    operator's ``resume()``.

    ``reason`` is ``"max_daily_loss"`` (the day's realized P&L reached ``-limit``) or
    ``"max_drawdown"`` (equity fell ``limit`` below its peak); ``value`` is the figure that
    reached it (the day's P&L, or the drawdown), ``at`` the wall-clock time in seconds since
    the epoch (-inf if the wall clock failed then), ``until`` the daily reset that clears it
    (inf: none, only ``resume()`` does). ``limit`` and ``value`` come back in the kinds of
    amount behind them (``pendingledger._units.to_number``): the limit's and the P&L's or
    equity's, so a float P&L against an int limit reads both as floats.
    """

    state: TradingState
    reason: str
    limit: int | float | Decimal | Fraction
    value: int | float | Decimal | Fraction
    at: float
    until: float


SIDES: Final[tuple[Side | None, ...]] = (None, Side.BUY, Side.SELL)
"""``SIDES[code]`` is the side of a ``pendingledger.rules`` side code (0: not given)."""
STATES: Final[tuple[TradingState, ...]] = tuple(TradingState)
"""``STATES[code]`` is the trading state of a ``pendingledger.rules`` state code."""


def side_code(side: object) -> int:
    """``side`` (a ``Side``, ``"buy"``/``"sell"`` or ``None``) as a ``rules`` side code."""
    if side is None:
        return 0
    if side is Side.BUY:
        return 1
    if side is Side.SELL:
        return 2
    if isinstance(side, str):
        value = str.__str__(side)  # a str subclass's own methods never run
        if value == "buy":
            return 1
        if value == "sell":
            return 2
        raise ValueError(f"side must be Side.BUY, Side.SELL, 'buy', 'sell' or None, got {side!r}")
    raise TypeError(f"side must be Side.BUY, Side.SELL, 'buy', 'sell' or None, got {side!r}")


def loss_state_code(on_loss: object) -> int:
    """``on_loss`` (``TradingState.REDUCING`` or ``HALTED``) as a ``rules`` state code."""
    if not isinstance(on_loss, str):
        raise TypeError(f"on_loss must be TradingState.REDUCING or HALTED, got {on_loss!r}")
    value = str.__str__(on_loss)
    if value not in ("reducing", "halted"):
        raise ValueError(f"on_loss must be TradingState.REDUCING or HALTED, got {on_loss!r}")
    return 1 if value == "reducing" else 2


def reset_offset(daily_reset: object) -> float:
    """``daily_reset`` (a ``datetime.time`` in UTC: naive, or with a zero UTC offset) as seconds
    after midnight UTC."""
    if not isinstance(daily_reset, datetime.time):
        raise TypeError(f"daily_reset must be a datetime.time (UTC), got {daily_reset!r}")
    offset = daily_reset.utcoffset()
    if offset is not None and offset != datetime.timedelta(0):
        raise ValueError(f"daily_reset must be a time of day in UTC, got {daily_reset!r}")
    t = daily_reset
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1_000_000
