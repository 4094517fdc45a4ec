"""The stress suite: the guarantee under forced interleavings, and proof the harness can fail.

64 strategy threads (started behind a ``threading.Barrier`` by the simulation) race
``try_enter`` against a position limit, a gross limit and a per-symbol limit at once, while the
simulated exchange rejects, fills in full, fills in parts and loses orders (whose reservations
only the TTL ends) and the router closes positions again. ``sys.setswitchinterval(1e-6)`` makes
CPython switch threads inside critical sections, so a check-then-act gap shows up in seconds.

The assertions: zero breaches of any limit; every reservation ends exactly once; the ledger is
empty at the end; and the same harness catches the broken gate (check and reserve in two
acquisitions). Time for the TTL is a ``ManualClock`` the simulation moves itself: no test sleeps
for a TTL, and nothing here asserts on timing.

The soak variant runs much longer: ``python -m pytest -m soak`` (``PENDINGLEDGER_SOAK_SECONDS``
sets its length, default 120).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from dataclasses import replace
from typing import Any, Literal

import pytest
from sim_checks import assert_books_balance

from pendingledger import (
    LockTimeout,
    PendingEntryLedger,
    ReentrantLockError,
    Reservation,
)
from pendingledger.sim import MemoryBackend, SimConfig, SimResult, Simulation
from pendingledger.testing import ManualClock, run_concurrently

# Limits tight enough that all three bind in a couple of seconds, with 64 brains racing flat out.
STRESS = SimConfig(
    seconds=1.5,
    threads=64,
    seed=20240611,
    max_positions=4,
    max_gross=30_000,
    max_symbol=9_000,
    think=(0.0, 0.0),
    ttl=1.0,
    outcome_weights=(0.15, 0.40, 0.35, 0.10),  # reject, fill, fill in parts, lost
    min_admitted=200,  # a busy machine races longer (up to 5x) rather than see too few orders
)


def _run(config: SimConfig, clock: ManualClock | None) -> tuple[SimResult, list[MemoryBackend]]:
    backends: list[MemoryBackend] = []

    def backend(**kwargs: Any) -> MemoryBackend:
        made = MemoryBackend(**kwargs)
        backends.append(made)
        return made

    result = Simulation(config, backend=backend, clock=clock).run()
    return result, backends


def _assert_every_path_taken(result: SimResult) -> None:
    """The run raced all three limits with every kind of exchange answer mixed in."""
    assert result.denied["max_concurrent_positions"] > 0
    assert result.denied["max_gross_exposure"] > 0
    assert result.denied["max_symbol_exposure"] > 0
    assert result.rejected > 0
    assert result.filled > 0
    assert result.partially_filled > 0
    assert result.lost > 0
    assert result.expired > 0
    assert result.closes > 0


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_sixty_four_threads_never_breach_any_limit() -> None:
    result, (backend,) = _run(STRESS, ManualClock())

    assert result.breaches == 0, result.first_breach
    assert result.breaches_by_limit == {"positions": 0, "gross": 0, "symbol": 0, "net": 0}
    assert result.max_positions_seen <= STRESS.max_positions  # type: ignore[operator]
    assert result.max_gross_seen <= STRESS.max_gross  # type: ignore[operator]
    assert result.max_symbol_seen <= STRESS.max_symbol  # type: ignore[operator]
    assert result.late_answers == 0  # no answer landed after its reservation's TTL
    assert_books_balance(result, backend)
    _assert_every_path_taken(result)
    assert result.ok


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_the_same_harness_catches_the_broken_gate() -> None:
    """The proof that a zero above means something: check-then-act is caught within seconds."""
    config = replace(STRESS, broken=True, stop_after_breaches=25)
    result, (backend,) = _run(config, ManualClock())

    assert result.breaches > 0
    assert result.first_breach is not None
    assert not result.ok
    # The auditor saw the true state go over at least one limit.
    assert (
        result.max_positions_seen > STRESS.max_positions  # type: ignore[operator]
        or result.max_gross_seen > STRESS.max_gross  # type: ignore[operator]
        or result.max_symbol_seen > STRESS.max_symbol  # type: ignore[operator]
    )
    # A broken gate breaches; it still never loses a reservation.
    assert_books_balance(result, backend)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_with_the_gate_owning_the_position_book_no_limit_is_breached_either() -> None:
    """positions=None: the router uses confirm_fill, set_position + reduce, close_position."""
    config = replace(STRESS, book="gate", seed=STRESS.seed + 1)
    result, (backend,) = _run(config, ManualClock())

    assert result.breaches == 0, result.first_breach
    assert result.late_answers == 0
    assert_books_balance(result, backend)
    _assert_every_path_taken(result)
    assert backend.gate.positions() == {}  # flat at the end

    caught, (broken_backend,) = _run(
        replace(config, broken=True, stop_after_breaches=25), ManualClock()
    )
    assert caught.breaches > 0
    assert_books_balance(caught, broken_backend)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_the_auditor_catches_a_router_that_releases_before_the_cache_shows_the_fill() -> None:
    """The real gate with the wrong hand-off: the auditor checks the truth, not the gate's view."""
    config = replace(STRESS, release_first=True, stop_after_breaches=10, seconds=3.0)
    result, (backend,) = _run(config, ManualClock())

    assert result.breaches > 0
    assert_books_balance(result, backend)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_the_demo_clock_expires_lost_orders_mid_race() -> None:
    """The demo's clock (real time): lost orders expire by TTL while the race goes on.

    The TTL is far above the router's lag on an ordinary machine, so every answer lands before
    its reservation could expire. On a machine so overloaded that one did not, the gate
    rightly stopped counting that order and a breach may follow from the TTL, not from the
    race: the run must then say so in its notes. (No assertion on timing either way.)
    """
    config = replace(STRESS, ttl=0.75, seed=7)
    result, (backend,) = _run(config, None)

    if result.late_answers == 0:
        assert result.breaches == 0, result.first_breach
    else:
        assert any("TTL is too short" in note for note in result.notes)
    assert_books_balance(result, backend)
    assert result.expired > 0


