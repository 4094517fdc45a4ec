"""A simulated threaded trading app racing a portfolio gate, and an auditor that catches breaches.

Why this module exists: pendingledger promises that however many threads race
check-and-reserve, the portfolio limits are never breached and no reservation is lost or leaked.
A promise like that is only worth something if a harness that *could* catch a breach runs
against it. This module is that harness, shaped like the app that imports the library:

* **Brains** (strategy threads, ``SimConfig.threads`` of them, started together behind a
  ``threading.Barrier``) pick a symbol and a notional and call ``gate.try_enter``.
* A **simulated exchange** (``SimConfig.exchange_threads`` threads) answers each admitted order
  after a random latency: it rejects it, fills it in full, fills it in parts, or never answers
  (a lost order, whose reservation only the ledger's TTL can end).
* A **fill router** thread applies fills to a position cache under the cache's own lock and only
  then releases the reservation (the safe hand-off); on a reject it releases at once. Positions
  close again after a random holding time, so slots free up and the race keeps going.
* An **auditor** is told about every admitted entry, fill, reject and close, in the order they
  become true, and independently tracks the *true* exposure: open positions plus orders that
  can still fill. At every admitted decision it takes that true state with the admitted entry
  added and counts a breach whenever it exceeds a limit (positions, gross, per symbol).
* **Reservation accounting**: every reservation must end exactly once (released by the router,
  reduced to zero by the last partial fill, or expired, seen through ``on_expire``). Leaks and
  double ends are counted.

``SimConfig(broken=True)`` runs the same app on ``BrokenGate``, the classic check-then-act bug
(check under the lock, reserve in a second acquisition). The auditor must find breaches with it:
that is the proof that a zero from the real gate means something.

What callers may rely on:

* ``run_simulation(config)`` (or ``Simulation(config).run()``) returns a ``SimResult`` and leaves
  no thread behind: every thread it starts is joined before it returns, also when it raises or is
  interrupted (``KeyboardInterrupt`` in the calling thread, or ``Simulation.stop()`` from another
  thread). A thread that does not finish within a bound raises ``SimulationError`` (a likely
  deadlock in the gate) instead of hanging.
* The run is bounded in time: ``config.seconds`` of racing, then a drain bounded by the exchange
  latency and the TTL.
* Randomness is seeded: brain ``i`` uses ``random.Random(seed + i)`` for every choice about its
  orders (symbol, notional, outcome, latency, partial split); the router uses
  ``random.Random(seed + threads)`` for holding times. Thread scheduling is not reproducible, so
  the figures differ from run to run, but the stream of orders each brain *wants* does not.
* The gate is injected through a backend factory (``memory_backend`` by default), so another
  store (for example a shared one) can be raced by the same app; the sim only needs
  ``try_enter(symbol, notional, positions, *, order_id=)`` returning a decision whose reservation
  has ``release()``, ``reduce()`` and ``active`` (``pendingledger.ReservationHandle`` does).

Time: the ledger's TTL runs on the clock passed to ``Simulation``. By default that is real time
(``time.monotonic``, plus a single jump forward once the race is over and every answer has
landed, so the last lost orders expire without waiting out their TTL): this is the demo. Pass a
``pendingledger.testing.ManualClock`` and the simulation drives it itself from a driver thread,
in steps of ``ttl / 8``, only while no answered order could expire before its answer lands, and
jumps it past the TTL at the end; tests use this. Any other clock is used as given, and the drain
waits (at most ``ttl`` + 1 s) for it to pass the last TTL. Exchange latency and holding times
always use real time.

An answer that lands after its order's reservation expired (``SimResult.late_answers``, also in
``notes``) means the TTL was too short for the exchange latency under that load: the gate then
stops counting an order that can still fill, and the auditor rightly reports any breach that
follows. That is the documented trade-off of a TTL, not the race; keep the TTL well above the
worst answer latency.
"""

from __future__ import annotations

import heapq
import itertools
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final, Literal, Protocol, runtime_checkable

from .limits import Decision, DenyReason, PortfolioLimits
from .testing import ManualClock

__all__ = [
    "DEFAULT_SYMBOLS",
    "LIMIT_KINDS",
    "BackendFactory",
    "BookKeeper",
    "BrokenGate",
    "DecisionLike",
    "GateLike",
    "MemoryBackend",
    "Progress",
    "ReservationLike",
    "SimBackend",
    "SimConfig",
    "SimResult",
    "Simulation",
    "SimulationError",
    "memory_backend",
    "run_simulation",
]

DEFAULT_SYMBOLS: Final[tuple[str, ...]] = (
    "BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "LINKUSDT", "DOTUSDT", "LTCUSDT", "ATOMUSDT", "NEARUSDT", "APTUSDT", "ARBUSDT", "OPUSDT",
)  # fmt: skip
"""The symbol universe the brains trade by default; earlier symbols are picked more often."""

LIMIT_KINDS: Final[tuple[str, ...]] = ("positions", "gross", "symbol")
"""The keys of ``SimResult.breaches_by_limit``."""

_OUTCOMES: Final[tuple[str, ...]] = ("reject", "fill", "partial", "lost")
_JOIN_TIMEOUT: Final = 10.0  # seconds a thread may take to finish once told to
_BARRIER_TIMEOUT: Final = 30.0  # seconds for every brain to start
_MIN_ADMITTED_STRETCH: Final = 5.0  # min_admitted may stretch a run to this many times seconds
_GAP: Final = 0.0001  # seconds BrokenGate spends between its check and its reservation


class SimulationError(RuntimeError):
    """The simulation could not complete: a thread raised, or did not finish (likely deadlock).

    The first exception raised in a simulation thread is chained as ``__cause__``.
    """


# --------------------------------------------------------------------------- what the sim needs


