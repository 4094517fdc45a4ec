"""What a gate enforces and what it answers: ``PortfolioLimits``, ``DenyReason``, ``Decision``.

These are plain values shared by every gate backend (in-process and Redis), so a bot can switch
backend without touching the code that reads decisions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .protocols import ReservationHandle

__all__ = ["Decision", "DenyReason", "PortfolioLimits"]


class DenyReason(str, enum.Enum):
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

    def __str__(self) -> str:
        return self.value


Number = int | float | Decimal | Fraction


@dataclass(frozen=True, slots=True)
class PortfolioLimits:
    """The portfolio-wide limits a gate enforces. ``None`` means no limit.

    ``max_concurrent_positions=0`` means no new position may open (entries on symbols already open
    or already reserved still pass this rule). Exposure limits compare with ``>``: an entry that
    lands exactly on the limit is admitted. Limits are validated here, once, so a gate never
    meets a NaN or negative limit at decision time.
    """

    max_concurrent_positions: int | None = None
    max_gross_exposure: Number | None = None
    max_symbol_exposure: Number | None = None

    def __post_init__(self) -> None:
        count = self.max_concurrent_positions
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(f"max_concurrent_positions must be an int or None, got {count!r}")
            if count < 0:
                raise ValueError(f"max_concurrent_positions must be >= 0, got {count!r}")
        _check_amount_limit("max_gross_exposure", self.max_gross_exposure)
        _check_amount_limit("max_symbol_exposure", self.max_symbol_exposure)


def _check_amount_limit(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, Fraction)):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    if isinstance(value, Decimal):
        finite = value.is_finite()
    elif isinstance(value, float):
        finite = math.isfinite(value)
    else:
        finite = True
    if not finite:
        raise ValueError(f"{name} must be finite (use None for no limit), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


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


DENIED: Final[dict[DenyReason, Decision]] = {reason: Decision(reason) for reason in DenyReason}
"""One shared denied decision per reason: denials allocate nothing."""
