"""The gate surface both backends share, and the in-process gate seen through it.

``Gate`` and ``ReservationLike`` are the typed protocols the conformance suite is written
against: ``PortfolioGate`` (with its own position book) and ``pendingledger.redis.RedisGate``
both satisfy them, so a bot switches backend by changing one constructor.

Until ``PortfolioGate`` owns a position book itself (``set_position``, ``close_position``,
``confirm_fill``, ``release``, ``release_order``, ``try_enter`` without positions),
``InProcessGate`` adds one around it: a dict passed as ``positions``. It is used only when the
core gate lacks ``set_position``, and only by single-threaded tests.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits
from pendingledger.limits import Decision, DenyReason

Number = int | float | Decimal | Fraction


@runtime_checkable
class ReservationLike(Protocol):
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


class GateStatsLike(Protocol):
    @property
    def admitted(self) -> int: ...
    @property
    def denied(self) -> Mapping[DenyReason, int]: ...


@runtime_checkable
class Gate(Protocol):
    @property
    def limits(self) -> PortfolioLimits: ...
    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None: ...
    @property
    def halted(self) -> bool: ...
    def try_enter(
        self, symbol: str, notional: Number, positions: None = None, *, order_id: str | None = None
    ) -> Decision: ...
    def set_position(self, symbol: str, exposure: Number) -> None: ...
    def close_position(self, symbol: str) -> bool: ...
    def confirm_fill(
        self, order_id: str, position_exposure: Number, *, symbol: str | None = None
    ) -> bool: ...
    def release(self, symbol: str) -> bool: ...
    def release_order(self, order_id: str) -> bool: ...
    def halt(self) -> None: ...
    def resume(self) -> None: ...
    def stats(self) -> GateStatsLike: ...


class InProcessGate:
    """``PortfolioGate`` plus an owned position book (stand-in until the core has one)."""

    def __init__(self, ledger: PendingEntryLedger, limits: PortfolioLimits) -> None:
        self.inner = PortfolioGate(ledger, limits)
        self.ledger = ledger
        self.book: dict[Hashable, Number] = {}
        self.orders: dict[Hashable, Any] = {}

    @property
    def limits(self) -> PortfolioLimits:
        return self.inner.limits

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None:
        self.inner.limits = limits

    @property
    def halted(self) -> bool:
        return self.inner.halted

    def try_enter(
        self, symbol: str, notional: Number, positions: None = None, *, order_id: str | None = None
    ) -> Decision:
        if positions is not None:
            raise TypeError("positions must be None: the gate owns the book")
        decision = self.inner.try_enter(symbol, notional, self.book, order_id=order_id)
        if decision.reservation is not None:
            self.orders[decision.reservation.order_id] = decision.reservation
        return decision

    def set_position(self, symbol: str, exposure: Number) -> None:
        _check_exposure(exposure)
        self.book[symbol] = exposure

    def close_position(self, symbol: str) -> bool:
        return self.book.pop(symbol, None) is not None

    def confirm_fill(
        self, order_id: str, position_exposure: Number, *, symbol: str | None = None
    ) -> bool:
        _check_exposure(position_exposure)
        res = self.orders.get(order_id)
        if res is None or not res.active:
            if symbol is None:
                raise KeyError(order_id)
            self.book[symbol] = position_exposure
            return False
        if symbol is not None and symbol != res.symbol:
            raise ValueError(f"order {order_id!r} is reserved on {res.symbol!r}")
        self.book[res.symbol] = position_exposure
        return bool(res.release())

    def release(self, symbol: str) -> bool:
        return self.ledger.release(symbol)

    def release_order(self, order_id: str) -> bool:
        return self.ledger.release_order(order_id)

    def halt(self) -> None:
        self.inner.halt()

    def resume(self) -> None:
        self.inner.resume()

    def stats(self) -> GateStatsLike:
        return self.inner.stats()


def _check_exposure(value: object) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, Fraction)):
        raise TypeError(f"exposure must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"exposure must be finite, got {value!r}")
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError(f"exposure must be finite, got {value!r}")


def in_process_gate(ledger: PendingEntryLedger, limits: PortfolioLimits) -> Gate:
    """The core gate if it owns a book already, else the stand-in."""
    if hasattr(PortfolioGate, "set_position"):
        gate: Any = PortfolioGate(ledger, limits)
        return gate  # type: ignore[no-any-return]
    return InProcessGate(ledger, limits)
