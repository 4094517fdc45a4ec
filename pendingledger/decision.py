"""What a gate answers: ``DenyReason`` and ``Decision``, shared by every backend.

Compiled with the core: a decision is made on every ``try_enter``. Parameters a caller passes are
typed ``object`` and checked here, so a bad one gets an error that names it (a compiled function
would otherwise refuse it with a generic message before its body runs).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from .protocols import ReservationHandle

__all__ = ["DENIED", "REASONS", "Decision", "Denials", "DenyReason", "denied"]


class DenyReason(enum.StrEnum):
    """Why a gate refused an entry. Rules are checked in the order listed; first failure wins."""

    HALTED = "halted"
    """The gate is ``HALTED`` (``gate.halt()``, or the loss latch)."""
    REDUCING_ONLY = "reducing_only"
    """The gate is ``REDUCING`` (``gate.reduce_only()``, or the loss latch) and this order would
    raise a figure a limit bounds."""
    MAX_CONCURRENT_POSITIONS = "max_concurrent_positions"
    """The entry would open one position more than the limit allows."""
    MAX_GROSS_EXPOSURE = "max_gross_exposure"
    """This order would raise the sum of worst-case exposures past the gross limit."""
    MAX_SYMBOL_EXPOSURE = "max_symbol_exposure"
    """This order would raise the symbol's worst-case exposure past its limit."""
    MAX_NET_EXPOSURE = "max_net_exposure"
    """This order would raise the portfolio's worst-case net exposure past its limit."""
    MAX_ORDER_NOTIONAL = "max_order_notional"
    """This order's notional is above the limit on one order."""
    MAX_OPEN_ORDERS = "max_open_orders"
    """The outstanding reservations already reach the limit."""
    MAX_OPEN_ORDERS_PER_SYMBOL = "max_open_orders_per_symbol"
    """The symbol's outstanding reservations already reach the limit."""
    MAX_ORDERS_PER_INTERVAL = "max_orders_per_interval"
    """The limit's count of orders was admitted within its sliding window already."""
    BACKEND_UNAVAILABLE = "backend_unavailable"
    """The store behind the gate could not confirm the decision (fail closed)."""
    BOOK_NOT_RESTORED = "book_not_restored"
    """The shared store lost its book (a restart without persistence); ``restore()`` it first."""
    LOCK_TIMEOUT = "lock_timeout"
    """The ledger lock was not had within ``try_enter``'s ``timeout`` (fail closed)."""


class Decision:
    """The answer of ``try_enter``: truthy exactly when the entry was admitted.

    An admitted decision carries the ``Reservation`` made for it (release it on reject, or let the
    fill or the TTL end it) and ``reason`` is ``None``; a denied one carries the first rule that
    failed and no reservation, and ``scope`` says whose limit it was: the strategy's name (its
    budget), or ``None`` (the account's limits, the trading state, or the backend). Decisions
    are read-only.
    """

    __slots__ = ("_reason", "_reservation", "_scope")

    _reason: DenyReason | None
    _reservation: ReservationHandle | None
    _scope: str | None

    def __init__(
        self, reason: object = None, reservation: object = None, scope: object = None
    ) -> None:
        if (reason is None) == (reservation is None) or not (
            reason is None or isinstance(reason, DenyReason)
        ):
            raise ValueError(
                "a Decision has either a reservation (admitted) or a reason (denied), got "
                f"reason={reason!r}, reservation={reservation!r}"
            )
        if scope is not None and (type(scope) is not str or not scope or reason is None):
            raise ValueError(f"scope must be None or a strategy's name on a denial, got {scope!r}")
        self._reason = reason
        self._reservation = cast("ReservationHandle | None", reservation)
        self._scope = scope

    @property
    def admitted(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> DenyReason | None:
        return self._reason

    @property
    def reservation(self) -> ReservationHandle | None:
        return self._reservation

    @property
    def scope(self) -> str | None:
        """Where a denial came from: a strategy's name (its budget), or None (the account)."""
        return self._scope

    def __bool__(self) -> bool:
        return self._reason is None

    def __repr__(self) -> str:
        if self._reason is None:
            return f"Decision(admitted, reservation={self._reservation!r})"
        if self._scope is None:
            return f"Decision(denied, reason={self._reason.name})"
        return f"Decision(denied, reason={self._reason.name}, scope={self._scope!r})"


REASONS: Final[tuple[DenyReason | None, ...]] = (None, *DenyReason)
"""``REASONS[code]`` is the reason of a ``pendingledger.rules`` outcome code (0 admits)."""

DENIED: Final[tuple[Decision, ...]] = tuple(Decision(reason) for reason in DenyReason)
"""One shared denied decision per reason, ``DENIED[code - 1]``: denials allocate nothing."""


def denied(reason: object, scope: object = None) -> Decision:
    """The denied decision of ``reason`` (a ``DenyReason``) at ``scope``: the shared one for
    the account (``None``); a new one for a strategy (gates keep theirs: ``Denials``)."""
    if not isinstance(reason, DenyReason):
        raise TypeError(f"reason must be a DenyReason, got {reason!r}")
    if scope is None:
        return DENIED[REASONS.index(reason) - 1]
    return Decision(reason, None, scope)


class Denials:
    """A gate's denied decisions by outcome code and strategy, made once each: a denial
    allocates nothing after the first of its kind. Thread-safe without a lock: two threads may
    both make the first one, and either is right."""

    __slots__ = ("_by_scope",)

    def __init__(self) -> None:
        self._by_scope: dict[str, tuple[Decision, ...]] = {}

    def of(self, code: int, scope: str | None) -> Decision:
        """The denial of outcome ``code`` (``pendingledger.rules``) at ``scope``."""
        if scope is None:
            return DENIED[code - 1]
        decisions = self._by_scope.get(scope)
        if decisions is None:
            decisions = tuple(Decision(reason, None, scope) for reason in DenyReason)
            self._by_scope[scope] = decisions
        return decisions[code - 1]
