"""The simulated app itself: ``Simulation`` runs brains, exchange, router and auditor to a result.

See ``pendingledger.sim`` for the whole story. ``Simulation(config).run()`` (or
``run_simulation``) starts every thread, races for ``config.seconds``, drains, and returns the
``SimResult``; every thread it starts is joined before it returns.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final

from pendingledger.limits import Decision, DenyReason
from pendingledger.protocols import Gate, ReservationHandle
from pendingledger.sim.auditor import Accounts, Auditor
from pendingledger.sim.backends import (
    BackendFactory,
    CacheGate,
    SimBackend,
    SimGate,
    memory_backend,
)
from pendingledger.sim.broken import GAP
from pendingledger.sim.clocks import Flights, OffsetClock
from pendingledger.sim.config import ACCOUNT, Progress, SimConfig, SimResult
from pendingledger.sim.exchange import OUTCOMES, Exchange, Message, Order
from pendingledger.testing import ManualClock
from pendingledger.trading import Side

__all__ = ["Simulation", "SimulationError", "run_simulation"]

_JOIN_TIMEOUT: Final = 10.0  # seconds a thread may take to finish once told to
_BARRIER_TIMEOUT: Final = 30.0  # seconds for every brain to start
_MIN_ADMITTED_STRETCH: Final = 5.0  # min_admitted may stretch a run to this many times seconds


class SimulationError(RuntimeError):
    """The simulation could not complete: a thread raised, or did not finish (likely deadlock).

    The first exception raised in a simulation thread is chained as ``__cause__``.
    """


class _BrainStats:
    __slots__ = ("admitted", "buys", "decisions", "denied", "denied_at", "lost", "scoped", "sells")

    def __init__(self) -> None:
        self.decisions = 0
        self.admitted = 0
        self.lost = 0
        self.buys = 0
        self.sells = 0
        self.denied: dict[DenyReason, int] = {}
        # (the scope that denied: Decision.scope, reason) -> count
        self.denied_at: dict[tuple[str | None, DenyReason], int] = {}
        # strategy traded (None: the account's own) -> [decisions, admitted]
        self.scoped: dict[str | None, list[int]] = {}

    def count(self, strategy: str | None, decision: Decision, admitted: bool) -> None:
        """Count one decision under ``strategy`` (this thread's stats only)."""
        self.decisions += 1
        scoped = self.scoped.get(strategy)
        if scoped is None:
            scoped = self.scoped[strategy] = [0, 0]
        scoped[0] += 1
        if admitted:
            scoped[1] += 1
            return
        reason = decision.reason
        if reason is not None:
            self.denied[reason] = self.denied.get(reason, 0) + 1
            key = (decision.scope, reason)
            self.denied_at[key] = self.denied_at.get(key, 0) + 1


class _PositionCache:
    """The app's position cache: symbol -> open exposure, under its own lock; with strategies,
    one per strategy (``book(strategy)``; ``positions`` is the account's own)."""

    def __init__(self, strategies: Sequence[str] = ()) -> None:
        self.lock = threading.Lock()
        self.positions: dict[str, int] = {}
        self.parts: dict[str | None, dict[str, int]] = {None: self.positions}
        for name in strategies:
            self.parts[name] = {}

    def book(self, strategy: str | None) -> dict[str, int]:
        return self.parts[strategy]

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.positions)


