"""Strategy budgets: the limits a gate decides with, the account's and each strategy's, as one
value (``Limits``), so that a decision reads them once and uses one consistent pair.

Checked here, before any lock: a budget is a ``PortfolioLimits`` under an exact, non-empty
``str`` name, and sets no loss limit (the loss latch is the account's).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from . import _units, rules
from .limits import PortfolioLimits
from .rules import UnitLimits

__all__: list[str] = []


class Limits:
    """The account's limits and the strategies' budgets, in units; read-only once made."""

    __slots__ = ("account", "budgets")

    def __init__(self, account: UnitLimits, budgets: dict[str, UnitLimits]) -> None:
        self.account = account
        self.budgets = budgets

    def sources(self) -> Mapping[str, PortfolioLimits]:
        return MappingProxyType({name: unit.source for name, unit in self.budgets.items()})

    def budget_of(self, strategy: object, positions: object) -> tuple[str, UnitLimits]:
        """``strategy``'s name and budget; ``ValueError`` if it has none, or if the decision
        is on a caller's ``positions`` (they carry no strategy)."""
        name = strategy if type(strategy) is str else _units.check_strategy(strategy)
        budget = self.budgets.get(name)
        if budget is None:
            known = ", ".join(map(repr, sorted(self.budgets))) or "none"
            raise ValueError(f"strategy {strategy!r} has no budget (budgets: {known})")
        if positions is not None:
            raise ValueError(
                f"strategy={name!r}: strategy budgets are decided on the gate's own book "
                "(set_position/confirm_fill), so try_enter takes no positions with a strategy"
            )
        return name, budget


def check_budgets(budgets: object) -> dict[str, UnitLimits]:
    """``budgets`` (a mapping of strategy name to ``PortfolioLimits``, or None) in units."""
    if budgets is None:
        return _NONE
    if not isinstance(budgets, Mapping):
        raise TypeError(f"budgets must be a mapping of strategy name to limits, got {budgets!r}")
    checked: dict[str, UnitLimits] = {}
    for key, limits in list(budgets.items()):
        if not isinstance(key, str):
            raise TypeError(f"budgets: a strategy's name must be a non-empty str, got {key!r}")
        if not key:
            raise ValueError(f"budgets: a strategy's name must not be empty, got {key!r}")
        if not isinstance(limits, PortfolioLimits):
            raise TypeError(f"budgets[{key!r}] must be a PortfolioLimits, got {limits!r}")
        if limits.has_loss_limits:
            raise ValueError(
                f"budgets[{key!r}] sets a loss limit: max_daily_loss and max_drawdown are the "
                f"account's (set them on the gate's limits), got {limits!r}"
            )
        checked[str.__str__(key)] = rules.unit_limits(limits)  # exact: hashed in C
    return checked


_NONE: Final[dict[str, UnitLimits]] = {}
