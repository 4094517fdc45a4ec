"""What a gate enforces and what it answers: ``PortfolioLimits``, ``DenyReason``, ``Decision``.

These are plain values shared by every gate backend (in-process and Redis), so a bot can switch
backend without touching the code that reads decisions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Final

from . import _units

if TYPE_CHECKING:
    from .protocols import ReservationHandle

__all__ = ["Decision", "DenyReason", "PortfolioLimits"]


class DenyReason(enum.StrEnum):
    """Why a gate refused an entry. Rules are checked in the order listed; first failure wins."""

    HALTED = "halted"
    """``gate.halt()`` is in force."""
    MAX_CONCURRENT_POSITIONS = "max_concurrent_positions"
    """The entry would open one position more than the limit allows."""
    MAX_GROSS_EXPOSURE = "max_gross_exposure"
    """Open exposure + reserved notional + this entry would exceed the gross limit."""
    MAX_SYMBOL_EXPOSURE = "max_symbol_exposure"
    """This symbol's exposure + its reserved notional + this entry would exceed its limit."""
    BACKEND_UNAVAILABLE = "backend_unavailable"
    """The store behind the gate could not confirm the decision (fail closed)."""
    BOOK_NOT_RESTORED = "book_not_restored"
    """The shared store lost its book (a restart without persistence); ``restore()`` it first."""
    LOCK_TIMEOUT = "lock_timeout"
    """The ledger lock was not had within ``try_enter``'s ``timeout`` (fail closed)."""


Number = int | float | Decimal | Fraction


@dataclass(frozen=True)
class PortfolioLimits:
    """The portfolio-wide limits a gate enforces. ``None`` means no limit.

    ``max_concurrent_positions=0`` means no new position may open (entries on symbols already open
    or already reserved still pass this rule). Exposure limits compare with ``>``: an entry that
    lands exactly on the limit is admitted. Limits are validated here, once, so a gate never
    meets a NaN or negative limit at decision time; exposure limits count in units of ``1e-9``
    rounded down (``pendingledger._units``).
    """

    max_concurrent_positions: int | None = None
    max_gross_exposure: Number | None = None
    max_symbol_exposure: Number | None = None

    def __post_init__(self) -> None:
        _check_count("max_concurrent_positions", self.max_concurrent_positions)
        _check_amount_limit("max_gross_exposure", self.max_gross_exposure)
        _check_amount_limit("max_symbol_exposure", self.max_symbol_exposure)


def _check_count(name: str, count: object) -> None:
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{name} must be an int or None, got {count!r}")
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count!r}")


def _check_amount_limit(name: str, value: object) -> None:
    if value is not None:
        _units.limit_units(name, value)


class Decision:
    """The answer of ``try_enter``: truthy exactly when the entry was admitted.

    An admitted decision carries the ``Reservation`` made for it (release it on reject, or let the
    fill or the TTL end it) and ``reason`` is ``None``; a denied one carries the first rule that
    failed and no reservation. Decisions are read-only.
    """

    __slots__ = ("_reason", "_reservation")

    _reason: DenyReason | None
    _reservation: ReservationHandle | None

    def __init__(
        self, reason: DenyReason | None = None, reservation: ReservationHandle | None = None
    ) -> None:
        if (reason is None) == (reservation is None):
            raise ValueError(
                "a Decision has either a reservation (admitted) or a reason (denied), got "
                f"reason={reason!r}, reservation={reservation!r}"
            )
        self._reason = reason
        self._reservation = reservation

    @property
    def admitted(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> DenyReason | None:
        return self._reason

    @property
    def reservation(self) -> ReservationHandle | None:
        return self._reservation

    def __bool__(self) -> bool:
        return self._reason is None

    def __repr__(self) -> str:
        if self._reason is None:
            return f"Decision(admitted, reservation={self._reservation!r})"
        return f"Decision(denied, reason={self._reason.name})"


REASONS: Final[tuple[DenyReason | None, ...]] = (None, *DenyReason)
"""``REASONS[code]`` is the reason of a ``pendingledger.rules`` outcome code (0 admits)."""

DENIED: Final[tuple[Decision, ...]] = tuple(Decision(reason) for reason in DenyReason)
"""One shared denied decision per reason, ``DENIED[code - 1]``: denials allocate nothing."""


def denied(reason: DenyReason) -> Decision:
    """The shared denied decision of ``reason``."""
    return DENIED[list(DenyReason).index(reason)]