# --------------------------------------------------------------------------- deadlock safety


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_hammering_every_entry_point_never_deadlocks_and_stats_stay_consistent() -> None:
    """lock(timeout=), release_order, Reservation.release/reduce, expiry, from 32 threads at once.

    Some blocks raise on purpose (their reservations must be rolled back), some call
    ``Reservation.release()`` from inside a ``lock()`` block of the same thread (it must work or
    raise ``ReentrantLockError``, never hang). A monitor thread checks every stats snapshot.
    """
    clock = ManualClock()
    expired_seen: list[Reservation] = []
    expired_lock = threading.Lock()

    def on_expire(res: Reservation) -> None:
        with expired_lock:
            expired_seen.append(res)

    ledger = PendingEntryLedger(ttl=1.0, clock=clock, on_expire=on_expire)
    symbols = [f"S{i}" for i in range(6)]
    shared: list[Reservation] = []  # reservations any thread may act on
    made: list[Reservation] = []  # every reservation that outlived its block
    shared_lock = threading.Lock()
    nthreads, rounds = 32, 400
    done = threading.Event()
    remaining = [nthreads - 1]
    remaining_lock = threading.Lock()
    snapshots = [0]

    class Boom(Exception):
        pass

    def monitor() -> None:
        while not done.is_set():
            stats = ledger.stats()
            assert stats.reserved == stats.released + stats.expired + stats.outstanding, stats
            assert stats.outstanding >= 0 and stats.gross_notional >= 0, stats
            snapshots[0] += 1

    def pick(rng: random.Random) -> Reservation | None:
        with shared_lock:
            return rng.choice(shared) if shared else None

    def hammer(index: int) -> None:
        rng = random.Random(index)
        for n in range(rounds):
            op = rng.random()
            symbol = rng.choice(symbols)
            if op < 0.35:
                try:
                    with ledger.lock(timeout=0.02) as pending:
                        res = pending.reserve(symbol, rng.randint(1, 50), order_id=f"{index}-{n}")
                        if rng.random() < 0.15:
                            raise Boom  # rolled back: must count nowhere
                except LockTimeout:
                    continue
                except Boom:
                    assert not res.active
                    continue
                with shared_lock:
                    shared.append(res)
                    made.append(res)
            elif op < 0.50:
                ledger.release_order(f"{rng.randrange(1, nthreads)}-{rng.randrange(rounds)}")
            elif op < 0.65:
                res_or_none = pick(rng)
                if res_or_none is not None:
                    res_or_none.release()
                    assert res_or_none.release() is False  # idempotent: already ended
            elif op < 0.80:
                res_or_none = pick(rng)
                if res_or_none is not None:
                    res_or_none.reduce(rng.randint(1, 20))
            elif op < 0.85:
                ledger.release(symbol)
            elif op < 0.92:
                clock.advance(rng.choice((0.0, 0.05, 0.2)))
            else:
                res_or_none = pick(rng)
                if res_or_none is None:
                    continue
                try:
                    # Same thread, inside the block: works or refuses, never hangs.
                    with ledger.lock(timeout=0.02), contextlib.suppress(ReentrantLockError):
                        res_or_none.release()
                except LockTimeout:
                    continue

    def worker(index: int) -> None:
        if index == 0:
            monitor()
            return
        try:
            hammer(index)
        finally:
            with remaining_lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    run_concurrently(worker, nthreads, timeout=25)
    assert snapshots[0] > 0

    # Let the TTL end whatever is left, then check the books.
    clock.advance(1.0)
    stats = ledger.stats()
    assert stats.outstanding == 0
    assert stats.gross_notional == 0
    assert stats.reserved == len(made)
    assert stats.reserved == stats.released + stats.expired
    assert stats.expired == len(expired_seen)
    assert len({id(r) for r in expired_seen}) == len(expired_seen)  # none expired twice
    assert all(not r.active for r in made)
    made_ids = {id(r) for r in made}
    assert all(id(r) in made_ids for r in expired_seen)  # rolled-back ones never expire
    # The mix happened: releases, expiries and many reservations, under a busy monitor.
    assert len(made) > 500 and stats.released > 0 and stats.expired > 0


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fast_switching")
def test_many_threads_ending_one_reservation_end_it_exactly_once() -> None:
    """release() and reduce() racing on the same reservations: one end each, never two."""
    ledger = PendingEntryLedger(ttl=60.0, clock=ManualClock())
    nthreads, count = 32, 40
    with ledger.lock() as pending:
        targets = [pending.reserve(f"S{i % 5}", nthreads, order_id=f"o{i}") for i in range(count)]
    wins = [0] * count
    wins_lock = threading.Lock()

    def worker(index: int) -> None:
        for i, res in enumerate(targets):
            if (i + index) % 3 == 0:
                if res.release():
                    with wins_lock:
                        wins[i] += 1
            else:
                res.reduce(2)

    run_concurrently(worker, nthreads, timeout=20)

    # Each reservation got some releases and at least nthreads/3 * 2 >= its notional of reduces,
    # so all ended; each release() that reported True ended it, so at most one per reservation.
    assert all(w <= 1 for w in wins)
    assert all(not r.active for r in targets)
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (0, 0)
    assert (stats.reserved, stats.released, stats.expired) == (count, count, 0)