class _Wish:
    """Everything a brain drew for one order, before asking the gate."""

    __slots__ = (
        "delays", "duplicate", "notional", "order_id", "outcome", "parts", "pause", "reduce",
        "side", "strategy", "symbol",
    )  # fmt: skip

    def __init__(
        self,
        symbol: str,
        notional: int,
        outcome: str,
        parts: tuple[int, ...],
        delays: tuple[float, ...],
        duplicate: bool,
        pause: float,
        order_id: str,
        side: Side,
        reduce: bool,
        strategy: str | None = None,
    ) -> None:
        self.strategy = strategy
        self.symbol = symbol
        self.notional = notional
        self.outcome = outcome
        self.parts = parts
        self.delays = delays
        self.duplicate = duplicate
        self.pause = pause
        self.order_id = order_id
        self.side = side
        self.reduce = reduce  # reduce the position held, if any (see _Wishes.next)

    def order(self, reservation: ReservationHandle, index: int) -> Order:
        return Order(
            self.order_id, self.symbol, self.notional, self.outcome, reservation, index,
            self.delays, self.parts, self.duplicate, side=self.side, strategy=self.strategy,
        )  # fmt: skip

    def against(self, position: int, lot: int) -> None:
        """Make this wish reduce ``position`` (signed, whole lots): the opposite side, for at
        most the position's size. The outcome's parts are cut down to the new notional."""
        self.side = Side.SELL if position > 0 else Side.BUY
        notional = min(self.notional, abs(position))
        if notional != self.notional:
            self.notional = notional
            self.parts = _fit(self.parts, notional, lot)


class _Wishes:
    """One brain's stream of wishes: ``random.Random(seed + brain)``, every draw about an order
    made up front, so a seed replays the same wishes whatever the gate decides."""

    def __init__(
        self, config: SimConfig, symbol_cum: list[float], outcome_cum: list[float], brain: int
    ) -> None:
        self._rng = random.Random(config.seed + brain)
        self._brain = brain
        self._symbols = config.symbols
        self._symbol_cum = symbol_cum
        self._outcome_cum = outcome_cum
        self._lot = config.lot
        self._low, self._high = config.notional[0] // config.lot, config.notional[1] // config.lot
        self._latency = config.latency
        self._think = config.think
        self._duplicate_rate = config.duplicate_rate
        self._sell_share = config.sell_share
        self._reduce_share = config.reduce_share
        self._strategy = config.strategy_of(brain)

    def next(self, n: int) -> _Wish:
        """The brain's ``n``-th wish (draws in a fixed order: the seed fixes every one)."""
        rng = self._rng
        symbol = rng.choices(self._symbols, cum_weights=self._symbol_cum)[0]
        notional = rng.randint(self._low, self._high) * self._lot
        outcome = rng.choices(OUTCOMES, cum_weights=self._outcome_cum)[0]
        parts: tuple[int, ...] = (notional,)
        if outcome == "partial":
            parts = _split(rng, notional, self._lot, rng.randint(2, 4))
        lat_low, lat_high = self._latency
        delays = tuple(
            rng.uniform(lat_low, lat_high) / (1 if i == 0 else len(parts))
            for i in range(len(parts) + 1)
        )
        duplicate = rng.random() < self._duplicate_rate
        pause = rng.uniform(*self._think)
        order_id = f"b{self._brain}-{n}"
        side = Side.SELL if rng.random() < self._sell_share else Side.BUY
        reduce = rng.random() < self._reduce_share
        return _Wish(
            symbol, notional, outcome, parts, delays, duplicate, pause, order_id, side, reduce,
            self._strategy,
        )  # fmt: skip


# --------------------------------------------------------------------------- the simulation