class ReservationLike(Protocol):
    """What the sim uses of a reservation (``pendingledger.Reservation`` is one)."""

    @property
    def order_id(self) -> Hashable: ...

    @property
    def active(self) -> bool: ...

    def release(self) -> bool: ...

    def reduce(self, amount: int, /) -> bool: ...


class DecisionLike(Protocol):
    """What the sim uses of a decision (``pendingledger.Decision`` is one)."""

    @property
    def admitted(self) -> bool: ...

    @property
    def reason(self) -> DenyReason | None: ...

    @property
    def reservation(self) -> ReservationLike | None: ...


class GateLike(Protocol):
    """A gate the brains can race: ``PortfolioGate``, ``BrokenGate``, or another backend's.

    ``positions`` is the app's position snapshot callable, or ``None`` when the gate keeps the
    position book itself (``SimConfig.book == "gate"``).
    """

    def try_enter(
        self,
        symbol: str,
        notional: int,
        positions: Callable[[], Mapping[Any, Any]] | None = None,
        *,
        order_id: str | None = None,
    ) -> DecisionLike: ...


@runtime_checkable
class BookKeeper(Protocol):
    """A gate that owns the position book (``SimConfig.book == "gate"``), as the router uses it."""

    def set_position(self, symbol: str, exposure: int, /) -> object: ...

    def close_position(self, symbol: str, /) -> object: ...

    def confirm_fill(
        self, order_id: str, position_exposure: int, /, *, symbol: str | None = None
    ) -> bool: ...


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
    def gate(self) -> GateLike: ...

    def sweep(self) -> None: ...

    def outstanding(self) -> tuple[int, float]: ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """Builds the backend for one run; ``broken`` asks for the check-then-act variant."""

    def __call__(
        self,
        *,
        limits: PortfolioLimits,
        ttl: float,
        clock: Callable[[], float],
        on_expire: Callable[[ReservationLike], None],
        broken: bool,
    ) -> SimBackend: ...


# --------------------------------------------------------------------------- the broken gate


class BrokenGate:
    """The classic check-then-act bug, kept so the harness can prove it catches breaches.

    It applies the same rules as ``PortfolioGate`` to the same state (open positions plus
    outstanding reservations), but checks in one acquisition of the ledger lock and reserves in a
    second one. Between the two, other threads check against a state that does not yet hold this
    entry, so several can be admitted on the strength of the same room. The 0.1 ms sleep in the
    gap stands for the work a real bot does there (building, logging and sending the order). It
    does not create the bug; it makes it show up within seconds on every CPython, where a bare
    ``sleep(0)`` hands the GIL over too rarely on 3.10 to be a dependable demonstration.

    With ``book`` (a ``PortfolioGate`` on the same ledger) it also works on the gate-owned
    position book: positions are then read from ``book.positions()`` before the check, and the
    book-keeping calls are passed on to it.

    Never use this outside tests and demos.
    """

    __slots__ = ("_book", "_ledger", "_limits")

    def __init__(self, ledger: Any, limits: PortfolioLimits, *, book: Any = None) -> None:
        self._ledger = ledger
        self._limits = limits
        self._book = book

    def set_position(self, symbol: str, exposure: int, /) -> object:
        return self._book.set_position(symbol, exposure)

    def close_position(self, symbol: str, /) -> object:
        return self._book.close_position(symbol)

    def confirm_fill(
        self, order_id: str, position_exposure: int, /, *, symbol: str | None = None
    ) -> bool:
        return bool(self._book.confirm_fill(order_id, position_exposure, symbol=symbol))

    @property
    def limits(self) -> PortfolioLimits:
        return self._limits

    def try_enter(
        self,
        symbol: str,
        notional: int,
        positions: Callable[[], Mapping[str, int]] | None = None,
        *,
        order_id: str | None = None,
    ) -> Decision:
        limits = self._limits
        read = positions
        if read is None:
            seen = self._book.positions()  # it takes the ledger lock itself: read it before

            def read() -> Mapping[str, int]:
                return seen  # type: ignore[no-any-return]

        with self._ledger.lock() as pending:  # first acquisition: check
            open_positions = read()
            reason = _first_failing_rule(limits, open_positions, pending, symbol, notional)
        if reason is not None:
            return Decision(reason)
        time.sleep(_GAP)  # the gap: another brain can check against the same room now
        with self._ledger.lock() as pending:  # second acquisition: act
            reservation = pending.reserve(symbol, notional, order_id=order_id)
        return Decision(reservation=reservation)


def _first_failing_rule(
    limits: PortfolioLimits,
    positions: Mapping[str, int],
    pending: Any,
    symbol: str,
    notional: int,
) -> DenyReason | None:
    max_positions = limits.max_concurrent_positions
    if (
        max_positions is not None
        and symbol not in positions
        and symbol not in pending
        and len(positions) + pending.new_slots(positions.__contains__) >= max_positions
    ):
        return DenyReason.MAX_CONCURRENT_POSITIONS
    max_gross = limits.max_gross_exposure
    if max_gross is not None:
        gross = sum(abs(v) for v in positions.values()) + pending.gross_notional() + notional
        if gross > max_gross:
            return DenyReason.MAX_GROSS_EXPOSURE
    max_symbol = limits.max_symbol_exposure
    if max_symbol is not None:
        exposure = abs(positions.get(symbol, 0)) + pending.symbol_notional(symbol) + notional
        if exposure > max_symbol:
            return DenyReason.MAX_SYMBOL_EXPOSURE
    return None


# --------------------------------------------------------------------------- in-memory backend