# --------------------------------------------------------------------------- soak


def _soak_selected(config: pytest.Config) -> bool:
    expression = str(config.getoption("markexpr") or "")
    return "soak" in expression and "not soak" not in expression


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak(request: pytest.FixtureRequest, fast_switching: None) -> None:
    """Minutes of racing: many seeds, both clocks, both position books, both gates.

    ``python -m pytest -m soak``; ``PENDINGLEDGER_SOAK_SECONDS`` sets the length (default 120).
    """
    if not _soak_selected(request.config):
        pytest.skip("soak run: select it with -m soak")
    budget = float(os.environ.get("PENDINGLEDGER_SOAK_SECONDS", "120"))
    end = time.monotonic() + budget
    seed = 1000
    while True:
        seed += 1
        seconds = min(10.0, max(1.0, end - time.monotonic()))
        manual = seed % 2 == 0
        book: Literal["cache", "gate"] = "gate" if seed % 3 == 0 else "cache"
        config = replace(STRESS, seed=seed, seconds=seconds, ttl=1.0, book=book)
        result, (backend,) = _run(config, ManualClock() if manual else None)
        assert result.late_answers == 0, (seed, result.notes)
        assert result.breaches == 0, (seed, result.first_breach)
        assert_books_balance(result, backend)
        _assert_every_path_taken(result)
        # And the harness still fails where it should, on the same seed.
        broken = replace(config, broken=True, seconds=5.0, stop_after_breaches=10)
        caught, (broken_backend,) = _run(broken, ManualClock())
        assert caught.breaches > 0, seed
        assert_books_balance(caught, broken_backend)
        if time.monotonic() >= end:
            break
