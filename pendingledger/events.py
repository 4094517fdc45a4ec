"""What a gate tells its listeners: decisions, ends of reservations, changes of trading state.

``gate.subscribe(listener)`` registers a callable that receives each ``Event`` in the thread that
caused it, after the ledger lock is released (a listener may call the gate). A listener's
exception is logged and never reaches the trading thread. Listeners run on the trading thread's
time: keep them short (append to a queue, bump a counter) and do slow work elsewhere.

``Listeners`` is the registry one gate (and one ledger) keeps. Its own small lock orders
subscriptions; delivering reads the ``active`` tuple without any lock, so an event in flight
while a listener subscribes or unsubscribes may or may not reach it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, final

if TYPE_CHECKING:
    from ._units import Number
    from .decision import Decision
    from .protocols import Asked, ReservationHandle
    from .trading import Latch, Side, TradingState

__all__ = ["Decided", "EndReason", "Ended", "Event", "Listener", "Order", "StateChanged"]

logger = logging.getLogger("pendingledger")


class EndReason(enum.StrEnum):
    """How a reservation ended."""

    RELEASED = "released"
    """Released: an exchange reject, or its fill is in the caller's positions."""
    FILLED = "filled"
    """Ended by ``confirm_fill``."""
    REDUCED = "reduced"
    """Reduced to nothing by partial fills (``reduce``, ``reduce_order``)."""
    EXPIRED = "expired"
    """Nothing ended it within the ledger's TTL: a release was probably missed."""


@final
class Order:
    """A ``protocols.Asked`` of plain values, for a decision that made no reservation handle."""

    __slots__ = ("initial_notional", "side", "strategy", "symbol")

    def __init__(
        self, symbol: str, notional: Number, side: Side | None, strategy: str | None
    ) -> None:
        self.symbol = symbol
        self.initial_notional = notional
        self.side = side
        self.strategy = strategy


@final
class Decided:
    """A ``try_enter`` decided: ``decision`` is the ``Admitted`` or ``Denied`` it returned,
    ``seconds`` how long it took (the lock waits and the reads of positions included), timed
    only while a listener subscribed with ``timed=True`` wants it (None otherwise: two clock
    reads are a fifth of what subscribing costs a decision). What was asked (``symbol``,
    ``notional``, ``side``, ``strategy``) is read from ``asked`` when a listener wants it, so
    an event costs the trading thread one small object."""

    __slots__ = ("asked", "decision", "seconds")

    def __init__(self, decision: Decision, asked: Asked, seconds: float | None) -> None:
        self.decision = decision
        self.asked = asked
        self.seconds = seconds

    @property
    def symbol(self) -> str:
        return self.asked.symbol

    @property
    def notional(self) -> Number:
        return self.asked.initial_notional

    @property
    def side(self) -> Side | None:
        return self.asked.side

    @property
    def strategy(self) -> str | None:
        return self.asked.strategy

    def __repr__(self) -> str:
        return (
            f"Decided({self.decision!r}, symbol={self.symbol!r}, notional={self.notional!r}, "
            f"side={self.side!r}, strategy={self.strategy!r})"
        )


@final
class Ended:
    """The reservation of ``order_id`` ended (once, and for good); ``how`` says by what.

    ``reservation`` is its handle: always in process; from a ``RedisGate``, when it was ended
    through the handle (None when ended by order id: the gate holds no handles)."""

    __slots__ = ("_order_id", "how", "reservation")

    def __init__(
        self, order_id: str, how: EndReason, reservation: ReservationHandle | None = None
    ) -> None:
        self._order_id = order_id
        self.how = how
        self.reservation = reservation

    @property
    def order_id(self) -> str:
        # An id the ledger generated is built only if asked for: "" here means "the handle's".
        if self._order_id or self.reservation is None:
            return self._order_id
        return self.reservation.order_id

    def __repr__(self) -> str:
        return f"Ended(order_id={self.order_id!r}, how={self.how!r})"


@final
class StateChanged:
    """The gate's effective trading state or its latch changed: ``previous`` to ``state``
    (the same when only the latch changed), ``latch`` as it now is (None: cleared)."""

    __slots__ = ("latch", "previous", "state")

    def __init__(self, state: TradingState, previous: TradingState, latch: Latch | None) -> None:
        self.state = state
        self.previous = previous
        self.latch = latch

    def __repr__(self) -> str:
        return f"StateChanged({self.previous!r} -> {self.state!r}, latch={self.latch!r})"


Event: TypeAlias = Decided | Ended | StateChanged
Listener: TypeAlias = Callable[[Event], object]


class Listeners:
    """The callables subscribed, each with how many times (so a listener subscribed through two
    gates on one ledger hears each end once, and until it is unsubscribed from both)."""

    __slots__ = ("_counts", "_lock", "_timed", "active", "timing")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Listener, int] = {}
        self._timed: set[Listener] = set()  # the listeners that want decisions timed
        self.active: tuple[Listener, ...] = ()
        self.timing = False

    def add(self, listener: object, timed: object = False) -> None:
        fn = check_listener(listener)
        if not isinstance(timed, bool):
            raise TypeError(f"timed must be a bool, got {timed!r}")
        with self._lock:
            self._counts[fn] = self._counts.get(fn, 0) + 1
            if timed:
                self._timed.add(fn)
            self.timing = bool(self._timed)
            self.active = tuple(self._counts)

    def remove(self, listener: object) -> bool:
        """Take one subscription of ``listener`` away; whether it had one."""
        with self._lock:
            count = self._counts.get(listener)  # type: ignore[call-overload]
            if count is None:
                return False
            if count > 1:
                self._counts[listener] = count - 1  # type: ignore[index]
            else:
                del self._counts[listener]  # type: ignore[arg-type]
                self._timed.discard(listener)
                self.timing = bool(self._timed)
                self.active = tuple(self._counts)
            return True

    def emit(self, event: Event) -> None:
        """Call every listener with ``event`` (the caller has released the ledger lock)."""
        for listener in self.active:
            try:
                listener(event)
            except Exception as exc:
                listener_failed(listener, exc)


def check_listener(listener: object) -> Listener:
    if not callable(listener):
        raise TypeError(f"listener must be callable with one event, got {listener!r}")
    return listener


def listener_failed(listener: object, exc: Exception) -> None:
    """One line per failure; the traceback only when the logger is at DEBUG."""
    logger.warning(
        "event listener %r raised %s: %s; ignored",
        listener,
        type(exc).__name__,
        exc,
        exc_info=logger.isEnabledFor(logging.DEBUG),
    )


def log_change(event: StateChanged, where: str = "") -> None:
    """The one warning line for a change of trading state (``where``: e.g. a namespace)."""
    latch = event.latch
    logger.warning(
        "trading state %s -> %s%s%s",
        event.previous,
        event.state,
        where and f" in {where}",
        ""
        if latch is None
        else f" (latched: {latch.reason}, {latch.value} against a limit of {latch.limit}, "
        f"until {latch.until})",
    )
