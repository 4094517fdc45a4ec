"""What an order and a gate are in trading terms: ``Side``, ``TradingState`` and ``Latch``.

Plain values shared by every backend. ``Side`` and ``TradingState`` are ``str`` enums, so
``"buy"`` and ``"reducing"`` work where a member does; the core reads them as the small ints of
``pendingledger.rules`` (``SIDE_CODES``, ``STATE_CODES``), because hashing an Enum runs Python
code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

__all__ = ["Latch", "Side", "TradingState"]


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
    the epoch, ``until`` the daily reset that clears it.
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
