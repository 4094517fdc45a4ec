"""The limit rules, written once: ``first_failing_rule``.

Every gate decides with this function: the in-process gate under its ledger lock, the broken
demonstration gate, the tests' reference model and the benchmarks' straightforward port. The
Redis server code (``pendingledger/redis/gate.lua``) is the one copy, and the conformance suite
holds it to this one.

Figures and limits are integers of units (``pendingledger._units``). Outcome codes are small
ints, not ``DenyReason`` members, because hashing an Enum runs Python code; ``REASONS`` (in
``decision``) maps a code to its reason.
"""

from __future__ import annotations

import operator
from typing import Final

from . import _units
from .limits import PortfolioLimits

__all__ = ["UnitLimits", "first_failing_rule", "unit_limits"]

ADMIT: Final = 0
HALTED: Final = 1
MAX_CONCURRENT_POSITIONS: Final = 2
MAX_GROSS_EXPOSURE: Final = 3
MAX_SYMBOL_EXPOSURE: Final = 4
BACKEND_UNAVAILABLE: Final = 5
BOOK_NOT_RESTORED: Final = 6
LOCK_TIMEOUT: Final = 7
NO_LIMIT: Final = -1


class UnitLimits:
    """A ``PortfolioLimits`` in units, as the rules read it; ``NO_LIMIT`` where none is set."""

    __slots__ = ("max_gross", "max_positions", "max_symbol", "source")

    def __init__(self, source: PortfolioLimits) -> None:
        self.source = source
        count = source.max_concurrent_positions
        # An exact int: an int subclass's comparisons would run its code under the lock.
        self.max_positions: int = NO_LIMIT if count is None else operator.index(count)
        self.max_gross: int = _limit("max_gross_exposure", source.max_gross_exposure)
        self.max_symbol: int = _limit("max_symbol_exposure", source.max_symbol_exposure)


def unit_limits(limits: object) -> UnitLimits:
    """``limits`` (a ``PortfolioLimits``) in units; ``TypeError`` for anything else."""
    if not isinstance(limits, PortfolioLimits):
        raise TypeError(f"limits must be a PortfolioLimits, got {limits!r}")
    return UnitLimits(limits)


def first_failing_rule(
    limits: UnitLimits,
    halted: bool,
    open_count: int,
    symbol_open: bool,
    gross: int,
    symbol_exposure: int,
    notional: int,
) -> int:
    """The first rule an entry of ``notional`` units fails, or ``ADMIT``. In ``DenyReason`` order:

    1. ``HALTED`` while the gate is halted.
    2. ``MAX_CONCURRENT_POSITIONS``: the symbol is neither open nor reserved (``symbol_open``)
       and the symbols open or reserved (``open_count``) already reach the limit.
    3. ``MAX_GROSS_EXPOSURE``: open exposure plus reserved notional (``gross``) plus this entry
       would exceed the limit.
    4. ``MAX_SYMBOL_EXPOSURE``: the symbol's exposure plus its reserved notional
       (``symbol_exposure``) plus this entry would exceed the limit.

    An entry that lands exactly on a limit is admitted.
    """
    if halted:
        return HALTED
    if not symbol_open and NO_LIMIT < limits.max_positions <= open_count:
        return MAX_CONCURRENT_POSITIONS
    if limits.max_gross > NO_LIMIT and gross + notional > limits.max_gross:
        return MAX_GROSS_EXPOSURE
    if limits.max_symbol > NO_LIMIT and symbol_exposure + notional > limits.max_symbol:
        return MAX_SYMBOL_EXPOSURE
    return ADMIT


def _limit(name: str, value: object) -> int:
    return NO_LIMIT if value is None else _units.limit_units(name, value)
