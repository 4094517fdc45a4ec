"""Where a simulated run keeps its reservations: the backend protocol and the in-memory backend.

``Simulation`` gets its gate from a ``BackendFactory``; ``memory_backend`` (the default) builds a
``PendingEntryLedger`` with a ``PortfolioGate`` on it, or a ``BrokenGate`` for the broken run.
A shared store plugs in the same way (``pendingledger.sim.redis_backend``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Protocol, runtime_checkable

from pendingledger.gate import PortfolioGate, Positions
from pendingledger.ledger import PendingEntryLedger
from pendingledger.limits import Decision, Number, PortfolioLimits
from pendingledger.protocols import Gate, ReservationHandle
from pendingledger.sim.broken import BrokenGate
from pendingledger.trading import Side

__all__ = [
    "BackendFactory",
    "CacheGate",
    "MemoryBackend",
    "SimBackend",
    "SimGate",
    "memory_backend",
]


@runtime_checkable
class CacheGate(Protocol):
    """A gate that can also check against the app's own position cache: ``try_enter`` takes a
    ``positions`` mapping or callable (``PortfolioGate`` and ``BrokenGate`` do).

    ``SimConfig.book == "cache"`` needs one. The core ``pendingledger.Gate`` covers the
    gate-owned book only (``positions=None``), which is all a shared store can offer.
    """

    def try_enter(
        self,
        symbol: Hashable,
        notional: Number,
        positions: Positions | None = None,
        *,
        order_id: Hashable | None = None,
        side: Side | str | None = None,
    ) -> Decision: ...


SimGate = Gate | CacheGate
"""A gate the brains can race: a ``Gate`` (gate-owned book, ``book="gate"``) or a ``CacheGate``
(the app's cache, ``book="cache"``). ``PortfolioGate`` and ``BrokenGate`` are both."""


class SimBackend(Protocol):
    """Where the gate's reservations live, as the sim sees it.

    ``sweep()`` makes the store drop reservations whose TTL has passed now (firing
    ``on_expire``); ``outstanding()`` returns ``(count, gross notional)`` of what is still
    reserved; ``close()`` frees resources. A backend is used by one simulation only.

    A store that keeps time itself (a shared server's clock) cannot honour the ``clock`` it is
    given; it says so with a true ``server_clock`` attribute, and the drain then waits in real
    time (at most ``ttl`` + 1 s, calling ``sweep()``) for its lost orders to expire.
    """

    name: str

    @property
    def gate(self) -> SimGate: ...

    def sweep(self) -> None: ...

    def outstanding(self) -> tuple[int, float]: ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """Builds the backend for one run; ``broken`` asks for the check-then-act variant.
    ``budgets`` (the strategies' limits) is passed only to a run with strategies, so a
    factory that has none to offer need not take it."""

    def __call__(
        self,
        *,
        limits: PortfolioLimits,
        ttl: float,
        clock: Callable[[], float],
        on_expire: Callable[[ReservationHandle], None],
        broken: bool,
        budgets: Mapping[str, PortfolioLimits] | None = None,
    ) -> SimBackend: ...


class MemoryBackend:
    """In-process backend: a ``PendingEntryLedger`` with a ``PortfolioGate`` or ``BrokenGate``
    (with the strategies' ``budgets``, if any). ``between`` is the broken gate's gap (see
    ``BrokenGate``; None: its default short sleep)."""

    name = "memory"

    def __init__(
        self,
        *,
        limits: PortfolioLimits,
        ttl: float,
        clock: Callable[[], float],
        on_expire: Callable[[ReservationHandle], None],
        broken: bool,
        budgets: Mapping[str, PortfolioLimits] | None = None,
        between: Callable[[], object] | None = None,
    ) -> None:
        self.ledger = PendingEntryLedger(ttl, clock=clock, on_expire=on_expire)
        real = PortfolioGate(self.ledger, limits, budgets=budgets)
        self._gate: PortfolioGate | BrokenGate = real
        if broken:
            self._gate = BrokenGate(
                self.ledger, limits, budgets=budgets, book=real, between=between
            )

    @property
    def gate(self) -> PortfolioGate | BrokenGate:
        return self._gate

    def sweep(self) -> None:
        with self.ledger.lock():  # expired reservations are dropped on every acquisition
            pass

    def outstanding(self) -> tuple[int, float]:
        stats = self.ledger.stats()
        return stats.outstanding, float(stats.gross_notional)

    def close(self) -> None:
        pass


def memory_backend(
    *,
    limits: PortfolioLimits,
    ttl: float,
    clock: Callable[[], float],
    on_expire: Callable[[ReservationHandle], None],
    broken: bool,
    budgets: Mapping[str, PortfolioLimits] | None = None,
) -> SimBackend:
    """The default ``BackendFactory``: see ``MemoryBackend``."""
    return MemoryBackend(
        limits=limits, ttl=ttl, clock=clock, on_expire=on_expire, broken=broken, budgets=budgets
    )