class MemoryBackend:
    """In-process backend: a ``PendingEntryLedger`` with a ``PortfolioGate`` or ``BrokenGate``."""

    name = "memory"

    def __init__(
        self,
        *,
        limits: PortfolioLimits,
        ttl: float,
        clock: Callable[[], float],
        on_expire: Callable[[ReservationLike], None],
        broken: bool,
    ) -> None:
        from .gate import PortfolioGate  # noqa: PLC0415 -- keep ``import pendingledger.sim`` light
        from .ledger import PendingEntryLedger  # noqa: PLC0415

        self.ledger = PendingEntryLedger(ttl, clock=clock, on_expire=on_expire)
        real = PortfolioGate(self.ledger, limits)
        self._gate: GateLike = BrokenGate(self.ledger, limits, book=real) if broken else real

    @property
    def gate(self) -> GateLike:
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
    on_expire: Callable[[ReservationLike], None],
    broken: bool,
) -> SimBackend:
    """The default ``BackendFactory``: see ``MemoryBackend``."""
    return MemoryBackend(limits=limits, ttl=ttl, clock=clock, on_expire=on_expire, broken=broken)


# --------------------------------------------------------------------------- configuration


def _check_range(name: str, pair: tuple[float, float], *, low: float = 0.0) -> None:
    a, b = pair
    if not (math.isfinite(a) and math.isfinite(b) and low <= a <= b):
        raise ValueError(
            f"{name} must be a finite (min, max) with {low} <= min <= max, got {pair!r}"
        )


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes one simulated run. Times are seconds; amounts are ints (exact sums).

    Defaults make a demo where all three limits bind: most decisions are denied, a few hundred
    per second are admitted, and the broken gate breaches within a second.
    """

    seconds: float = 3.0
    """How long the brains race (wall clock); the drain afterwards adds latency and TTL."""
    threads: int = 64
    """Number of strategy threads (brains)."""
    seed: int = 0
    """Brain ``i`` draws from ``random.Random(seed + i)``."""
    max_positions: int | None = 5
    max_gross: int | float | None = 50_000
    max_symbol: int | float | None = 15_000
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    notional: tuple[int, int] = (1_000, 8_000)
    """Range of entry notionals, in whole ``lot`` multiples."""
    lot: int = 100
    outcome_weights: tuple[float, float, float, float] = (0.15, 0.47, 0.35, 0.03)
    """Relative weights of the exchange's answers: (reject, fill in full, fill in parts, lost)."""
    latency: tuple[float, float] = (0.001, 0.010)
    """Exchange answer latency range; partial fills arrive in 2-4 parts spread over it."""
    hold: tuple[float, float] = (0.02, 0.20)
    """How long a position stays open after its first fill before the router closes it."""
    think: tuple[float, float] = (0.0, 0.002)
    """Pause of a brain between two decisions; (0, 0) races flat out."""
    ttl: float = 1.0
    """Ledger TTL in clock seconds; must be well above the latency so answers land before it."""
    exchange_threads: int = 2
    duplicate_rate: float = 0.05
    """Share of answered orders whose last message the exchange sends twice (router must cope)."""
    max_decisions: int | None = None
    """Stop the race early after this many decisions in total."""
    stop_after_breaches: int | None = None
    """Stop the race early once the auditor has counted this many breaches."""
    min_admitted: int = 0
    """Race on past ``seconds`` until this many entries were admitted (but never past five
    times ``seconds``), so a slow or busy machine still sees the full mix of outcomes."""
    broken: bool = False
    """Race ``BrokenGate`` (check-then-act) instead of the backend's real gate."""
    book: Literal["cache", "gate"] = "cache"
    """Who keeps the positions: ``"cache"``, the app's own cache (the brains pass a snapshot
    callable to ``try_enter``; the router updates the cache, then releases), or ``"gate"``, the
    gate's own book (``try_enter`` without positions; the router calls ``confirm_fill`` for a
    full fill, ``set_position`` then ``reduce`` for a part, ``close_position`` to close)."""
    release_first: bool = False
    """Make the router hand off the wrong way round: release the reservation, then update the
    position cache. With it even a correct gate breaches, which shows the auditor checks the
    true exposure, not the gate's view, and why the README insists on cache first."""

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds)):
            raise ValueError(f"seconds must be a finite number, got {self.seconds!r}")
        if self.seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds!r}")
        for name in ("threads", "exchange_threads", "lot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.symbols or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"symbols must be non-empty and distinct, got {self.symbols!r}")
        low, high = self.notional
        if not (isinstance(low, int) and isinstance(high, int) and self.lot <= low <= high):
            raise ValueError(
                f"notional must be ints (min, max) with lot <= min <= max, got {self.notional!r}"
            )
        weights = self.outcome_weights
        if len(weights) != 4 or any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"outcome_weights must be 4 weights >= 0, not all 0, got {weights!r}")
        _check_range("latency", self.latency)
        _check_range("hold", self.hold)
        _check_range("think", self.think)
        if not (math.isfinite(self.ttl) and self.ttl > 0):
            raise ValueError(f"ttl must be finite and > 0, got {self.ttl!r}")
        if not 0 <= self.duplicate_rate <= 1:
            raise ValueError(f"duplicate_rate must be in [0, 1], got {self.duplicate_rate!r}")
        if isinstance(self.min_admitted, bool) or not isinstance(self.min_admitted, int):
            raise ValueError(f"min_admitted must be an int >= 0, got {self.min_admitted!r}")
        if self.min_admitted < 0:
            raise ValueError(f"min_admitted must be an int >= 0, got {self.min_admitted!r}")
        for name in ("max_decisions", "stop_after_breaches"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        if self.book not in ("cache", "gate"):
            raise ValueError(f"book must be 'cache' or 'gate', got {self.book!r}")
        self.limits()  # PortfolioLimits validates the three limits

    def limits(self) -> PortfolioLimits:
        """The limits the gate enforces and the auditor checks."""
        return PortfolioLimits(
            max_concurrent_positions=self.max_positions,
            max_gross_exposure=self.max_gross,
            max_symbol_exposure=self.max_symbol,
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Progress:
    """A cheap, approximate snapshot of a running simulation, for progress displays."""

    elapsed: float
    seconds: float
    decisions: int
    admitted: int
    breaches: int


@dataclass(frozen=True)
class SimResult:
    """The figures of one run. ``ok`` is what a stress test asserts.

    Exposure figures (``max_*_seen``) are the auditor's *true* state: open positions plus orders
    that can still fill, including the entry just admitted. ``breaches`` counts admitted
    decisions after which that true state exceeded at least one limit; ``breaches_by_limit``
    counts per limit (one admission can breach several). Reservation figures: every admitted
    order's reservation must end exactly once, so ``ended_released + ended_reduced +
    ended_expired == admitted`` with ``leaked == double_ended == 0`` in a healthy run.
    """

    gate: str
    backend: str
    seed: int
    threads: int
    seconds: float
    elapsed: float
    max_positions: int | None
    max_gross: float | None
    max_symbol: float | None
    decisions: int
    admitted: int
    denied: dict[str, int]
    rejected: int
    filled: int
    partially_filled: int
    lost: int
    expired: int
    closes: int
    duplicates: int
    late_answers: int
    max_positions_seen: int
    max_gross_seen: int
    max_symbol_seen: int
    breaches: int
    breaches_by_limit: dict[str, int]
    first_breach: str | None
    ended_released: int
    ended_reduced: int
    ended_expired: int
    leaked: int
    double_ended: int
    ledger_outstanding: int
    ledger_gross: float
    book: str = "cache"
    release_first: bool = False
    interrupted: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """No breach, every reservation ended exactly once, nothing left in the store."""
        return (
            self.breaches == 0
            and self.leaked == 0
            and self.double_ended == 0
            and self.ledger_outstanding == 0
            and self.ledger_gross == 0
        )

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON-ready values (``ok`` included)."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        data["ok"] = self.ok
        return data

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# --------------------------------------------------------------------------- the moving parts


@dataclass(eq=False)
class _Order:
    order_id: str
    symbol: str
    notional: int
    outcome: str
    reservation: ReservationLike
    brain: int
    # Chosen by the brain's rng: answer delays (one per message) and fill parts.
    delays: tuple[float, ...] = ()
    parts: tuple[int, ...] = ()
    duplicate: bool = False
    filled: int = 0
    done: bool = False  # the router has handled the order's last message
    late: bool = False  # an answer arrived after the reservation had expired
    admitted_at: float = 0.0  # lost orders: ledger clock read after try_enter returned


@dataclass(eq=False)
class _Message:
    kind: Literal["reject", "fill", "duplicate"]
    order: _Order
    qty: int = 0
    last: bool = False


class _BrainStats:
    __slots__ = ("admitted", "decisions", "denied", "lost")

    def __init__(self) -> None:
        self.decisions = 0
        self.admitted = 0
        self.lost = 0
        self.denied: dict[DenyReason, int] = {}


class _PositionCache:
    """The app's position cache: symbol -> open exposure, under its own lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.positions: dict[str, int] = {}

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.positions)


class _Auditor:
    """The independent truth: open positions + orders that can still fill, per symbol.

    Told about each event at the moment it becomes true for the gate's inputs, never later:
    fills and closes are recorded under the position cache's lock together with the cache
    change, rejects before the reservation is released. Admissions are recorded right after
    ``try_enter`` returns, before the order reaches the exchange; recording an admission late
    can only make the auditor see less, never invent a breach.
    """

    def __init__(self, limits: PortfolioLimits) -> None:
        self.lock = threading.Lock()
        self.limit_positions = limits.max_concurrent_positions
        self.limit_gross = limits.max_gross_exposure
        self.limit_symbol = limits.max_symbol_exposure
        self.exposure: dict[str, int] = {}  # position + in flight, only symbols with > 0
        self.gross = 0
        self.max_positions = 0
        self.max_gross = 0
        self.max_symbol = 0
        self.breaches = 0
        self.by_limit = dict.fromkeys(LIMIT_KINDS, 0)
        self.first_breach: str | None = None

    def admit(self, order: _Order) -> None:
        with self.lock:
            symbol = order.symbol
            exposure = self.exposure.get(symbol, 0) + order.notional
            self.exposure[symbol] = exposure
            self.gross += order.notional
            count = len(self.exposure)
            self.max_positions = max(self.max_positions, count)
            self.max_gross = max(self.max_gross, self.gross)
            self.max_symbol = max(self.max_symbol, exposure)
            over: list[str] = []
            if self.limit_positions is not None and count > self.limit_positions:
                over.append(f"{count} positions > {self.limit_positions}")
                self.by_limit["positions"] += 1
            if self.limit_gross is not None and self.gross > self.limit_gross:
                over.append(f"gross {self.gross} > {self.limit_gross}")
                self.by_limit["gross"] += 1
            if self.limit_symbol is not None and exposure > self.limit_symbol:
                over.append(f"{symbol} {exposure} > {self.limit_symbol}")
                self.by_limit["symbol"] += 1
            if over:
                self.breaches += 1
                if self.first_breach is None:
                    self.first_breach = (
                        f"admitting {order.order_id} ({symbol} {order.notional}): "
                        + ", ".join(over)
                    )

    def remove(self, symbol: str, amount: int) -> None:
        """An in-flight order was rejected, or a position closed."""
        if amount == 0:
            return
        with self.lock:
            left = self.exposure[symbol] - amount
            if left:
                self.exposure[symbol] = left
            else:
                del self.exposure[symbol]
            self.gross -= amount


class _Flights:
    """Which answered orders could still be hurt by a clock step (ManualClock mode only).

    ``entering`` holds, per brain inside ``try_enter``, the clock reading taken just before the
    call (the reservation it may make cannot be older); ``live`` keeps that reading for answered
    orders the router has not finished. The driver advances the clock only while every one of
    them stays younger than the TTL after the step. (Readings taken before the call are a lower
    bound of the reservation's own time, so no backend has to expose it.)
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.entering: dict[int, float] = {}
        self.live: dict[str, float] = {}

    def enter(self, brain: int) -> None:
        with self.lock:
            self.entering[brain] = self.clock()

    def leave(self, brain: int, order: _Order | None) -> None:
        with self.lock:
            entered = self.entering.pop(brain)
            if order is not None and order.outcome != "lost":
                self.live[order.order_id] = entered

    def finish(self, order_id: str) -> None:
        with self.lock:
            self.live.pop(order_id, None)

    def oldest(self) -> float:
        entering, live = self.entering, self.live
        return min(min(entering.values(), default=math.inf), min(live.values(), default=math.inf))


class _Accounts:
    """How each reservation ended, as seen by the router and by ``on_expire``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ends: dict[Hashable, list[str]] = {}
        self.unknown_expiries = 0

    def end(self, order_id: Hashable, how: str) -> None:
        with self.lock:
            self.ends.setdefault(order_id, []).append(how)

    def on_expire(self, reservation: ReservationLike) -> None:
        self.end(reservation.order_id, "expired")


class _OffsetClock:
    """``time.monotonic()`` plus an offset that only grows: real time for the whole race, and one
    jump forward at the end so the last lost orders expire without the demo waiting for them."""

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self._offset

    def jump(self, seconds: float) -> None:
        self._offset += max(0.0, seconds)


class _Exchange:
    """Delivers each order's messages to the router after their delays; one heap per thread."""

    def __init__(self, nthreads: int, deliver: Callable[[_Message], None]) -> None:
        self._deliver = deliver
        self._shards = [
            (threading.Condition(), list[tuple[float, int, _Message]]()) for _ in range(nthreads)
        ]
        self._seq = itertools.count()
        self._closing = False

    def submit(self, order: _Order) -> None:
        messages: list[_Message] = []
        if order.outcome == "reject":
            messages.append(_Message("reject", order, last=True))
        elif order.outcome in ("fill", "partial"):
            for i, qty in enumerate(order.parts):
                messages.append(_Message("fill", order, qty, last=i == len(order.parts) - 1))
        if not messages:
            return  # lost: the exchange never answers
        if order.duplicate:
            messages.append(_Message("duplicate", order))
        now = time.monotonic()
        cond, heap = self._shards[order.brain % len(self._shards)]
        with cond:
            due = now
            for message, delay in zip(messages, order.delays, strict=False):
                due += delay
                heapq.heappush(heap, (due, next(self._seq), message))
            cond.notify()

    def close(self) -> None:
        """No more submissions: each thread exits once its heap is delivered."""
        self._closing = True
        for cond, _ in self._shards:
            with cond:
                cond.notify()

    def run(self, shard: int) -> None:
        cond, heap = self._shards[shard]
        while True:
            with cond:
                while True:
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        message = heapq.heappop(heap)[2]
                        break
                    if not heap and self._closing:
                        return
                    cond.wait(min(heap[0][0] - now, 0.05) if heap else 0.05)
            self._deliver(message)


# --------------------------------------------------------------------------- the simulation


class Simulation:
    """One run of the simulated app against one gate. Use ``run()`` once.

    ``backend`` builds the store and gate (default ``memory_backend``). ``clock`` is the ledger's
    clock: ``None`` for real time (real TTLs, one jump at the end), or a ``ManualClock`` that the
    simulation drives itself (see the module docstring). ``stop()`` may be called from any
    thread to end the race early; the run still drains and returns its figures
    (``interrupted`` is set).
    """

    def __init__(
        self,
        config: SimConfig,
        *,
        backend: BackendFactory = memory_backend,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self._backend_factory = backend
        self._offset: _OffsetClock | None = None
        self._clock: Callable[[], float]
        if clock is None:
            self._clock = self._offset = _OffsetClock()
        else:
            self._clock = clock
        self._manual = clock if isinstance(clock, ManualClock) else None
        self._limits = config.limits()
        self._stop = threading.Event()  # brains: stop deciding
        self._driver_stop = threading.Event()
        self._interrupted = False
        self._used = False
        self._errors: list[tuple[str, BaseException]] = []
        self._errors_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._brain_stats = [_BrainStats() for _ in range(config.threads)]
        self._decision_count = itertools.count(1)
        self._cache = _PositionCache()
        self._auditor = _Auditor(self._limits)
        self._accounts = _Accounts()
        self._flights = _Flights(self._clock) if self._manual is not None else None
        self._router_queue: queue.Queue[_Message | None] = queue.Queue()
        self._exchange = _Exchange(config.exchange_threads, self._router_queue.put)
        self._orders: list[_Order] = []  # every admitted order (list.append is atomic)
        self._started_at: float | None = None
        self._outcome_cum = list(itertools.accumulate(config.outcome_weights))
        n = len(config.symbols)
        self._symbol_cum = list(itertools.accumulate(1.0 / (1 + i / 2) for i in range(n)))
        # router figures (router thread only)
        self._rejected = self._filled = self._partial = self._closes = self._duplicates = 0
        self._late = 0
        self._barrier: threading.Barrier | None = None
        self._book: BookKeeper | None = None  # the gate, when it owns the position book

    # ---------------------------------------------------------------- public

    def stop(self) -> None:
        """End the race early (from any thread); ``run()`` then drains and returns."""
        self._interrupted = True
        self._stop.set()

    def progress(self) -> Progress:
        """Approximate live figures, safe to call from any thread while ``run()`` is going."""
        started = self._started_at
        elapsed = 0.0 if started is None else time.monotonic() - started
        decisions = admitted = 0
        for stats in self._brain_stats:
            decisions += stats.decisions
            admitted += stats.admitted
        return Progress(
            elapsed=min(elapsed, self.config.seconds),
            seconds=self.config.seconds,
            decisions=decisions,
            admitted=admitted,
            breaches=self._auditor.breaches,
        )

    def run(
        self,
        on_progress: Callable[[Progress], object] | None = None,
        *,
        interval: float = 0.1,
    ) -> SimResult:
        """Race for ``config.seconds``, drain, and return the figures.

        ``on_progress`` is called from this thread about every ``interval`` seconds while the
        brains race. Raises ``SimulationError`` if a simulation thread raised or hung; a
        ``KeyboardInterrupt`` stops every thread before it propagates.
        """
        if self._used:
            raise RuntimeError("a Simulation runs once; make a new one")
        self._used = True
        config = self.config
        backend = self._backend_factory(
            limits=self._limits,
            ttl=config.ttl,
            clock=self._clock,
            on_expire=self._accounts.on_expire,
            broken=config.broken,
        )
        barrier = self._barrier = threading.Barrier(config.threads + 1)
        try:
            if config.book == "gate":
                if not isinstance(backend.gate, BookKeeper):
                    raise TypeError(
                        f"book='gate' needs a gate with its own position book "
                        f"(set_position, close_position, confirm_fill), got {backend.gate!r}"
                    )
                self._book = backend.gate
            self._spawn("router", self._route)
            for shard in range(config.exchange_threads):
                self._spawn(f"exchange-{shard}", self._exchange.run, shard)
            if self._manual is not None:
                self._spawn("clock-driver", self._drive_clock)
            brains = [
                self._spawn(f"brain-{i}", self._brain, i, backend.gate, barrier)
                for i in range(config.threads)
            ]
            barrier.wait(_BARRIER_TIMEOUT)
            self._started_at = start = time.monotonic()
            deadline = start + config.seconds
            limit = config.stop_after_breaches
            hard_deadline = start + config.seconds * _MIN_ADMITTED_STRETCH
            while not self._stop.is_set():
                now = time.monotonic()
                if limit is not None and self._auditor.breaches >= limit:
                    break
                if now >= deadline and (
                    now >= hard_deadline or self.progress().admitted >= config.min_admitted
                ):
                    break
                self._stop.wait(max(0.001, min(interval, deadline - now)))
                if on_progress is not None:
                    on_progress(self.progress())
            elapsed = time.monotonic() - start
            self._stop.set()
            self._join(brains)
            return self._drain(backend, elapsed)
        except BaseException:
            self._interrupted = True
            raise
        finally:
            self._shutdown()
            backend.close()

    # ---------------------------------------------------------------- threads

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:
                with self._errors_lock:
                    self._errors.append((name, exc))
                self._stop.set()

        # daemon only as a last resort: every thread is joined (and a hang reported) before
        # run() returns, but a deadlocked gate must not keep the interpreter from exiting.
        thread = threading.Thread(target=guarded, name=f"sim-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _join(self, threads: Sequence[threading.Thread]) -> None:
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._raise_errors()
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise SimulationError(
                f"{len(stuck)} thread(s) still running {_JOIN_TIMEOUT:.0f}s after being told to "
                f"stop (deadlock in the gate?): {', '.join(stuck[:8])}"
            )

    def _raise_errors(self) -> None:
        with self._errors_lock:
            errors = list(self._errors)
        if errors:
            name, exc = errors[0]
            raise SimulationError(f"simulation thread {name} raised {exc!r}") from exc

    def _shutdown(self) -> None:
        """Stop every thread, whatever state the run is in, and join them (bounded)."""
        self._stop.set()
        self._driver_stop.set()
        if self._barrier is not None:
            self._barrier.abort()  # brains still waiting to start give up at once
        self._exchange.close()
        self._router_queue.put(None)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _brain(self, index: int, gate: GateLike, barrier: threading.Barrier) -> None:
        config = self.config
        rng = random.Random(config.seed + index)
        stats = self._brain_stats[index]
        symbols, symbol_cum = config.symbols, self._symbol_cum
        outcome_cum = self._outcome_cum
        lot = config.lot
        low, high = config.notional[0] // lot, config.notional[1] // lot
        lat_low, lat_high = config.latency
        think_low, think_high = config.think
        snapshot = self._cache.snapshot if self._book is None else None
        flights = self._flights
        auditor = self._auditor
        exchange = self._exchange
        max_decisions = config.max_decisions
        stop = self._stop
        barrier.wait(_BARRIER_TIMEOUT)
        for n in itertools.count():
            if stop.is_set():
                return
            # Everything random about this order is drawn up front, so a seed replays the
            # same wishes whatever the gate decides.
            symbol = rng.choices(symbols, cum_weights=symbol_cum)[0]
            notional = rng.randint(low, high) * lot
            outcome = rng.choices(_OUTCOMES, cum_weights=outcome_cum)[0]
            parts: tuple[int, ...] = (notional,)
            if outcome == "partial":
                parts = _split(rng, notional, lot, rng.randint(2, 4))
            delays = tuple(
                rng.uniform(lat_low, lat_high) / (1 if i == 0 else len(parts))
                for i in range(len(parts) + 1)
            )
            duplicate = rng.random() < config.duplicate_rate
            pause = rng.uniform(think_low, think_high)
            order_id = f"b{index}-{n}"

            if flights is not None:
                flights.enter(index)
            order: _Order | None = None
            try:
                if snapshot is None:
                    decision = gate.try_enter(symbol, notional, order_id=order_id)
                else:
                    decision = gate.try_enter(symbol, notional, snapshot, order_id=order_id)
                reservation = decision.reservation
                if decision.admitted and reservation is not None:
                    order = _Order(
                        order_id,
                        symbol,
                        notional,
                        outcome,
                        reservation,
                        index,
                        delays,
                        parts,
                        duplicate,
                    )
            finally:
                if flights is not None:
                    flights.leave(index, order)
            stats.decisions += 1
            if order is None:
                reason = decision.reason
                if reason is not None:
                    stats.denied[reason] = stats.denied.get(reason, 0) + 1
            else:
                stats.admitted += 1
                self._orders.append(order)
                if outcome == "lost":
                    # Never answered: it can never fill, so it is no exposure; only the
                    # ledger's TTL can end its reservation.
                    stats.lost += 1
                    order.admitted_at = self._clock()  # it expires by admitted_at + ttl
                else:
                    auditor.admit(order)
                    exchange.submit(order)
            if max_decisions is not None and next(self._decision_count) >= max_decisions:
                stop.set()
            if pause > 0:
                time.sleep(pause)

    def _route(self) -> None:
        """The fill router: cache first, then release. Also closes positions after their hold."""
        config = self.config
        rng = random.Random(config.seed + config.threads)
        hold_low, hold_high = config.hold
        closes: list[tuple[float, int, str]] = []
        seq = itertools.count()
        get = self._router_queue.get
        while True:
            timeout = 0.05
            if closes:
                timeout = max(0.0, min(timeout, closes[0][0] - time.monotonic()))
            try:
                message = get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                if message is None:
                    break
                if self._handle(message):
                    due = time.monotonic() + rng.uniform(hold_low, hold_high)
                    heapq.heappush(closes, (due, next(seq), message.order.symbol))
            now = time.monotonic()
            while closes and closes[0][0] <= now:
                self._close(heapq.heappop(closes)[2])
        # Drained: flatten whatever is still open, so the run ends flat.
        with self._cache.lock:
            remaining = list(self._cache.positions)
        for symbol in remaining:
            self._close(symbol)

    def _close(self, symbol: str) -> None:
        cache = self._cache
        with cache.lock:
            qty = cache.positions.pop(symbol, 0)
            if self._book is None:
                self._auditor.remove(symbol, qty)  # atomically with the cache change
        if self._book is not None and qty:
            # The gate's book changes under the gate's lock, which the auditor cannot share:
            # tell the auditor first (it may under-count for a moment, never invent a breach).
            self._auditor.remove(symbol, qty)
            self._book.close_position(symbol)
        if qty:
            self._closes += 1

    def _handle(self, message: _Message) -> bool:
        """Apply one exchange message. Returns True if a position opened on its symbol."""
        order = message.order
        reservation = order.reservation
        accounts = self._accounts
        if message.kind == "duplicate" or order.done:
            # The exchange repeated a message we already acted on: the reservation has ended,
            # so releasing it again must be a no-op.
            self._duplicates += 1
            if reservation.release():
                accounts.end(order.order_id, "released-again")
            return False
        if not reservation.active:
            self._mark_late(order)  # expired before its answer landed
        if message.kind == "reject":
            self._auditor.remove(order.symbol, order.notional)  # before the gate may see room
            order.done = True
            self._rejected += 1
            self._end(order, reservation.release(), "released")
            return False
        # A fill (whole or part): position cache first, then the reservation.
        book = self._book
        if book is not None and order.outcome == "fill" and not self.config.release_first:
            # The gate's own book: position and end of reservation in one step.
            opened = self._apply_fill(message, tell_book=False)
            order.done = True
            self._filled += 1
            position = self._cache.positions[order.symbol]  # only this thread writes it
            ended = book.confirm_fill(order.order_id, position, symbol=order.symbol)
            self._end(order, ended, "released")
            return opened
        if self.config.release_first:
            self._end_fill(message)
            time.sleep(_GAP)  # the gap in which the gate sees neither the order nor its position
            return self._apply_fill(message)
        opened = self._apply_fill(message)
        self._end_fill(message)
        return opened

    def _apply_fill(self, message: _Message, *, tell_book: bool = True) -> bool:
        """Put a fill in the position cache (and the gate's book, in book mode).

        Returns True if it opened a position. The auditor's exposure for the symbol does not
        change: the quantity moves from in flight to the position.
        """
        order = message.order
        cache = self._cache
        with cache.lock:
            before = cache.positions.get(order.symbol, 0)
            after = cache.positions[order.symbol] = before + message.qty
        if tell_book and self._book is not None:
            self._book.set_position(order.symbol, after)
        order.filled += message.qty
        return before == 0

    def _end_fill(self, message: _Message) -> None:
        """Release (full fill) or reduce (partial fill) the order's reservation."""
        order = message.order
        reservation = order.reservation
        if order.outcome == "fill":
            order.done = True
            self._filled += 1
            self._end(order, reservation.release(), "released")
            return
        applied = reservation.reduce(message.qty)  # the last part brings it to zero
        if message.last:
            order.done = True
            self._partial += 1
            self._end(order, applied, "reduced")
        elif not applied:
            self._mark_late(order)

    def _end(self, order: _Order, ended: bool, how: str) -> None:
        """Book the router's ending of ``order``'s reservation (``ended``: it was still active)."""
        if ended:
            self._accounts.end(order.order_id, how)
        else:
            self._mark_late(order)  # the TTL ended it first
        if self._flights is not None:
            self._flights.finish(order.order_id)

    def _mark_late(self, order: _Order) -> None:
        """The reservation expired while the order could still fill (TTL too short for the
        latency under this load): every answered order that expired is counted here once."""
        if not order.late:
            order.late = True
            self._late += 1

    def _drive_clock(self) -> None:
        """ManualClock mode: move time on in small safe steps so lost orders expire mid-race."""
        manual = self._manual
        flights = self._flights
        assert manual is not None and flights is not None
        ttl = self.config.ttl
        step = ttl / 8
        while not self._driver_stop.wait(0.001):
            with flights.lock:
                if manual() + 2 * step <= flights.oldest() + ttl:
                    manual.advance(step)

    # ---------------------------------------------------------------- drain and figures

    def _drain(self, backend: SimBackend, elapsed: float) -> SimResult:
        """After the brains stopped: deliver every answer, end lost orders by TTL, count."""
        self._exchange.close()
        self._join([t for t in self._threads if t.name.startswith("sim-exchange-")])
        self._router_queue.put(None)
        self._join([t for t in self._threads if t.name == "sim-router"])
        self._driver_stop.set()
        self._join([t for t in self._threads if t.name == "sim-clock-driver"])
        ttl = self.config.ttl
        lost = [o.admitted_at for o in self._orders if o.outcome == "lost"]
        if lost:
            # Every answered order has been handled, so jumping the clock past the last lost
            # order's TTL cannot expire anything else early.
            expires = max(lost) + ttl
            lag = expires - self._clock()
            if getattr(backend, "server_clock", False):
                give_up = time.monotonic() + ttl + 1.0
                while backend.outstanding()[0] and time.monotonic() < give_up:
                    time.sleep(0.02)
                    backend.sweep()
            elif self._manual is not None:
                if lag >= 0:
                    self._manual.advance(lag + ttl / 8)
            elif self._offset is not None:
                if lag >= 0:
                    self._offset.jump(lag + ttl / 8)
            else:
                give_up = time.monotonic() + ttl + 1.0
                while self._clock() <= expires and time.monotonic() < give_up:
                    time.sleep(min(0.01, max(0.001, expires - self._clock())))
        backend.sweep()
        return self._figures(backend, elapsed)

    def _figures(self, backend: SimBackend, elapsed: float) -> SimResult:
        config = self.config
        decisions = admitted = lost = 0
        denied = {r.value: 0 for r in DenyReason if r not in _OTHER_BACKEND_REASONS}
        for stats in self._brain_stats:
            decisions += stats.decisions
            admitted += stats.admitted
            lost += stats.lost
            for reason, count in stats.denied.items():
                denied[reason.value] = denied.get(reason.value, 0) + count
        ends = self._accounts.ends
        how = {"released": 0, "reduced": 0, "expired": 0}
        leaked = double = 0
        for order in self._orders:
            order_ends = ends.get(order.order_id, ())
            if not order_ends or order.reservation.active:
                leaked += 1  # never ended, or ended per the books yet still active
            if len(order_ends) > 1:
                double += 1
            if order_ends and order_ends[0] in how:
                how[order_ends[0]] += 1
        notes: list[str] = []
        known = {o.order_id for o in self._orders}
        strangers = sum(1 for oid in ends if oid not in known)
        if strangers:
            double += strangers
            notes.append(f"{strangers} reservation(s) ended that no brain was admitted")
        outstanding, gross = backend.outstanding()
        if self._late:
            notes.append(
                f"{self._late} answer(s) arrived after their reservation expired: "
                "the TTL is too short for the exchange latency"
            )
        auditor = self._auditor
        return SimResult(
            gate="broken" if config.broken else "pendingledger",
            backend=backend.name,
            seed=config.seed,
            threads=config.threads,
            seconds=config.seconds,
            elapsed=round(elapsed, 3),
            max_positions=config.max_positions,
            max_gross=config.max_gross,
            max_symbol=config.max_symbol,
            decisions=decisions,
            admitted=admitted,
            denied=denied,
            rejected=self._rejected,
            filled=self._filled,
            partially_filled=self._partial,
            lost=lost,
            expired=how["expired"],
            closes=self._closes,
            duplicates=self._duplicates,
            late_answers=self._late,
            max_positions_seen=auditor.max_positions,
            max_gross_seen=auditor.max_gross,
            max_symbol_seen=auditor.max_symbol,
            breaches=auditor.breaches,
            breaches_by_limit=dict(auditor.by_limit),
            first_breach=auditor.first_breach,
            ended_released=how["released"],
            ended_reduced=how["reduced"],
            ended_expired=how["expired"],
            leaked=leaked,
            double_ended=double,
            ledger_outstanding=outstanding,
            ledger_gross=_plain(gross),
            book=config.book,
            release_first=config.release_first,
            interrupted=self._interrupted,
            notes=tuple(notes),
        )


_OTHER_BACKEND_REASONS: Final = frozenset(
    {DenyReason.BACKEND_UNAVAILABLE, DenyReason.BOOK_NOT_RESTORED}
)


def _plain(value: float | int | Decimal | Fraction) -> float:
    return float(value)


def _split(rng: random.Random, notional: int, lot: int, parts: int) -> tuple[int, ...]:
    """Split ``notional`` into up to ``parts`` positive whole-lot parts that add up exactly."""
    lots = notional // lot
    parts = min(parts, lots)
    if parts <= 1:
        return (notional,)
    cuts = sorted(rng.sample(range(1, lots), parts - 1))
    bounds = [0, *cuts, lots]
    return tuple((b - a) * lot for a, b in itertools.pairwise(bounds))


def run_simulation(
    config: SimConfig,
    *,
    backend: BackendFactory = memory_backend,
    clock: Callable[[], float] | None = None,
    on_progress: Callable[[Progress], object] | None = None,
) -> SimResult:
    """Run one simulation to completion; see ``Simulation``."""
    return Simulation(config, backend=backend, clock=clock).run(on_progress)
