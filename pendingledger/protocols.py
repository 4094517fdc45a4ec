"""The surface every gate backend offers, as typing protocols.

``PortfolioGate`` (in-process) and ``pendingledger.redis.RedisGate`` (shared store) both satisfy
``Gate``, so a bot written against it moves from one process to many by changing the one line
that builds the gate. Decisions, reasons and limits are the same classes for both.

Both count amounts alike, in units of 1e-9 (``pendingledger._units``), and both take symbols
and order ids as ``str``.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .gate import GateStats
    from .limits import Decision, PortfolioLimits
    from .trading import Latch, Side, TradingState

__all__ = ["Asked", "Gate", "ReservationHandle"]

Number = int | float | Decimal | Fraction


class Asked(Protocol):
    """What an order asked of a gate (``events.Decided.asked``): a reservation handle has it
    all, and a ``events.Order`` carries it for a decision that made none."""

    @property
    def symbol(self) -> str: ...

    @property
    def initial_notional(self) -> Number: ...

    @property
    def side(self) -> Side | None: ...

    @property
    def strategy(self) -> str | None: ...


@runtime_checkable
class ReservationHandle(Asked, Protocol):
    """What a caller may do with ``Decision.reservation``, whichever backend made it."""

    @property
    def order_id(self) -> str: ...

    @property
    def notional(self) -> Number: ...

    @property
    def reserved_at(self) -> float: ...

    @property
    def expires_at(self) -> float: ...

    @property
    def active(self) -> bool: ...

    def release(self) -> bool: ...

    def reduce(self, amount: Number) -> bool: ...


@runtime_checkable
class Gate(Protocol):
    """A portfolio gate with its own position book (``positions=None``)."""

    @property
    def limits(self) -> PortfolioLimits: ...

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None: ...

    @property
    def budgets(self) -> Mapping[str, PortfolioLimits]: ...

    @budgets.setter
    def budgets(self, budgets: Mapping[str, PortfolioLimits] | None) -> None: ...

    @property
    def halted(self) -> bool: ...

    @property
    def state(self) -> TradingState: ...

    @property
    def latch(self) -> Latch | None: ...

    def try_enter(
        self,
        symbol: str,
        notional: Number,
        positions: None = None,
        *,
        order_id: str | None = None,
        side: Side | str | None = None,
        strategy: str | None = None,
    ) -> Decision: ...

    def release(self, symbol: str) -> bool: ...

    def release_order(self, order_id: str) -> bool: ...

    def set_position(
        self, symbol: str, exposure: Number, *, strategy: str | None = None
    ) -> None: ...

    def close_position(self, symbol: str, *, strategy: str | None = None) -> bool: ...

    def confirm_fill(
        self,
        order_id: str,
        position_exposure: Number,
        *,
        symbol: str | None = None,
        filled: Number | None = None,
        strategy: str | None = None,
    ) -> bool: ...

    def reduce_order(self, order_id: str, amount: Number) -> bool: ...

    def positions(self, *, strategy: str | None = None) -> dict[str, Number]: ...

    def halt(self) -> None: ...

    def reduce_only(self) -> None: ...

    def resume(self) -> None: ...

    def record_pnl(self, amount: Number) -> None: ...

    def set_equity(self, equity: Number) -> None: ...

    def stats(self) -> GateStats: ...