class Simulation:
    """One run of the simulated app against one gate. Use ``run()`` once.

    ``backend`` builds the store and gate (default ``memory_backend``). ``clock`` is the ledger's
    clock: ``None`` for real time (real TTLs, one jump at the end), or a ``ManualClock`` that the
    simulation drives itself (see the module docstring). ``stop()`` may be called from any
    thread to end the race early; the run still drains and returns its figures
    (``interrupted`` is set).

    ``share``: this run is one share of a larger app (one process of several racing a shared
    store); its own auditor then leaves the net limit to the shared readings. ``first_brain``
    numbers this run's brains from there on, for such a share: brain ``i`` is then brain
    ``first_brain + i`` of the app, which seeds its randomness and names its orders
    (``b<brain>-<n>``), so order ids stay unique across the shares.
    """

    def __init__(
        self,
        config: SimConfig,
        *,
        backend: BackendFactory = memory_backend,
        clock: Callable[[], float] | None = None,
        first_brain: int = 0,
        share: bool = False,
    ) -> None:
        if isinstance(first_brain, bool) or not isinstance(first_brain, int) or first_brain < 0:
            raise ValueError(f"first_brain must be an int >= 0, got {first_brain!r}")
        self.config = config
        self._first_brain = first_brain
        self._share = share
        self._backend_factory = backend
        self._offset: OffsetClock | None = None
        self._clock: Callable[[], float]
        if clock is None:
            self._clock = self._offset = OffsetClock()
        else:
            self._clock = clock
        self._manual = clock if isinstance(clock, ManualClock) else None
        self._limits = config.limits()
        self._budgets = config.budgets()
        if share and self._budgets:
            raise ValueError("strategies are raced in one process only")
        self._stop = threading.Event()  # brains: stop deciding
        self._driver_stop = threading.Event()
        self._interrupted = False
        self._used = False
        self._errors: list[tuple[str, BaseException]] = []
        self._errors_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # One per brain, and the last one the router's (its closing orders).
        self._brain_stats = [_BrainStats() for _ in range(config.threads + 1)]
        self._decision_count = itertools.count(1)
        self._cache = _PositionCache(tuple(self._budgets))
        # One share of a larger app sees its own symbols only: every figure but the net is then
        # a lower bound of the whole app's, while its own net can exceed the app's (its longs
        # without the other shares' shorts), so a share does not judge the net limit.
        self._auditor = Auditor(
            replace(self._limits, max_net_exposure=None) if share else self._limits,
            self._budgets,
        )
        self._accounts = Accounts()
        self._flights = Flights(self._clock) if self._manual is not None else None
        self._router_queue: queue.Queue[Message | None] = queue.Queue()
        self._exchange = Exchange(config.exchange_threads, self._router_queue.put)
        self._orders: list[Order] = []  # every admitted order (list.append is atomic)
        self._started_at: float | None = None
        self._outcome_cum = list(itertools.accumulate(config.outcome_weights))
        n = len(config.symbols)
        self._symbol_cum = list(itertools.accumulate(1.0 / (1 + i / 2) for i in range(n)))
        # router figures (router thread only)
        self._rejected = self._filled = self._partial = self._closes = self._duplicates = 0
        self._late = 0
        self._longs = self._shorts = 0
        self._close_seq = itertools.count()
        self._gate: SimGate | None = None  # the router sends its closing orders through it
        self._cache_gate: CacheGate | None = None
        self._barrier: threading.Barrier | None = None
        self._book: Gate | None = None  # the gate, when it owns the position book

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

    def wait_for_admissions(self, count: int, timeout: float) -> bool:
        """Block until the auditor has recorded ``count`` admissions (every scope's, lost
        orders and closes included); False if ``timeout`` seconds passed first. For a test's
        hold on the broken gate's gap (``MemoryBackend(between=)``)."""
        return self._auditor.wait_for_admissions(count, timeout)

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
        factory = self._backend_factory
        if self._budgets:
            backend = factory(
                limits=self._limits, ttl=config.ttl, clock=self._clock,
                on_expire=self._accounts.on_expire, broken=config.broken, budgets=self._budgets,
            )  # fmt: skip
        else:  # budgets= only with strategies: a factory written before them need not take it
            backend = factory(
                limits=self._limits, ttl=config.ttl, clock=self._clock,
                on_expire=self._accounts.on_expire, broken=config.broken,
            )  # fmt: skip
        barrier = self._barrier = threading.Barrier(config.threads + 1)
        try:
            gate, cache_gate = self._gates(backend)
            self._gate, self._cache_gate = gate, cache_gate
            self._spawn("router", self._route)
            for shard in range(config.exchange_threads):
                self._spawn(f"exchange-{shard}", self._exchange.run, shard)
            if self._manual is not None:
                self._spawn("clock-driver", self._drive_clock)
            brains = [
                self._spawn(f"brain-{i}", self._brain, i, gate, cache_gate, barrier)
                for i in range(config.threads)
            ]
            barrier.wait(_BARRIER_TIMEOUT)
            elapsed = self._race(on_progress, interval)
            self._stop.set()
            self._join(brains)
            return self._drain(backend, elapsed)
        except BaseException:
            self._interrupted = True
            raise
        finally:
            self._shutdown()
            backend.close()

    def _gates(self, backend: SimBackend) -> tuple[SimGate, CacheGate | None]:
        """The gate the brains race, and the same gate as a ``CacheGate`` when they pass it the
        app's position cache (``book="cache"``); with ``book="gate"`` it keeps the book."""
        gate = backend.gate
        if self.config.book == "gate":
            if not isinstance(gate, Gate):
                raise TypeError(
                    f"book='gate' needs a gate with its own position book "
                    f"(set_position, close_position, confirm_fill), got {gate!r}"
                )
            self._book = gate
            return gate, None
        if not isinstance(gate, CacheGate):
            raise TypeError(f"the simulation needs a gate with try_enter, got {gate!r}")
        return gate, gate

    def _race(self, on_progress: Callable[[Progress], object] | None, interval: float) -> float:
        """Let the brains race until the config says stop; the seconds it lasted."""
        config = self.config
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
        return time.monotonic() - start

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
            # A Ctrl-C inside Thread.start() can leave a thread listed but not started, and
            # join() would raise RuntimeError over the KeyboardInterrupt; it sees the stop
            # event when it does run (and is a daemon).
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _brain(
        self,
        index: int,
        gate: SimGate,
        cache_gate: CacheGate | None,
        barrier: threading.Barrier,
    ) -> None:
        """One strategy thread. ``cache_gate`` is the gate to call with the app's position
        cache (``book == "cache"``); ``None`` when the gate keeps the book."""
        config = self.config
        brain = self._first_brain + index  # this brain's number in the whole app
        wishes = _Wishes(config, self._symbol_cum, self._outcome_cum, brain)
        stats = self._brain_stats[index]
        max_decisions = config.max_decisions
        stop = self._stop
        barrier.wait(_BARRIER_TIMEOUT)
        for n in itertools.count():
            if stop.is_set():
                return
            wish = wishes.next(n)
            if wish.reduce:
                with self._cache.lock:
                    held = self._cache.book(wish.strategy).get(wish.symbol, 0)
                if held:
                    wish.against(held, config.lot)
            order = self._enter(index, gate, cache_gate, wish, stats)
            if order is not None:
                self._admitted(order, stats)
            if max_decisions is not None and next(self._decision_count) >= max_decisions:
                stop.set()
            if wish.pause > 0:
                time.sleep(wish.pause)

    def _enter(
        self,
        index: int,
        gate: SimGate,
        cache_gate: CacheGate | None,
        wish: _Wish,
        stats: _BrainStats,
    ) -> Order | None:
        """Ask the gate for ``wish``'s entry; the admitted order, or None (counted either way)."""
        flights = self._flights
        if flights is not None:
            flights.enter(index)
        order: Order | None = None
        try:
            symbol, notional, oid, side = wish.symbol, wish.notional, wish.order_id, wish.side
            if wish.strategy is not None:
                assert self._book is not None  # strategies need the gate's own book
                decision = self._book.try_enter(
                    symbol, notional, order_id=oid, side=side, strategy=wish.strategy
                )
            elif cache_gate is None:
                decision = gate.try_enter(symbol, notional, order_id=oid, side=side)
            else:
                snapshot = self._cache.snapshot
                decision = cache_gate.try_enter(symbol, notional, snapshot, order_id=oid, side=side)
            reservation = decision.reservation
            if decision.admitted and reservation is not None:
                order = wish.order(reservation, index)
        finally:
            if flights is not None:
                flights.leave(index, order)
        stats.count(wish.strategy, decision, order is not None)
        return order

    def _admitted(self, order: Order, stats: _BrainStats) -> None:
        """Book an admitted order: to the exchange and the auditor, or lost (only the TTL ends
        it)."""
        stats.admitted += 1
        if order.side is Side.BUY:
            stats.buys += 1
        else:
            stats.sells += 1
        self._orders.append(order)
        # A lost order is never answered: it can never fill, so it is no exposure (the auditor
        # counts it against the order caps only); only the ledger's TTL can end its reservation.
        self._auditor.admit(order)
        if order.outcome == "lost":
            stats.lost += 1
            order.admitted_at = self._clock()  # it expires by admitted_at + ttl
        else:
            self._exchange.submit(order)

    def _route(self) -> None:
        """The fill router: cache first, then release. Also closes positions after their hold,
        with closing orders through the gate."""
        config = self.config
        rng = random.Random(config.seed + self._first_brain + config.threads)
        hold_low, hold_high = config.hold
        closes: list[tuple[float, int, _Part]] = []
        closing: set[_Part] = set()  # positions (a strategy's part of a symbol) with a close due
        seq = itertools.count()
        get = self._router_queue.get

        def due(part: _Part, low: float, high: float) -> None:
            closing.add(part)
            heapq.heappush(closes, (time.monotonic() + rng.uniform(low, high), next(seq), part))

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
                self._handle(message)
                order = message.order
                part = (order.strategy, order.symbol)
                if part not in closing and self._cache.book(order.strategy).get(order.symbol, 0):
                    due(part, hold_low, hold_high)
            now = time.monotonic()
            # Answers first: a close is a decision and a fill, and while it runs the answers
            # wait; an answer that waits past its order's TTL lands after the reservation ended.
            while closes and closes[0][0] <= now and self._router_queue.empty():
                part = heapq.heappop(closes)[2]
                closing.discard(part)
                if not self._close(*part) and not self._stop.is_set():
                    due(part, hold_low / 4, hold_high / 4)  # the gate said no: try again soon
        # Drained: flatten whatever is still open, so the run ends flat. Not a share of a larger
        # app: the other shares may still be racing, and a position dropped behind the gate's
        # back can raise the shared net (a long gone beside their shorts); whoever made the
        # shared store clears it.
        if self._share:
            return
        with self._cache.lock:
            remaining = [(s, sym) for s, book in self._cache.parts.items() for sym in book]
        for strategy, symbol in remaining:
            self._flatten(symbol, strategy)

    def _close(self, strategy: str | None, symbol: str) -> bool:
        """Close ``symbol``'s position (``strategy``'s part) with an order through the gate
        (the opposite side, the position's size, under that strategy), filled at once. False if
        the gate denied it (pending orders on the other side would raise the worst case past a
        limit, the order caps are full, or the state forbids it).

        Never behind the gate's back: with sells pending past a long, setting the position to
        zero would raise the symbol's worst case with no decision to check it.
        """
        held = self._cache.book(strategy).get(symbol, 0)  # only this thread writes positions
        if not held:
            return True
        index = self.config.threads  # the router's stats and flights slot
        side = Side.SELL if held > 0 else Side.BUY
        order_id = f"c{self._first_brain}-{next(self._close_seq)}"
        stats = self._brain_stats[index]
        flights = self._flights
        if flights is not None:
            flights.enter(index)
        order: Order | None = None
        try:
            if strategy is not None:
                assert self._book is not None
                decision = self._book.try_enter(
                    symbol, abs(held), order_id=order_id, side=side, strategy=strategy
                )
            elif self._cache_gate is not None:
                decision = self._cache_gate.try_enter(
                    symbol, abs(held), self._cache.snapshot, order_id=order_id, side=side
                )
            else:
                assert self._gate is not None
                decision = self._gate.try_enter(symbol, abs(held), order_id=order_id, side=side)
            reservation = decision.reservation
            if decision.admitted and reservation is not None:
                order = Order(
                    order_id, symbol, abs(held), "fill", reservation, index, side=side,
                    strategy=strategy,
                )  # fmt: skip
        finally:
            if flights is not None:
                flights.leave(index, order)
        stats.count(strategy, decision, order is not None)
        if order is None:
            return False
        stats.admitted += 1
        if side is Side.BUY:
            stats.buys += 1
        else:
            stats.sells += 1
        self._orders.append(order)
        self._auditor.admit(order)
        self._handle(Message("fill", order, abs(held), last=True))
        self._closes += 1
        return True

    def _flatten(self, symbol: str, strategy: str | None = None) -> None:
        """After the race: drop ``symbol``'s position (``strategy``'s part) outright (no
        decision can follow)."""
        cache = self._cache
        with cache.lock:
            qty = cache.book(strategy).pop(symbol, 0)
            if self._book is None:
                self._auditor.close(symbol)  # atomically with the cache change
        if self._book is not None and qty:
            self._auditor.close(symbol, strategy)
            if strategy is None:
                self._book.close_position(symbol)
            else:
                self._book.close_position(symbol, strategy=strategy)
        if qty:
            self._closes += 1

    def _handle(self, message: Message) -> None:
        """Apply one exchange message."""
        order = message.order
        reservation = order.reservation
        accounts = self._accounts
        if message.kind == "duplicate" or order.done:
            # The exchange repeated a message we already acted on: the reservation has ended,
            # so releasing it again must be a no-op.
            self._duplicates += 1
            if reservation.release():
                accounts.end(order.order_id, "released-again")
            return
        # An answer that lands after the TTL ended the reservation is noticed by the release,
        # reduce or confirm_fill below returning False (no extra call to the store for it).
        if message.kind == "reject":
            self._auditor.reject(order)  # before the gate may see room
            order.done = True
            self._rejected += 1
            self._end(order, reservation.release(), "released")
            return
        # A fill (whole or part). The gate must never count it twice, in the position and still
        # reserved: with sides that is not the safe direction. A buy counted twice inflates the
        # buy side of a worst case, and a sell judged against the inflated figure raises
        # nothing there while it raises the true one (the other side) past its limit.
        if self.config.release_first:
            self._end_fill(message)
            time.sleep(GAP)  # the gap in which the gate sees neither the order nor its position
            self._apply_fill(message)
            return
        book = self._book
        if book is not None:
            # The gate's own book: position and reservation in one step (filled= for a part).
            self._apply_fill(message, tell_book=False)
            symbol, strategy = order.symbol, order.strategy
            position = self._cache.book(strategy).get(symbol, 0)  # only this thread writes it
            part = None if order.outcome == "fill" else message.qty
            if strategy is None:
                ended = book.confirm_fill(order.order_id, position, symbol=symbol, filled=part)
                if not position:
                    book.close_position(symbol)  # flat: the symbol's slot is free again
            else:
                # strategy=: a fill that lands after its reservation ended still goes to the
                # strategy's part (with the reservation outstanding it follows the reservation)
                ended = book.confirm_fill(
                    order.order_id, position, symbol=symbol, filled=part, strategy=strategy
                )
                if not position:
                    book.close_position(symbol, strategy=strategy)
            self._booked(message, ended)
            return
        # The app's cache: the fill goes in and the reservation shrinks under the cache's lock,
        # which the gate's read of the positions takes too. So a decision sees the fill once:
        # in the position (read after), or still reserved (read before; the ledger's epoch
        # then tells it whether the reservation shrank before its own lock).
        with self._cache.lock:
            self._apply_fill(message, locked=True)
            self._end_fill(message)

    def _apply_fill(
        self, message: Message, *, tell_book: bool = True, locked: bool = False
    ) -> None:
        """Put a fill in the position cache (and the gate's book, in book mode), signed;
        ``locked``: the cache's lock is held already.

        The auditor moves the quantity from pending to the position in the same step. A
        position that comes to zero leaves the cache (and the book), so its slot is free.
        """
        order = message.order
        symbol = order.symbol
        if locked:
            before, after = self._put_fill(message)
        else:
            with self._cache.lock:
                before, after = self._put_fill(message)
        if after > 0 >= before:
            self._longs += 1
        elif after < 0 <= before:
            self._shorts += 1
        if tell_book and self._book is not None:  # release_first: never with strategies
            if after:
                self._book.set_position(symbol, after)
            else:
                self._book.close_position(symbol)
        order.filled += message.qty

    def _put_fill(self, message: Message) -> tuple[int, int]:
        """The cache and the auditor take the fill (cache lock held); the position before and
        after."""
        order = message.order
        positions = self._cache.book(order.strategy)
        before = positions.get(order.symbol, 0)
        after = before + order.sign * message.qty
        if after:
            positions[order.symbol] = after
        else:
            positions.pop(order.symbol, None)
        self._auditor.fill(order, message.qty)
        return before, after

    def _end_fill(self, message: Message) -> None:
        """Release (full fill) or reduce (partial fill) the order's reservation."""
        reservation = message.order.reservation
        if message.order.outcome == "fill":
            self._booked(message, reservation.release())
        else:
            self._booked(message, reservation.reduce(message.qty))  # the last part ends it

    def _booked(self, message: Message, applied: bool) -> None:
        """Book the reservation's end or reduction by a fill (``applied``: it was active)."""
        order = message.order
        if order.outcome == "fill":
            order.done = True
            self._filled += 1
            self._end(order, applied, "released")
        elif message.last:
            order.done = True
            self._partial += 1
            self._end(order, applied, "reduced")
        elif not applied:
            self._mark_late(order)

    def _end(self, order: Order, ended: bool, how: str) -> None:
        """Book the router's ending of ``order``'s reservation (``ended``: it was still active)."""
        if ended:
            self._accounts.end(order.order_id, how)
        else:
            self._mark_late(order)  # the TTL ended it first
        if self._flights is not None:
            self._flights.finish(order.order_id)

    def _mark_late(self, order: Order) -> None:
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
        decisions = admitted = lost = buys = sells = 0
        denied = {r.value: 0 for r in DenyReason if r not in _OTHER_BACKEND_REASONS}
        for stats in self._brain_stats:
            decisions += stats.decisions
            admitted += stats.admitted
            lost += stats.lost
            buys += stats.buys
            sells += stats.sells
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
            max_net=config.max_net,
            max_net_seen=auditor.max_net,
            admitted_buys=buys,
            admitted_sells=sells,
            reducing_admitted=auditor.reducing,
            longs_opened=self._longs,
            shorts_opened=self._shorts,
            breaches_by_cap=auditor.by_cap,
            strategies=len(self._budgets),
            scopes=self._scope_figures(),
        )

    def _scope_figures(self) -> dict[str, dict[str, Any]]:
        """``SimResult.scopes``: the auditor's figures of each scope, with the decisions made
        under it and the denials its limits gave (``Decision.scope``)."""
        scopes: dict[str, dict[str, Any]] = {}
        for scope in self._auditor.scopes():
            key = None if scope.name == ACCOUNT else scope.name
            decisions = admitted = 0
            denied_here: dict[str, int] = {}
            for stats in self._brain_stats:
                counted = stats.scoped.get(key)
                if counted is not None:
                    decisions += counted[0]
                    admitted += counted[1]
                for (where, reason), count in stats.denied_at.items():
                    if where == key:
                        denied_here[reason.value] = denied_here.get(reason.value, 0) + count
            scopes[scope.name] = {
                **scope.figures(),
                "decisions": decisions,
                "admitted": admitted,
                "denied_here": denied_here,
            }
        return scopes


_Part = tuple[str | None, str]
"""A position as the router keeps it: (the strategy it belongs to, or None; its symbol)."""

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


def _fit(parts: tuple[int, ...], notional: int, lot: int) -> tuple[int, ...]:
    """The first ``parts`` cut down to add up to ``notional`` (whole lots, each > 0)."""
    fitted: list[int] = []
    left = notional
    for part in parts:
        take = min(part, left)
        if take < lot:
            break
        fitted.append(take)
        left -= take
    if left:
        fitted.append(left)
    return tuple(fitted)


def run_simulation(
    config: SimConfig,
    *,
    backend: BackendFactory = memory_backend,
    clock: Callable[[], float] | None = None,
    on_progress: Callable[[Progress], object] | None = None,
) -> SimResult:
    """Run one simulation to completion; see ``Simulation``."""
    return Simulation(config, backend=backend, clock=clock).run(on_progress)
