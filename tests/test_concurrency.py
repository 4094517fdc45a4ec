"""First concurrency tests: threads behind a barrier race the gate; an invariant monitor watches.

``sys.setswitchinterval(1e-6)`` (the ``fast_switching`` fixture) makes CPython switch threads in
the middle of critical sections, so a check-then-reserve race shows up under the GIL. The same
harness runs a deliberately broken gate (check in one ``lock()`` block, reserve in a second one)
and must catch it breaching the limits: a race test is only worth something if it can fail.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

import pytest

from pendingledger import (
    DenyReason,
    PendingEntryLedger,
    PendingMap,
    PortfolioGate,
    PortfolioLimits,
    Reservation,
    ReservationHandle,
)
from pendingledger.testing import ManualClock, run_concurrently

Number = int | float | Decimal | Fraction
MAX_POSITIONS = 4
MAX_GROSS = 1000
THREADS = 48
ATTEMPTS = 60


@dataclass
class Race:
    """A ledger, a gate, where the positions live, and what the checkers saw.

    ``source`` says how the gate is given the open positions: ``"mapping"`` (a dict the workers
    update under the ledger lock), ``"callable"`` (a function returning a copy of that dict) or
    ``"book"`` (the gate's own book, kept with ``confirm_fill``/``close_position``).
    """

    ledger: PendingEntryLedger
    gate: PortfolioGate
    source: str = "mapping"
    positions: dict[Hashable, Number] = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    checks: int = 0
    admitted: int = 0
    counter_lock: threading.Lock = field(default_factory=threading.Lock)

    def open_positions(self) -> Mapping[Hashable, Number]:
        """The open positions (call with the ledger lock held, to see them with reservations)."""
        if self.source == "book":
            # gate.positions() cannot run inside a lock() block; peek at the book it reads
            return {symbol: entry[1] for symbol, entry in self.ledger._book.items()}
        return self.positions

    def check(self, pending: PendingMap) -> None:
        """Record a breach if open positions + reservations exceed a limit (lock held)."""
        positions = self.open_positions()
        slots = len(positions) + pending.new_slots(positions.__contains__)
        gross = Fraction(sum(abs(Fraction(v)) for v in positions.values())) + Fraction(
            pending.gross_notional()
        )
        self.checks += 1
        if slots > MAX_POSITIONS:
            self.breaches.append(f"{slots} positions open or reserved > {MAX_POSITIONS}")
        if gross > MAX_GROSS:
            self.breaches.append(f"gross {float(gross)} > {MAX_GROSS}")

    def fill(self, res: ReservationHandle) -> None:
        """The fill lands: the position appears and the reservation ends, in one step."""
        if self.source == "book":
            assert self.gate.confirm_fill(res.order_id, res.notional)
            return
        with self.ledger.lock() as pending:  # cache first, then release, in one block
            self.positions[res.symbol] = res.notional
            pending.release(res.symbol)

    def close(self, symbol: Hashable) -> None:
        if self.source == "book":
            assert self.gate.close_position(symbol)
            return
        with self.ledger.lock():
            del self.positions[symbol]


Enter = Callable[[Race, str, int], "ReservationHandle | None"]


def gate_enter(race: Race, symbol: str, notional: int) -> ReservationHandle | None:
    """The real thing: check and reserve in one critical section."""
    if race.source == "book":
        return race.gate.try_enter(symbol, notional).reservation
    if race.source == "callable":
        cache = race.positions
        return race.gate.try_enter(symbol, notional, lambda: dict(cache)).reservation
    return race.gate.try_enter(symbol, notional, race.positions).reservation


def broken_enter(race: Race, symbol: str, notional: int) -> ReservationHandle | None:
    """Check in one lock() block and reserve in a second one: the race the library prevents."""
    positions = race.positions
    with race.ledger.lock() as pending:
        slots = len(positions) + pending.new_slots(positions.__contains__)
        gross = sum(abs(Fraction(v)) for v in positions.values()) + Fraction(
            pending.gross_notional()
        )
        room = (symbol in positions or symbol in pending or slots < MAX_POSITIONS) and (
            gross + notional <= MAX_GROSS
        )
    time.sleep(0.0001)  # widen the window between check and reserve (broken variant only;
    # sleep(0) does not reliably hand the GIL over on CPython 3.10)
    if not room:
        return None
    with race.ledger.lock() as pending:
        return pending.reserve(symbol, notional)


def run_race(
    enter: Enter, *, attempts: int, seed: int = 0, churn: bool = True, source: str = "mapping"
) -> Race:
    """``THREADS`` workers race ``enter`` on distinct symbols while a monitor checks the limits.

    With ``churn`` an admitted entry is then rejected (released) or filled (the position appears
    and the reservation ends in one step, the documented hand-off), and filled positions are
    closed again later, so room keeps opening up and the race keeps being run.
    """
    clock = ManualClock()
    ledger = PendingEntryLedger(3600, clock=clock)
    race = Race(
        ledger,
        PortfolioGate(
            ledger,
            PortfolioLimits(max_concurrent_positions=MAX_POSITIONS, max_gross_exposure=MAX_GROSS),
        ),
        source,
    )
    stop = threading.Event()
    monitor_errors: list[BaseException] = []

    def monitor() -> None:
        try:
            while not stop.is_set():
                with ledger.lock(timeout=10) as pending:
                    race.check(pending)
        except BaseException as exc:  # pragma: no cover - re-raised in the test thread
            monitor_errors.append(exc)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mine: list[str] = []
        for k in range(attempts):
            if mine and rng.random() < 0.5:  # close one of this worker's positions
                race.close(mine.pop(0))
            symbol = f"T{index}-{k}"
            res = enter(race, symbol, rng.randrange(50, 400))
            if res is None:
                continue
            with race.counter_lock:
                race.admitted += 1
            with ledger.lock() as pending:  # every worker checks right after it got in
                race.check(pending)
            if not churn:
                continue
            time.sleep(0)
            if rng.random() < 0.3:
                res.release()  # exchange reject
            else:
                race.fill(res)
                mine.append(symbol)

    watcher = threading.Thread(target=monitor, name="invariant-monitor", daemon=True)
    watcher.start()
    try:
        run_concurrently(worker, THREADS, timeout=20)
    finally:
        stop.set()
        watcher.join(10)
    if monitor_errors:
        raise monitor_errors[0]
    with ledger.lock() as pending:
        race.check(pending)
    return race


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source", ["mapping", "callable", "book"])
@pytest.mark.parametrize("seed", range(2))
def test_try_enter_never_breaches_the_limits_under_a_race(
    fast_switching: float, seed: int, source: str
) -> None:
    race = run_race(gate_enter, attempts=ATTEMPTS, seed=seed, source=source)
    assert race.breaches == []
    assert race.checks > THREADS  # the monitor and the workers really looked
    stats = race.ledger.stats()
    gate_stats = race.gate.stats()
    # conservation: every admission is one reservation, every reservation ended once or is out
    assert gate_stats.admitted == race.admitted == stats.reserved
    assert stats.reserved == stats.released + stats.expired + stats.outstanding
    assert gate_stats.decisions == THREADS * ATTEMPTS
    assert gate_stats.denied[DenyReason.MAX_CONCURRENT_POSITIONS] > 0
    assert race.admitted > MAX_POSITIONS  # churn let more in over time


@pytest.mark.timeout(30)
def test_the_harness_catches_the_broken_check_then_reserve(fast_switching: float) -> None:
    race = run_race(broken_enter, attempts=3, churn=False)
    # A breach of either limit counts: with four admissions the gross limit may go first.
    assert len(race.breaches) > 0, "the harness failed to catch a known-broken gate"


@pytest.mark.timeout(30)
def test_broken_variant_is_caught_with_churn_too(fast_switching: float) -> None:
    race = run_race(broken_enter, attempts=ATTEMPTS, churn=True)
    assert len(race.breaches) > 0


# ---------------------------------------------------------------------------- exact outcomes


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("limits", "notional", "admitted", "reason"),
    [
        (PortfolioLimits(max_concurrent_positions=5, max_gross_exposure=10_000), 100, 5,
         DenyReason.MAX_CONCURRENT_POSITIONS),
        (PortfolioLimits(max_concurrent_positions=50, max_gross_exposure=1000), 300, 3,
         DenyReason.MAX_GROSS_EXPOSURE),
        (PortfolioLimits(max_concurrent_positions=0), 1, 0, DenyReason.MAX_CONCURRENT_POSITIONS),
    ],
    ids=["positions-bind", "gross-binds", "zero-positions"],
)  # fmt: skip
def test_distinct_symbols_race_admits_exactly_the_limit(
    fast_switching: float,
    limits: PortfolioLimits,
    notional: int,
    admitted: int,
    reason: DenyReason,
) -> None:
    ledger = PendingEntryLedger(60, clock=ManualClock())
    gate = PortfolioGate(ledger, limits)
    n = 64
    open_positions: dict[Hashable, Number] = {}

    def worker(index: int) -> None:
        gate.try_enter(f"S{index}", notional, open_positions)

    run_concurrently(worker, n)
    stats = gate.stats()
    assert stats.admitted == admitted
    assert stats.denied[reason] == n - admitted
    assert ledger.stats().outstanding == admitted


@pytest.mark.timeout(20)
def test_same_symbol_race_against_the_symbol_limit(fast_switching: float) -> None:
    ledger = PendingEntryLedger(60, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits(max_symbol_exposure=Decimal("100.0")))
    n = 64

    def worker(index: int) -> None:
        gate.try_enter("AAA", Decimal("9.99") if index % 2 else 10, {"AAA": Decimal("-0.5")})

    run_concurrently(worker, n)
    with ledger.lock() as pending:
        assert Fraction(pending.symbol_notional("AAA")) <= Fraction("99.5")
    stats = gate.stats()
    assert stats.admitted + stats.denied[DenyReason.MAX_SYMBOL_EXPOSURE] == n
    assert stats.admitted == 9  # 9 entries of 9.99 or 10 always fit in 99.5; 10 never do


# ---------------------------------------------------------------------------- racing releases,
# expiry and rollbacks


def _end_right(gate: PortfolioGate, res: Reservation, order_id: Hashable, how: int) -> bool:
    """End ``res`` one of the four ways a bot does; True if this call ended it."""
    if how == 0:
        return res.release()
    if how == 1:
        return gate.ledger.release_order(order_id)
    if how == 2:
        return res.reduce(1)
    return gate.confirm_fill(order_id, 1)


def _end_check_then_act(
    gate: PortfolioGate, res: Reservation, order_id: Hashable, how: int
) -> bool:
    """Broken on purpose: whether the reservation is active is asked before the lock is taken,
    and the end is made unconditionally once it is (a check-then-act race)."""
    ledger = gate.ledger
    if not res.active:
        return False
    with ledger._guard():
        ledger._end_locked(res, 1)
        ledger._n_released += 1
    return True


def _end_with_a_stale_answer(
    gate: PortfolioGate, res: Reservation, order_id: Hashable, how: int
) -> bool:
    """Broken on purpose, and quietly: the end itself is checked under the lock (nothing is
    ended twice, nothing raises), but the answer comes from the check made before it, so two
    callers can both say they ended the same reservation."""
    ledger = gate.ledger
    if not res.active:
        return False
    with ledger._guard():
        if res._state == 0:  # still active (no property call: it would take the lock again)
            ledger._end_locked(res, 1)
            ledger._n_released += 1
    return True


def _release_race(
    end: Callable[[PortfolioGate, Reservation, Hashable, int], bool], ids: str
) -> tuple[int, PendingEntryLedger]:
    """16 threads end the same 200 reservations in random orders and ways; returns how many
    calls said they ended one, and the ledger."""
    ledger = PendingEntryLedger(60, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=10**9))
    with ledger.lock() as pending:
        made = [
            pending.reserve(f"S{i % 10}", 1, order_id=i if ids == "caller" else None)
            for i in range(200)
        ]
    order_ids = [res.order_id for res in made]  # a generated id is read back, as a bot would
    wins: list[int] = []
    wins_lock = threading.Lock()

    def worker(index: int) -> None:
        rng = random.Random(index)
        mine = 0
        for i in rng.sample(range(200), 200):
            mine += end(gate, made[i], order_ids[i], rng.randrange(4))
        with wins_lock:
            wins.append(mine)

    run_concurrently(worker, 16)
    return sum(wins), ledger


@pytest.mark.timeout(20)
@pytest.mark.parametrize("ids", ["caller", "generated"])
def test_each_reservation_is_released_exactly_once_under_a_race(
    fast_switching: float, ids: str
) -> None:
    ended, ledger = _release_race(_end_right, ids)
    assert ended == 200
    stats = ledger.stats()
    assert (stats.outstanding, stats.released, stats.gross_notional) == (0, 200, 0)


@pytest.mark.timeout(20)
def test_the_release_race_catches_a_check_then_act_release(fast_switching: float) -> None:
    """The harness above can fail: ending after an unlocked check ends some reservation twice,
    which shows as a miscount or as the second end finding it gone."""
    caught = False
    for _ in range(8):  # each run catches it about 4 times in 5 (measured over 40 runs)
        try:
            ended, ledger = _release_race(_end_check_then_act, "generated")
        except KeyError:  # the second end of one reservation found it already removed
            caught = True
        else:
            caught = ended != 200 or ledger.stats().released != 200
        if caught:
            break
    assert caught, "the release race did not catch a known-broken release"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("ids", ["caller", "generated"])
def test_the_release_race_counts_catch_a_double_answer(fast_switching: float, ids: str) -> None:
    """The count alone can fail too: a release that never ends anything twice (so nothing
    raises, and the ledger's own figures stay right) but answers True twice is a miscount."""
    for _ in range(8):  # a run catches it 33 to 40 times in 40 (3.10-3.13)
        ended, ledger = _release_race(_end_with_a_stale_answer, ids)
        assert ledger.stats().released == 200  # the ledger is right: only the answer is wrong
        if ended != 200:
            return
    pytest.fail("the release race's count did not catch a release that answers True twice")


@pytest.mark.timeout(20)
def test_on_expire_runs_once_per_reservation_under_a_race(fast_switching: float) -> None:
    clock = ManualClock()
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(10, clock=clock, on_expire=expired.append)
    with ledger.lock() as pending:
        made = [pending.reserve(f"S{i}", 1) for i in range(300)]
    clock.advance(10)

    def worker(index: int) -> None:
        for _ in range(5):
            ledger.stats()
            made[index].release()

    run_concurrently(worker, 32)
    assert len(expired) == 300
    assert len({id(r) for r in expired}) == 300
    stats = ledger.stats()
    assert (stats.expired, stats.released, stats.outstanding) == (300, 0, 0)


@pytest.mark.timeout(20)
def test_rollbacks_interleaved_with_decisions_keep_the_books(fast_switching: float) -> None:
    ledger = PendingEntryLedger(60, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=10**9))
    kept: list[tuple[int, Fraction]] = []
    kept_lock = threading.Lock()
    amounts: list[Number] = [1, 0.5, Decimal("0.25")]

    class Abort(Exception):
        pass

    def worker(index: int) -> None:
        rng = random.Random(index)
        count, total = 0, Fraction(0)
        for k in range(40):
            if index % 2:
                amount = rng.choice(amounts)
                assert gate.try_enter(f"G{index}", amount, {})
                count, total = count + 1, total + Fraction(amount)
            else:
                try:
                    with ledger.lock() as pending:
                        pending.reserve(f"B{index}", Fraction(1, 3), order_id=(index, k))
                        if k % 2:
                            raise Abort
                    count, total = count + 1, total + Fraction(1, 3)
                except Abort:
                    pass
        with kept_lock:
            kept.append((count, total))

    run_concurrently(worker, 32)
    stats = ledger.stats()
    assert stats.outstanding == stats.reserved == sum(c for c, _ in kept) == 16 * 40 + 16 * 20
    assert stats.gross_notional == sum((t for _, t in kept), Fraction(0))


@dataclass(frozen=True)
class _VenueSymbol:
    """A symbol type with a Python-level ``__hash__``: hashing it lets other threads run."""

    venue: str
    name: str


@pytest.mark.timeout(30)
def test_symbols_with_a_python_hash_race_safely(fast_switching: float) -> None:
    symbols = [_VenueSymbol("X", f"S{i}") for i in range(40)]
    positions = {symbols[i]: 1.0 for i in range(20)}
    gate = PortfolioGate(PendingEntryLedger(30.0), PortfolioLimits(max_concurrent_positions=10**6))

    def worker(index: int) -> None:
        rng = random.Random(index)
        for _ in range(1000):
            decision = gate.try_enter(rng.choice(symbols), 1.0, positions)
            assert decision.reservation is not None
            decision.reservation.release()

    run_concurrently(worker, 16, timeout=25)  # the first worker exception fails the test
    assert gate.ledger.stats().outstanding == 0
