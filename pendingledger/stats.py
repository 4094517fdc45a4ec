"""Snapshots of counts: ``LedgerStats`` and ``GateStats`` (plain Python, so a backend may extend
them: the Redis gate's ``RedisGateStats`` does)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from .decision import DenyReason
from .trading import Latch, TradingState

__all__ = ["GateStats", "LedgerStats", "ScopeStats"]


@dataclass(frozen=True)
class LedgerStats:
    """A consistent snapshot of a ledger, taken under its lock.

    ``reserved == released + expired + outstanding`` always holds (``released`` counts fills
    too). Reservations made in a ``lock()`` block that raised count nowhere.
    """

    outstanding: int
    gross_notional: int | float | Decimal | Fraction
    reserved: int
    released: int
    expired: int


@dataclass(frozen=True)
class ScopeStats:
    """One scope's part of ``GateStats``: the decisions made for one strategy (or, under the
    key ``None``, for the account's own orders), admitted and denied by reason whichever
    scope's limit denied them, and the reservations of that scope outstanding."""

    admitted: int
    denied: Mapping[DenyReason, int]
    outstanding: int = 0

    @property
    def decisions(self) -> int:
        return self.admitted + sum(self.denied.values())


@dataclass(frozen=True)
class GateStats:
    """Running counts of a gate's decisions (a snapshot; ``denied`` is read-only), with the
    trading state and the loss latch as they were when it was taken. ``scopes`` has the same
    counts per strategy with a budget, and under ``None`` the account's own orders; the
    scopes' counts add up to ``admitted`` and ``denied``."""

    admitted: int
    denied: Mapping[DenyReason, int]
    state: TradingState = TradingState.ACTIVE
    latch: Latch | None = None
    scopes: Mapping[str | None, ScopeStats] = field(default_factory=dict)

    @property
    def decisions(self) -> int:
        return self.admitted + sum(self.denied.values())
