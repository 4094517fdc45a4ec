"""What a gate answers: ``DenyReason`` and ``Decision`` (``Admitted`` or ``Denied``), shared by
every backend.

Compiled with the core: a decision is made on every ``try_enter``. Parameters a caller passes are
typed ``object`` and checked here, so a bad one gets an error that names it (a compiled function
would otherwise refuse it with a generic message before its body runs).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, Literal, TypeAlias, cast, final

if TYPE_CHECKING:
    from .protocols import ReservationHandle

__all__ = ["DENIED", "REASONS", "Admitted", "Decision", "Denials", "Denied", "DenyReason", "denied"]


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


@final
class Admitted:
    """An admitted decision of ``try_enter``: it carries the reservation made for it.

    Release the reservation on an exchange reject, or let the fill (``confirm_fill``) or the
    TTL end it. ``admitted`` is ``Literal[True]`` and the decision is truthy, so after
    ``if decision.admitted:`` (or ``if decision:``) a type checker knows ``reservation`` is
    there. Read-only.
    """

    __slots__ = ("_reservation",)

    _reservation: ReservationHandle

    def __init__(self, reservation: object) -> None:
        if reservation is None:
            raise ValueError("an Admitted decision needs its reservation, got None")
        self._reservation = cast("ReservationHandle", reservation)

    @property
    def admitted(self) -> Literal[True]:
        return True

    @property
    def reservation(self) -> ReservationHandle:
        """The reservation the decision made (a ``Reservation`` in process)."""
        return self._reservation

    @property
    def reason(self) -> None:
        return None

    @property
    def scope(self) -> None:
        return None

    def __bool__(self) -> Literal[True]:
        return True

    def __repr__(self) -> str:
        return f"Admitted(reservation={self._reservation!r})"


@final
class Denied:
    """A denied decision of ``try_enter``: the first rule that failed, and whose limit it was.

    ``scope`` is the strategy's name (its budget denied), or ``None`` (the account's limits,
    the trading state, or the backend). ``admitted`` is ``Literal[False]``, the decision is
    falsy, and ``reservation`` is ``None``. Read-only; gates share one per reason and scope.
    """

    __slots__ = ("_reason", "_scope")

    _reason: DenyReason
    _scope: str | None

    def __init__(self, reason: object, scope: object = None) -> None:
        if not isinstance(reason, DenyReason):
            raise TypeError(f"reason must be a DenyReason, got {reason!r}")
        if scope is not None and (type(scope) is not str or not scope):
            raise ValueError(f"scope must be None or a strategy's name, got {scope!r}")
        self._reason = reason
        self._scope = scope

    @property
    def admitted(self) -> Literal[False]:
        return False

    @property
    def reservation(self) -> None:
        return None

    @property
    def reason(self) -> DenyReason:
        return self._reason

    @property
    def scope(self) -> str | None:
        """Where the denial came from: a strategy's name (its budget), or None (the account)."""
        return self._scope

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        if self._scope is None:
            return f"Denied(reason={self._reason.name})"
        return f"Denied(reason={self._reason.name}, scope={self._scope!r})"


Decision: TypeAlias = Admitted | Denied
"""The answer of ``try_enter``: ``Admitted`` (with its reservation) or ``Denied`` (with its
reason and scope). Narrow it with ``if decision.admitted:``, ``if decision:`` or ``isinstance``."""


REASONS: Final[tuple[DenyReason | None, ...]] = (None, *DenyReason)
"""``REASONS[code]`` is the reason of a ``pendingledger.rules`` outcome code (0 admits)."""

DENIED: Final[tuple[Denied, ...]] = tuple(Denied(reason) for reason in DenyReason)
"""One shared denied decision per reason, ``DENIED[code - 1]``: denials allocate nothing."""


def denied(reason: object, scope: object = None) -> Denied:
    """The denied decision of ``reason`` (a ``DenyReason``) at ``scope``: the shared one for
    the account (``None``); a new one for a strategy (gates keep theirs: ``Denials``)."""
    if not isinstance(reason, DenyReason):
        raise TypeError(f"reason must be a DenyReason, got {reason!r}")
    if scope is None:
        return DENIED[REASONS.index(reason) - 1]
    return Denied(reason, scope)


class Denials:
    """A gate's denied decisions by outcome code and strategy, made once each: a denial
    allocates nothing after the first of its kind. Thread-safe without a lock: two threads may
    both make the first one, and either is right."""

    __slots__ = ("_by_scope",)

    def __init__(self) -> None:
        self._by_scope: dict[str, tuple[Denied, ...]] = {}

    def of(self, code: int, scope: str | None) -> Denied:
        """The denial of outcome ``code`` (``pendingledger.rules``) at ``scope``."""
        if scope is None:
            return DENIED[code - 1]
        decisions = self._by_scope.get(scope)
        if decisions is None:
            decisions = tuple(Denied(reason, scope) for reason in DenyReason)
            self._by_scope[scope] = decisions
        return decisions[code - 1]
