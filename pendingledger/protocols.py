"""The surface every gate backend offers, as typing protocols.

``PortfolioGate`` (in-process) and ``pendingledger.redis.RedisGate`` (shared store) both satisfy
``Gate``, so a bot written against it moves from one process to many by changing the one line
that builds the gate. Decisions, reasons and limits are the same classes for both.

One difference in amounts: the in-process gate counts a float as its exact binary value (so
float sums equal ``math.fsum``), the Redis gate as the decimal it prints as, in units of 1e-9.
Only at a limit's very edge can the two decide differently (0.1 + 0.2 against a 0.3 limit is
denied in-process and admitted on Redis); use ``Decimal`` amounts where that edge matters.
"""

from __future__ import annotations

from collections.abc import Hashable
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .gate import GateStats
    from .limits import Decision, PortfolioLimits

__all__ = ["Gate", "ReservationHandle"]

Number = int | float | Decimal | Fraction


@runtime_checkable
class ReservationHandle(Protocol):
    """What a caller may do with ``Decision.reservation``, whichever backend made it."""

    @property
    def symbol(self) -> Hashable: ...

    @property
    def order_id(self) -> Hashable: ...

    @property
    def notional(self) -> Number: ...

    @property
    def initial_notional(self) -> Number: ...

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
    def halted(self) -> bool: ...

    def try_enter(
        self,
        symbol: Hashable,
        notional: Number,
        positions: None = None,
        *,
        order_id: Hashable | None = None,
    ) -> Decision: ...

    def release(self, symbol: Hashable) -> bool: ...

    def release_order(self, order_id: Hashable) -> bool: ...

    def set_position(self, symbol: Hashable, exposure: Number) -> None: ...

    def close_position(self, symbol: Hashable) -> bool: ...

    def confirm_fill(
        self, order_id: Hashable, position_exposure: Number, *, symbol: Hashable | None = None
    ) -> bool: ...

    def positions(self) -> dict[Hashable, Number]: ...

    def halt(self) -> None: ...

    def resume(self) -> None: ...

    def stats(self) -> GateStats: ...
