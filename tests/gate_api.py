"""What the conformance suite uses of a gate: the core's backend-neutral protocols, plus the few
attributes both backends offer beyond them (``halted``; a reservation's times and initial
notional). ``PortfolioGate`` and ``pendingledger.redis.RedisGate`` both satisfy these."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Protocol, runtime_checkable

from pendingledger.limits import PortfolioLimits
from pendingledger.protocols import Gate, ReservationHandle

Number = int | float | Decimal | Fraction

__all__ = ["GateLike", "ReservationLike"]


@runtime_checkable
class ReservationLike(ReservationHandle, Protocol):
    @property
    def initial_notional(self) -> Number: ...
    @property
    def reserved_at(self) -> float: ...
    @property
    def expires_at(self) -> float: ...


@runtime_checkable
class GateLike(Gate, Protocol):
    @property
    def limits(self) -> PortfolioLimits: ...
    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None: ...
    @property
    def halted(self) -> bool: ...
