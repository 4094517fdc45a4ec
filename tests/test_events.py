"""Events and logging: every decision, end and change of state is told, after the lock.

Each listener here checks, when called, that the ledger lock is free (these tests run one thread
at a time, so a held lock could only be the caller's). The 64-thread race counts what the
listener heard against what the threads did and against the gate's own counters, which are kept
under the lock; ``test_the_race_check_catches_a_lost_event`` drives a delivery that loses an
event (an outbox emptied in two steps, with another thread's event landing between them) and
shows the same check failing.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import pytest

from pendingledger import (
    DenyReason,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    ReservationHandle,
    Side,
    TradingState,
)
from pendingledger.events import Decided, Ended, EndReason, Event, StateChanged
from pendingledger.testing import ManualClock, ManualWallClock

pytestmark = pytest.mark.timeout(60)

TTL = 30.0
E = TypeVar("E", Decided, Ended, StateChanged)


class Heard:
    """A listener that keeps every event and checks the ledger lock is free when called."""

    def __init__(self, ledger: PendingEntryLedger) -> None:
        self.ledger = ledger
        self.events: list[Event] = []
        self.under_lock = 0

    def __call__(self, event: Event) -> None:
        if self.ledger.locked():
            self.under_lock += 1
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]

    def ends(self) -> list[tuple[str, EndReason]]:
        return [(e.order_id, e.how) for e in self.events if isinstance(e, Ended)]


@pytest.fixture
def heard(gate: PortfolioGate) -> Heard:
    listener = Heard(gate.ledger)
    gate.subscribe(listener)
    return listener


def test_each_decision_is_told_with_what_was_asked(gate: PortfolioGate, heard: Heard) -> None:
    gate.limits = PortfolioLimits(max_concurrent_positions=1)
    admitted = gate.try_enter("AAA", 100, side=Side.BUY, order_id="o1")
    denied = gate.try_enter("BBB", 50)

    decided = heard.of(Decided)
    assert [e.decision for e in decided] == [admitted, denied]
    first, second = decided
    assert (first.symbol, first.notional, first.side, first.strategy) == (
        "AAA",
        100,
        Side.BUY,
        None,
    )
    assert second.decision.reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert first.seconds is None and second.seconds is None  # no listener asked for timing
    assert heard.under_lock == 0


def test_decisions_are_timed_while_a_listener_asks_for_it(gate: PortfolioGate) -> None:
    timed, untimed = Heard(gate.ledger), Heard(gate.ledger)
    gate.subscribe(untimed)
    gate.subscribe(timed, timed=True)
    gate.try_enter("AAA", 1)
    assert gate.unsubscribe(timed)
    gate.try_enter("BBB", 1)
    first, second = untimed.of(Decided)
    assert first.seconds is not None and first.seconds >= 0
    assert timed.of(Decided)[0].seconds == first.seconds  # one event, told to both
    assert second.seconds is None
    with pytest.raises(TypeError, match="timed must be a bool, got 'yes'"):
        gate.subscribe(timed, timed="yes")
    assert not gate.unsubscribe(timed)


def test_a_strategy_decision_names_its_strategy(ledger: PendingEntryLedger) -> None:
    gate = PortfolioGate(ledger, PortfolioLimits(), budgets={"mm": PortfolioLimits()})
    listener = Heard(ledger)
    gate.subscribe(listener)
    gate.try_enter("AAA", 1, strategy="mm")
    (event,) = listener.of(Decided)
    assert isinstance(event, Decided) and event.strategy == "mm"


def test_each_way_a_reservation_ends_is_told_once(
    gate: PortfolioGate, heard: Heard, clock: ManualClock
) -> None:
    def enter(oid: str, symbol: str = "AAA") -> ReservationHandle:
        decision = gate.try_enter(symbol, 10, order_id=oid)
        assert decision.admitted
        return decision.reservation

    res = {oid: enter(oid) for oid in ("rel", "by-id", "fill", "cut", "cut-id", "old")}
    enter("sym", "BBB")
    assert res["rel"].release() and not res["rel"].release()
    assert gate.release_order("by-id") and not gate.release_order("by-id")
    assert gate.release("BBB")
    assert gate.confirm_fill("fill", 10)
    assert res["cut"].reduce(4) and res["cut"].reduce(6)
    assert gate.reduce_order("cut-id", 10)
    clock.advance(TTL)
    gate.try_enter("ZZZ", 1, order_id="sweeper")  # the sweep expires "old"

    assert heard.ends() == [
        ("rel", EndReason.RELEASED),
        ("by-id", EndReason.RELEASED),
        ("sym", EndReason.RELEASED),
        ("fill", EndReason.FILLED),
        ("cut", EndReason.REDUCED),
        ("cut-id", EndReason.REDUCED),
        ("old", EndReason.EXPIRED),
    ]
    ended = [e for e in heard.events if isinstance(e, Ended)]
    assert ended[0].reservation is res["rel"] and ended[-1].reservation is res["old"]
    assert heard.under_lock == 0


def test_a_lock_block_tells_its_ends_after_it_commits_and_none_if_it_rolls_back(
    gate: PortfolioGate, heard: Heard
) -> None:
    ledger = gate.ledger
    for oid in ("kept", "gone"):
        assert gate.try_enter("AAA", 1, order_id=oid)
    with pytest.raises(RuntimeError), ledger.lock() as pending:
        pending.release_order("kept")
        raise RuntimeError("undo")
    assert heard.ends() == []
    with ledger.lock() as pending:
        pending.release_order("gone")
        made = pending.reserve("BBB", 1, order_id="made")
        made.release()
        assert heard.ends() == []  # not yet: the lock is held
    assert heard.ends() == [("gone", EndReason.RELEASED), ("made", EndReason.RELEASED)]
    assert heard.under_lock == 0


def test_state_changes_and_latches_are_told_and_logged(
    ledger: PendingEntryLedger, caplog: pytest.LogCaptureFixture
) -> None:
    wall = ManualWallClock(1_000.0)
    gate = PortfolioGate(ledger, PortfolioLimits(max_daily_loss=100), wall_clock=wall)
    listener = Heard(ledger)
    gate.subscribe(listener)
    caplog.set_level(logging.WARNING, "pendingledger")

    gate.halt()
    gate.halt()  # no change: not told
    gate.reduce_only()
    gate.resume()
    gate.record_pnl(-100)  # latches REDUCING
    wall.advance(86_400)
    gate.try_enter("AAA", 1)  # a new day: the latch clears in the decision

    changes = [(e.previous, e.state, e.latch is not None) for e in listener.of(StateChanged)]
    active, reducing, halted = TradingState.ACTIVE, TradingState.REDUCING, TradingState.HALTED
    assert changes == [
        (active, halted, False),
        (halted, reducing, False),
        (reducing, active, False),
        (active, reducing, True),
        (reducing, active, False),
    ]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 5 and all("\n" not in line for line in lines)
    assert "max_daily_loss" in lines[3]
    assert listener.under_lock == 0


def test_a_listener_that_raises_is_logged_in_one_line_and_never_reaches_the_caller(
    gate: PortfolioGate, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise ZeroDivisionError("listener bug")

    heard = Heard(gate.ledger)
    gate.subscribe(broken)
    gate.subscribe(heard)
    caplog.set_level(logging.WARNING, "pendingledger")
    decision = gate.try_enter("AAA", 1)
    assert decision.admitted and decision.reservation.release()

    failures = [r for r in caplog.records if "listener bug" in r.getMessage()]
    assert len(failures) == 2 and not any(r.exc_info for r in failures)
    assert len(heard.events) == 2  # the next listener still heard both

    caplog.clear()
    caplog.set_level(logging.DEBUG, "pendingledger")
    gate.try_enter("BBB", 1)
    (failure,) = [r for r in caplog.records if "listener bug" in r.getMessage()]
    assert failure.exc_info  # the traceback, only when asked for


def test_a_listener_may_call_the_gate(gate: PortfolioGate) -> None:
    """It runs after the lock is released, so it can read the gate (under the lock it would
    deadlock, and the timeout would fail the test)."""
    seen: list[int] = []
    gate.subscribe(lambda event: seen.append(gate.ledger.stats().outstanding))
    decision = gate.try_enter("AAA", 1)
    assert decision.admitted
    decision.reservation.release()
    assert seen == [1, 0]


def test_subscriptions_are_counted_and_checked(gate: PortfolioGate, heard: Heard) -> None:
    with pytest.raises(TypeError, match=r"listener must be callable.*42"):
        gate.subscribe(42)  # type: ignore[arg-type]
    gate.subscribe(heard)  # again: counted, still told once
    gate.try_enter("AAA", 1)
    assert len(heard.of(Decided)) == 1
    assert gate.unsubscribe(heard) and gate.unsubscribe(heard)
    assert not gate.unsubscribe(heard)
    gate.try_enter("BBB", 1)
    assert len(heard.events) == 1


def test_two_gates_on_one_ledger_tell_each_end_once(ledger: PendingEntryLedger) -> None:
    first, second = (
        PortfolioGate(ledger, PortfolioLimits()),
        PortfolioGate(ledger, PortfolioLimits()),
    )
    heard = Heard(ledger)
    first.subscribe(heard)
    second.subscribe(heard)
    decision = second.try_enter("AAA", 1, order_id="o")
    assert decision.admitted and decision.reservation.release()
    assert heard.ends() == [("o", EndReason.RELEASED)]
    first.unsubscribe(heard)
    again = second.try_enter("BBB", 1, order_id="p")
    assert again.admitted
    assert second.release_order("p")
    assert heard.ends()[-1] == ("p", EndReason.RELEASED)


def test_denials_log_at_debug_and_expiries_warn(
    gate: PortfolioGate, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "pendingledger")
    gate.halt()
    gate.try_enter("AAA", 7)
    assert any(
        r.levelno == logging.DEBUG and "halted" in r.getMessage() and "'AAA'" in r.getMessage()
        for r in caplog.records
    )
    gate.resume()
    for oid in ("x", "y"):
        gate.try_enter("AAA", 1, order_id=oid)
    clock.advance(TTL)
    caplog.clear()
    gate.ledger.stats()  # sweeps both
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith("2 reservation(s) expired") and "'x'" in line


# --------------------------------------------------------------------------- the race


THREADS = 64
PER_THREAD = 40


def race(
    subscribe: Callable[[PortfolioGate, Callable[[Event], object]], None],
) -> tuple[list[Event], Counter[str], PortfolioGate]:
    """64 threads, started together, each making ``PER_THREAD`` decisions on 8 symbols against
    a limit of 4 open, holding up to 4 reservations at a time (so some are denied whatever the
    interleaving) and releasing them all; what the listener heard, and what was done."""
    ledger = PendingEntryLedger(TTL, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits(max_concurrent_positions=4))
    events: list[Event] = []
    subscribe(gate, events.append)
    done: Counter[str] = Counter()
    done_lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def trade(n: int) -> None:
        start.wait(timeout=30)
        mine: Counter[str] = Counter()
        held = []
        for i in range(PER_THREAD):
            decision = gate.try_enter(f"S{(n + i) % 8}", 1, timeout=0 if n % 4 == 0 else None)
            mine["decisions"] += 1
            if decision.admitted:
                mine["admitted"] += 1
                held.append(decision.reservation)
            if len(held) > 4:
                held.pop(0).release()
        for reservation in held:
            reservation.release()
        with done_lock:
            done.update(mine)

    threads = [threading.Thread(target=trade, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not any(t.is_alive() for t in threads)
    return events, done, gate


def check_every_event_told(events: list[Event], done: Counter[str], gate: PortfolioGate) -> None:
    decided = [e for e in events if isinstance(e, Decided)]
    admitted = [e for e in decided if e.decision.admitted]
    stats = gate.stats()
    assert len(decided) == done["decisions"] == stats.admitted + sum(stats.denied.values())
    assert len(admitted) == done["admitted"] == stats.admitted
    ends = [e for e in events if isinstance(e, Ended)]
    assert sorted(e.order_id for e in ends) == sorted(
        e.decision.reservation.order_id for e in admitted if e.decision.admitted
    )


def _subscribe(gate: PortfolioGate, listener: Callable[[Event], object]) -> None:
    gate.subscribe(listener)


@pytest.mark.usefixtures("fast_switching")
def test_a_listener_hears_every_decision_and_end_of_a_64_thread_race() -> None:
    events, done, gate = race(_subscribe)
    assert done["decisions"] == THREADS * PER_THREAD and 0 < done["admitted"] < done["decisions"]
    check_every_event_told(events, done, gate)


class TwoStepOutbox:
    """A lossy delivery: events queue in a shared outbox, and one thread at a time flushes it
    by copying it, then clearing it. An event queued between the two steps is never
    delivered. The first flush waits between them until another thread has queued one, so
    the loss is certain."""

    def __init__(self, deliver: Callable[[Event], object]) -> None:
        self.deliver = deliver
        self.outbox: list[Event] = []
        self.queued = threading.Condition()
        self.flushing = False
        self.first = True

    def __call__(self, event: Event) -> None:
        with self.queued:
            self.outbox.append(event)
            self.queued.notify_all()
            if self.flushing:
                return
            self.flushing = True
        copy = list(self.outbox)
        if self.first:
            self.first = False
            with self.queued:
                assert self.queued.wait_for(lambda: len(self.outbox) > len(copy), timeout=30)
        self.outbox.clear()
        with self.queued:
            self.flushing = False
        for queued in copy:
            self.deliver(queued)


def test_the_race_check_catches_a_lost_event() -> None:
    def lossy(gate: PortfolioGate, listener: Callable[[Event], object]) -> None:
        gate.subscribe(TwoStepOutbox(listener))

    events, done, gate = race(lossy)
    with pytest.raises(AssertionError):
        check_every_event_told(events, done, gate)
