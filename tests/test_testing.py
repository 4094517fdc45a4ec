"""pendingledger.testing: ManualClock and run_concurrently."""

from __future__ import annotations

import threading

import pytest

from pendingledger import PendingEntryLedger
from pendingledger.testing import ManualClock, run_concurrently

# ---------------------------------------------------------------------------- ManualClock


def test_manual_clock_starts_where_told() -> None:
    """A ManualClock starts at 0.0, or at any finite start given (an int too)."""
    assert ManualClock()() == 0.0
    assert ManualClock(12.5)() == 12.5
    assert ManualClock(-3)() == -3.0  # any finite start, e.g. to mimic monotonic's origin
    assert ManualClock(7).now() == 7.0


def test_manual_clock_only_moves_on_advance() -> None:
    """Reading the clock never moves it; advance() moves it by the step and returns the reading."""
    clock = ManualClock()
    assert clock() == clock() == 0.0
    assert clock.advance(1.5) == 1.5
    assert clock.advance(0) == 1.5  # a zero step is fine
    assert clock.advance(2) == 3.5
    assert clock() == clock.now() == 3.5
    assert "3.5" in repr(clock)


def test_manual_clock_negative_step_is_refused() -> None:
    """Time never goes backwards: a negative step is refused and the clock stays."""
    clock = ManualClock(10)
    with pytest.raises(ValueError, match="time can't go backwards"):
        clock.advance(-0.5)
    assert clock() == 10.0


def test_manual_clock_drives_a_ledger() -> None:
    """A ledger on a ManualClock stamps with its reading and expires exactly at stamp + TTL."""
    clock = ManualClock(1000.0)
    ledger = PendingEntryLedger(5, clock=clock)
    with ledger.lock() as pending:
        res = pending.reserve("AAA", 1)
    assert res.reserved_at == 1000.0
    clock.advance(4.999)
    assert ledger.stats().outstanding == 1
    clock.advance(0.001)
    assert ledger.stats().outstanding == 0


@pytest.mark.timeout(20)
def test_manual_clock_advance_is_thread_safe(fast_switching: float) -> None:
    """Concurrent advances from many threads lose no step."""
    clock = ManualClock()

    def worker(index: int) -> None:
        for _ in range(2000):
            clock.advance(1)

    run_concurrently(worker, 16)
    assert clock() == 16 * 2000


# ---------------------------------------------------------------------------- run_concurrently


@pytest.mark.timeout(20)
def test_run_concurrently_runs_each_index_once_with_args() -> None:
    """Each index 0..n-1 runs once, with the extra arguments after it."""
    seen: list[tuple[int, str, int]] = []
    lock = threading.Lock()

    def worker(index: int, word: str, number: int) -> None:
        with lock:
            seen.append((index, word, number))

    run_concurrently(worker, 40, ("x", 7))
    assert sorted(seen) == [(i, "x", 7) for i in range(40)]


@pytest.mark.timeout(20)
def test_run_concurrently_runs_workers_at_the_same_time() -> None:
    """Every worker waits on a second barrier: it only opens if all run concurrently."""
    n = 32
    meet = threading.Barrier(n, timeout=10)
    threads: set[int] = set()

    def worker(index: int) -> None:
        threads.add(threading.get_ident())
        meet.wait()

    run_concurrently(worker, n)
    assert len(threads) == n


@pytest.mark.timeout(20)
def test_run_concurrently_reraises_a_worker_exception() -> None:
    """The first exception a worker raises is raised by run_concurrently itself."""
    finished: list[int] = []

    def worker(index: int) -> None:
        if index == 3:
            raise KeyError("worker 3 failed")
        finished.append(index)

    with pytest.raises(KeyError, match="worker 3 failed"):
        run_concurrently(worker, 8)
    # run_concurrently aborts its barrier on the first failure, so workers that had not yet
    # returned from barrier.wait() may never run; those that ran were not disturbed.
    assert 3 not in finished
    assert len(finished) == len(set(finished)) <= 7


@pytest.mark.timeout(20)
def test_run_concurrently_reraises_an_assertion_from_a_thread() -> None:
    """A failed assertion in a worker fails the caller (it is not lost in the thread)."""

    def worker(index: int) -> None:
        assert index < 5, f"invariant broken in worker {index}"

    with pytest.raises(AssertionError, match="invariant broken in worker"):
        run_concurrently(worker, 10)


@pytest.mark.timeout(20)
def test_run_concurrently_reports_a_stuck_worker() -> None:
    """A worker still running after the timeout is reported as a TimeoutError (a deadlock)."""
    never = threading.Event()

    def worker(index: int) -> None:
        if index == 0:
            never.wait(30)

    try:
        with pytest.raises(TimeoutError, match="1 worker"):
            run_concurrently(worker, 4, timeout=0.2)
    finally:
        never.set()  # let the stuck thread finish


@pytest.mark.timeout(20)
def test_run_concurrently_single_thread() -> None:
    """One thread is a valid count: worker(0) runs once."""
    ran: list[int] = []
    run_concurrently(ran.append, 1)
    assert ran == [0]


@pytest.mark.parametrize("nthreads", [0, -1, 1.5, True, "4"], ids=repr)
def test_run_concurrently_bad_nthreads(nthreads: object) -> None:
    """nthreads must be a positive int (not a bool, a float or a str)."""
    with pytest.raises(ValueError, match="nthreads"):
        run_concurrently(lambda index: None, nthreads)  # type: ignore[arg-type]
