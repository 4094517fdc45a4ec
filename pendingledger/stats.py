"""Snapshots of counts: ``LedgerStats`` and ``GateStats`` (plain Python, so a backend may extend
them: the Redis gate's ``RedisGateStats`` does)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from .decision import DenyReason
from .trading import Latch, TradingState

__all__ = ["GateStats", "LedgerStats"]


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
class GateStats:
    """Running counts of a gate's decisions (a snapshot; ``denied`` is read-only), with the
    trading state and the loss latch as they were when it was taken."""

    admitted: int
    denied: Mapping[DenyReason, int]
    state: TradingState = TradingState.ACTIVE
    latch: Latch | None = None

    @property
    def decisions(self) -> int:
        return self.admitted + sum(self.denied.values())
