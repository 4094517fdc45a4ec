"""PendingEntryLedger, PendingMap, Reservation: reservations, releases, TTL, lock(), stats."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable
from decimal import Decimal
from fractions import Fraction

import pytest

from pendingledger import (
    Decision,
    LedgerError,
    LedgerStats,
    LockTimeout,
    PendingEntryLedger,
    PendingMap,
    PortfolioGate,
    PortfolioLimits,
    ReentrantLockError,
    Reservation,
    ReservationHandle,
    ReservationState,
    StaleViewError,
)
from pendingledger.testing import ManualClock


def reserve(
    ledger: PendingEntryLedger, symbol: Hashable, notional: object, order_id: Hashable = None
) -> Reservation:
    with ledger.lock() as pending:
        return pending.reserve(symbol, notional, order_id=order_id)  # type: ignore[arg-type]


def is_active(res: Reservation) -> bool:
    return res.active  # a call, so mypy does not narrow the property across a clock step


def state_of(res: Reservation) -> ReservationState:
    return res.state


def check_counts(stats: LedgerStats) -> None:
    assert stats.reserved == stats.released + stats.expired + stats.outstanding


# ---------------------------------------------------------------------------- the seed's behaviours


def test_seed_round_trip_gross_and_new_slots(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        pending.reserve("AAA", 1000)
        pending.reserve("BBB", 500)
        assert pending.gross_notional() == 1500
        assert pending.new_slots(lambda symbol: False) == 2
        assert pending.new_slots(lambda symbol: symbol == "AAA") == 1
    assert ledger.release("AAA") is True
    with ledger.lock() as pending:
        assert pending.gross_notional() == 500
        assert "AAA" not in pending
        assert pending.contains("BBB")
        assert pending.new_slots(lambda symbol: False) == 1


def test_seed_same_symbol_accumulates_into_one_slot(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        first = pending.reserve("AAA", 1000)
        second = pending.reserve("AAA", 250)
        assert pending.gross_notional() == 1250
        assert pending.symbol_notional("AAA") == 1250
        assert pending.new_slots(lambda symbol: False) == 1
        assert len(pending) == 2  # reservations, not symbols
        assert list(pending) == ["AAA"]
    assert first.order_id != second.order_id


def test_seed_reservations_expire_after_ttl(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    reserve(ledger, "AAA", 1000)
    clock.advance(ledger.ttl / 2)
    with ledger.lock() as pending:
        assert "AAA" in pending
    clock.advance(ledger.ttl / 2)
    with ledger.lock() as pending:
        assert "AAA" not in pending
        assert len(pending) == 0
        assert pending.gross_notional() == 0
    stats = ledger.stats()
    assert (stats.outstanding, stats.expired, stats.released) == (0, 1, 0)


# ---------------------------------------------------------------------------- reservations


def test_reservation_attributes(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    clock.advance(7)
    res = reserve(ledger, "AAA", 1000, order_id="client-1")
    assert res.symbol == "AAA"
    assert res.order_id == "client-1"
    assert res.notional == 1000
    assert res.reserved_at == 7
    assert res.expires_at == 7 + ledger.ttl
    assert res.active is True
    assert res.state is ReservationState.ACTIVE


def test_reservation_cannot_be_built_directly() -> None:
    with pytest.raises(TypeError):
        Reservation()


def test_generated_order_ids_are_distinct_and_never_clash_with_callers(
    ledger: PendingEntryLedger,
) -> None:
    with ledger.lock() as pending:
        generated = [pending.reserve("AAA", 1) for _ in range(5)]
        ids = {res.order_id for res in generated}
        assert len(ids) == 5
        assert None not in ids
        # a caller's id that looks like a number never collides with a generated one
        for i in range(10):
            pending.reserve("BBB", 1, order_id=i)
        assert len(pending) == 15


def test_order_id_may_be_any_hashable(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        for order_id in (1, "x", ("x", 1), frozenset({1}), 2.5, b"id"):
            assert pending.reserve("AAA", 1, order_id=order_id).order_id == order_id


def test_duplicate_outstanding_order_id_is_refused(ledger: PendingEntryLedger) -> None:
    first = reserve(ledger, "AAA", 100, order_id="o-1")
    before = ledger.stats()
    with ledger.lock() as pending:
        with pytest.raises(ValueError, match=r"order_id 'o-1'"):
            pending.reserve("BBB", 5, order_id="o-1")
        assert len(pending) == 1
        assert "BBB" not in pending
    assert ledger.stats() == before
    assert first.active
    # once released, the id may be used again
    assert first.release()
    again = reserve(ledger, "BBB", 5, order_id="o-1")
    assert again.active and again is not first
    assert ledger.release_order("o-1") is True
    assert again.state is ReservationState.RELEASED and first.state is ReservationState.RELEASED


def test_pending_map_views(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        assert len(pending) == 0
        assert list(pending) == []
        assert pending.gross_notional() == 0
        assert pending.symbol_notional("AAA") == 0
        assert pending.new_slots(lambda symbol: False) == 0
        pending.reserve("AAA", 10)
        pending.reserve("BBB", 20)
        pending.reserve("CCC", 30)
        assert sorted(pending, key=str) == ["AAA", "BBB", "CCC"]
        assert pending.contains("AAA") and "AAA" in pending
        assert not pending.contains("DDD") and "DDD" not in pending
        assert pending.new_slots(lambda symbol: symbol in {"AAA", "CCC", "ZZZ"}) == 1


def test_new_slots_calls_is_open_with_each_reserved_symbol(ledger: PendingEntryLedger) -> None:
    asked: list[Hashable] = []

    def is_open(symbol: Hashable) -> bool:
        asked.append(symbol)
        return False

    with ledger.lock() as pending:
        pending.reserve("AAA", 1)
        pending.reserve("AAA", 1)
        pending.reserve("BBB", 1)
        assert pending.new_slots(is_open) == 2
    assert sorted(asked, key=str) == ["AAA", "BBB"]


def test_symbols_may_be_any_hashable(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        pending.reserve(("BTC", "USDT"), 5)
        pending.reserve(42, 5)
        assert ("BTC", "USDT") in pending and 42 in pending
    assert ledger.release(("BTC", "USDT")) is True
    assert ledger.release(42) is True


# ---------------------------------------------------------------------------- per-order TTL


def test_top_up_does_not_extend_an_older_reservations_life(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    ttl = ledger.ttl
    old = reserve(ledger, "AAA", 1000, order_id="old")
    clock.advance(ttl / 2)
    top_up = reserve(ledger, "AAA", 300, order_id="top-up")
    assert top_up.reserved_at == ttl / 2
    assert old.reserved_at == 0
    clock.advance(ttl / 2)  # old is due, top-up is half way
    with ledger.lock() as pending:
        assert pending.gross_notional() == 300
        assert pending.symbol_notional("AAA") == 300
        assert len(pending) == 1
    assert old.state is ReservationState.EXPIRED and not old.active
    assert top_up.active
    clock.advance(ttl / 2)
    with ledger.lock() as pending:
        assert "AAA" not in pending
    assert top_up.state is ReservationState.EXPIRED


def test_expiry_boundary_now_equal_to_deadline_expires(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    clock.advance(100)
    res = reserve(ledger, "AAA", 1)
    clock.advance(ledger.ttl - 0.5)
    with ledger.lock() as pending:
        assert "AAA" in pending  # just before reserved_at + ttl
    clock.advance(0.5)
    assert clock() == res.reserved_at + ledger.ttl
    with ledger.lock() as pending:
        assert "AAA" not in pending  # now >= reserved_at + ttl
    assert res.state is ReservationState.EXPIRED


def test_many_reservations_expire_in_order(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    made = []
    for i in range(20):
        made.append(reserve(ledger, f"S{i % 7}", i + 1, order_id=i))
        clock.advance(1)
    # reservation i was made at time i; at time t every i with i + ttl <= t is gone
    ttl = int(ledger.ttl)
    clock.advance(ttl - 20)  # now == ttl: reservation 0 is due
    for t in range(ttl, ttl + 21):
        with ledger.lock() as pending:
            live = {i for i in range(20) if i + ttl > t}
            assert len(pending) == len(live)
            assert pending.gross_notional() == sum(i + 1 for i in live)
        assert [res.active for res in made] == [i in live for i in range(20)]
        clock.advance(1)
    check_counts(ledger.stats())
    assert ledger.stats().expired == 20


def test_expiry_after_releases_out_of_order(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    first = reserve(ledger, "A", 1)
    clock.advance(1)
    second = reserve(ledger, "B", 2)
    clock.advance(1)
    third = reserve(ledger, "C", 4)
    assert first.release()
    clock.advance(ledger.ttl - 1)  # second is due (made at 1), third is not (made at 2)
    assert ledger.stats().gross_notional == 4
    assert second.state is ReservationState.EXPIRED
    assert third.active
    clock.advance(1)
    stats = ledger.stats()
    assert (stats.outstanding, stats.released, stats.expired) == (0, 1, 2)


def test_releasing_everything_then_reserving_again_still_expires(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    for _ in range(3):
        res = reserve(ledger, "A", 5)
        assert res.release()
    clock.advance(1)
    late = reserve(ledger, "B", 5)
    clock.advance(ledger.ttl)
    assert ledger.stats().outstanding == 0
    assert late.state is ReservationState.EXPIRED


# ---------------------------------------------------------------------------- expiry is noticed on
# every acquisition, and on_expire runs once per reservation with the lock free

Trigger = Callable[[PendingEntryLedger, Reservation], object]


def _take_lock(ledger: PendingEntryLedger, res: Reservation) -> object:
    with ledger.lock() as pending:
        return len(pending)


TRIGGERS: dict[str, Trigger] = {
    "stats": lambda ledger, res: ledger.stats(),
    "lock": _take_lock,
    "release_order": lambda ledger, res: ledger.release_order(res.order_id),
    "release_symbol": lambda ledger, res: ledger.release(res.symbol),
    "release_other_order": lambda ledger, res: ledger.release_order("other"),
    "reservation_release": lambda ledger, res: res.release(),
    "reservation_reduce": lambda ledger, res: res.reduce(1),
    "try_enter": lambda ledger, res: PortfolioGate(ledger, PortfolioLimits()).try_enter(
        "ZZZ", 1, {}
    ),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_on_expire_runs_once_per_reservation_with_the_lock_free(
    clock: ManualClock, trigger: str
) -> None:
    calls: list[tuple[Reservation, bool, bool]] = []

    def on_expire(res: Reservation) -> None:
        try:
            with ledger.lock(timeout=0) as pending:
                calls.append((res, True, res.symbol in pending))
        except LedgerError:
            calls.append((res, False, True))

    ledger = PendingEntryLedger(10, clock=clock, on_expire=on_expire)
    res = reserve(ledger, "AAA", 100, order_id="o")
    other = reserve(ledger, "BBB", 50, order_id="other")
    assert other.release()
    clock.advance(10)
    result = TRIGGERS[trigger](ledger, res)
    assert [(r, ok) for r, ok, _ in calls] == [(res, True)]
    assert calls[0][2] is False  # the callback already sees the reservation gone
    assert res.state is ReservationState.EXPIRED
    if trigger in ("release_order", "release_symbol", "reservation_release", "reservation_reduce"):
        assert result is False  # it expired first: nothing left to release
    stats = ledger.stats()
    assert stats.expired == 1
    assert stats.released == 1  # only "other"
    check_counts(stats)
    ledger.stats()
    with ledger.lock():
        pass
    assert len(calls) == 1  # never again


def test_on_expire_fires_after_the_lock_block_ends(clock: ManualClock) -> None:
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(5, clock=clock, on_expire=expired.append)
    res = reserve(ledger, "AAA", 1)
    clock.advance(5)
    with ledger.lock() as pending:
        assert "AAA" not in pending  # dropped on acquisition
        assert expired == []  # but the callback waits until the lock is released
    assert expired == [res]


def test_on_expire_called_for_each_expired_reservation(clock: ManualClock) -> None:
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(5, clock=clock, on_expire=expired.append)
    made = [reserve(ledger, "AAA" if i % 2 else "BBB", i + 1, order_id=i) for i in range(6)]
    assert made[3].release()
    clock.advance(5)
    ledger.stats()
    assert sorted(r.order_id for r in expired) == [0, 1, 2, 4, 5]  # type: ignore[type-var]
    assert len(expired) == len(set(map(id, expired)))


def test_on_expire_exceptions_are_logged_not_raised(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Hashable] = []

    def on_expire(res: Reservation) -> None:
        seen.append(res.order_id)
        raise RuntimeError(f"boom {res.order_id}")

    ledger = PendingEntryLedger(5, clock=clock, on_expire=on_expire)
    reserve(ledger, "AAA", 1, order_id="a")
    reserve(ledger, "BBB", 1, order_id="b")
    clock.advance(5)
    with caplog.at_level(logging.ERROR, logger="pendingledger"):
        stats = ledger.stats()  # does not raise
    assert stats.expired == 2
    assert seen == ["a", "b"]  # the first failure does not stop the second callback
    errors = [r for r in caplog.records if r.name == "pendingledger"]
    assert len(errors) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in errors)
    with ledger.lock(timeout=0):
        pass


def test_on_expire_may_use_the_ledger(clock: ManualClock) -> None:
    ledger: PendingEntryLedger

    def on_expire(res: Reservation) -> None:
        ledger.release(res.symbol)  # e.g. tidy the rest of the symbol
        reserve(ledger, "NEW", 1, order_id=("renew", res.order_id))

    ledger = PendingEntryLedger(5, clock=clock, on_expire=on_expire)
    reserve(ledger, "AAA", 1, order_id=1)
    clock.advance(5)
    assert ledger.stats().outstanding == 0  # the snapshot is taken before the callback runs
    with ledger.lock() as pending:
        assert "NEW" in pending
        assert len(pending) == 1


# ---------------------------------------------------------------------------- release paths


def test_release_symbol_drops_every_order_on_it(ledger: PendingEntryLedger) -> None:
    a1 = reserve(ledger, "AAA", 100)
    a2 = reserve(ledger, "AAA", 200)
    b = reserve(ledger, "BBB", 50)
    assert ledger.release("AAA") is True
    assert not a1.active and not a2.active and b.active
    assert a1.state is ReservationState.RELEASED
    assert ledger.release("AAA") is False  # idempotent
    assert ledger.release("never-reserved") is False
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.released) == (1, 50, 2)
    check_counts(stats)


def test_release_order_drops_only_that_order(ledger: PendingEntryLedger) -> None:
    a1 = reserve(ledger, "AAA", 100, order_id="a1")
    a2 = reserve(ledger, "AAA", 200, order_id="a2")
    assert ledger.release_order("a1") is True
    assert ledger.release_order("a1") is False
    assert ledger.release_order("unknown") is False
    assert not a1.active and a2.active
    with ledger.lock() as pending:
        assert "AAA" in pending
        assert pending.gross_notional() == 200
    stats = ledger.stats()
    assert (stats.outstanding, stats.released) == (1, 1)


def test_reservation_release_is_idempotent(ledger: PendingEntryLedger) -> None:
    res = reserve(ledger, "AAA", 100)
    other = reserve(ledger, "AAA", 1)
    assert res.release() is True
    assert res.release() is False
    assert res.state is ReservationState.RELEASED
    assert res.notional == 100  # keeps the amount it held when it ended
    assert other.active
    assert ledger.stats().released == 1


def test_release_paths_inside_a_block(ledger: PendingEntryLedger) -> None:
    a = reserve(ledger, "AAA", 1, order_id="a")
    b = reserve(ledger, "BBB", 2, order_id="b")
    c = reserve(ledger, "CCC", 4, order_id="c")
    d = reserve(ledger, "DDD", 8, order_id="d")
    with ledger.lock(timeout=0) as pending:
        assert ledger.release("AAA") is True
        assert ledger.release_order("b") is True
        assert c.release() is True
        assert pending.release("DDD") is True
        assert pending.release("DDD") is False
        assert pending.release_order("b") is False
        assert len(pending) == 0
        assert pending.gross_notional() == 0
    assert not any(r.active for r in (a, b, c, d))
    assert ledger.stats().released == 4


def test_pending_map_release_order(ledger: PendingEntryLedger) -> None:
    reserve(ledger, "AAA", 1, order_id="a")
    with ledger.lock() as pending:
        assert pending.release_order("a") is True
        assert pending.release_order("a") is False
        assert "AAA" not in pending


def test_ledgers_share_nothing(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    other_ledger = PendingEntryLedger(5, clock=clock)
    res = reserve(other_ledger, "AAA", 1)
    assert res.release() is True
    # released through its own ledger; the two ledgers share nothing
    assert ledger.stats().released == 0


# ---------------------------------------------------------------------------- partial fills


def test_reduce_partial_fills_then_to_zero(ledger: PendingEntryLedger) -> None:
    res = reserve(ledger, "AAA", 1000)
    assert res.reduce(300) is True
    assert res.notional == 700
    assert ledger.stats().outstanding == 1
    with ledger.lock() as pending:
        assert pending.gross_notional() == 700
        assert pending.symbol_notional("AAA") == 700
    assert res.reduce(700) is True
    assert not res.active
    assert res.state is ReservationState.FILLED
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.released) == (0, 0, 1)
    check_counts(stats)
    assert res.reduce(1) is False  # ended: nothing to do
    assert res.release() is False
    assert ledger.stats() == stats


def test_reduce_over_fill_releases(ledger: PendingEntryLedger) -> None:
    res = reserve(ledger, "AAA", 100)
    keep = reserve(ledger, "AAA", 5)
    assert res.reduce(250) is True
    assert res.state is ReservationState.FILLED
    assert res.notional == 100  # ended holding what remained
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.released) == (1, 5, 1)
    assert keep.active


def test_reduce_keeps_the_reservation_life(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    res = reserve(ledger, "AAA", 100)
    clock.advance(ledger.ttl - 1)
    assert res.reduce(10)
    assert res.reserved_at == 0
    clock.advance(1)
    assert ledger.stats().outstanding == 0
    assert res.state is ReservationState.EXPIRED
    assert res.reduce(1) is False


def test_release_and_reduce_on_expired_do_nothing(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    res = reserve(ledger, "AAA", 100, order_id="o")
    clock.advance(ledger.ttl)
    before = ledger.stats()
    assert res.release() is False
    assert res.reduce(10) is False
    assert ledger.release_order("o") is False
    assert ledger.release("AAA") is False
    after = ledger.stats()
    assert after == before
    assert (after.expired, after.released) == (1, 0)
    assert res.state is ReservationState.EXPIRED


def test_reduce_inside_a_block(ledger: PendingEntryLedger) -> None:
    res = reserve(ledger, "AAA", Decimal("10.5"))
    with ledger.lock() as pending:
        assert res.reduce(Decimal("0.5")) is True
        assert res.notional == Decimal("10.0")
        assert pending.gross_notional() == Decimal(10)
        assert res.reduce(Decimal(10)) is True
        assert "AAA" not in pending
    assert res.state is ReservationState.FILLED


# ---------------------------------------------------------------------------- stats


def test_stats_counts(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (0, 0)
    assert (stats.reserved, stats.released, stats.expired) == (0, 0, 0)
    made = [reserve(ledger, f"S{i}", 10, order_id=i) for i in range(6)]
    made[0].release()
    ledger.release_order(1)
    ledger.release("S2")
    made[3].reduce(10)  # filled: counts as released
    made[4].reduce(4)  # partial: still outstanding
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (2, 16)
    assert (stats.reserved, stats.released, stats.expired) == (6, 4, 0)
    clock.advance(ledger.ttl)
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (0, 0)
    assert (stats.reserved, stats.released, stats.expired) == (6, 4, 2)
    check_counts(stats)


def test_stats_is_a_frozen_snapshot(ledger: PendingEntryLedger) -> None:
    stats = ledger.stats()
    reserve(ledger, "A", 1)
    assert stats.outstanding == 0
    with pytest.raises(AttributeError):
        stats.outstanding = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------- lock(): atomicity


def _state(ledger: PendingEntryLedger, made: list[Reservation]) -> object:
    return (
        ledger.stats(),
        [(r.active, r.state, r.notional, r.reserved_at) for r in made],
        _book(ledger),
    )


def _book(ledger: PendingEntryLedger) -> object:
    with ledger.lock(timeout=0) as pending:
        symbols = sorted(pending, key=str)
        return (
            len(pending),
            pending.gross_notional(),
            symbols,
            [pending.symbol_notional(s) for s in symbols],
            pending.new_slots(lambda s: s == "AAA"),
        )


class Boom(Exception):
    pass


def test_lock_block_that_raises_is_rolled_back(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    made = [
        reserve(ledger, "AAA", 100, order_id="a"),
        reserve(ledger, "AAA", 0.25, order_id="a2"),
        reserve(ledger, "BBB", Decimal("7.5"), order_id="b"),
        reserve(ledger, "CCC", 40, order_id="c"),
        reserve(ledger, "DDD", 9, order_id="d"),
    ]
    made[4].reduce(1)
    clock.advance(1)
    before = _state(ledger, made)
    inside: list[Reservation] = []
    with pytest.raises(Boom), ledger.lock() as pending:
        inside.append(pending.reserve("EEE", 1000, order_id="e"))
        inside.append(pending.reserve("AAA", 5, order_id="a3"))
        assert ledger.release("AAA") is True  # a, a2, a3
        assert made[2].reduce(Decimal("2.5")) is True  # partial
        assert made[3].reduce(40) is True  # filled
        assert ledger.release_order("d") is True
        inside.append(pending.reserve("FFF", Fraction(1, 3), order_id="f"))  # grows the den
        inside.append(pending.reserve("GGG", 1e-9, order_id="a"))  # reuses a released id
        assert made[2].reduce(Fraction(1, 7)) is True
        assert inside[0].release() is True
        assert len(pending) == 3
        raise Boom
    assert _state(ledger, made) == before
    for res in inside:
        assert not res.active
        assert res.state is ReservationState.ROLLED_BACK
        assert res.release() is False
    # the restored reservations behave as before: their TTL and release still work
    assert made[0].reserved_at == 0
    assert ledger.release_order("a") is True
    clock.advance(ledger.ttl)
    stats = ledger.stats()
    assert stats.outstanding == 0
    assert (stats.reserved, stats.released, stats.expired) == (5, 1, 4)


def test_rollback_of_an_empty_ledger(ledger: PendingEntryLedger) -> None:
    with pytest.raises(Boom), ledger.lock() as pending:
        res = pending.reserve("AAA", 1)
        raise Boom
    assert res.state is ReservationState.ROLLED_BACK
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.reserved) == (0, 0, 0)
    with ledger.lock() as pending:
        assert "AAA" not in pending


def test_rolled_back_reserve_then_later_reservations_still_expire(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    kept = reserve(ledger, "K", 1)
    with pytest.raises(Boom), ledger.lock() as pending:
        pending.reserve("X", 1)
        raise Boom
    clock.advance(1)
    late = reserve(ledger, "L", 1)
    clock.advance(ledger.ttl - 1)
    ledger.stats()
    assert kept.state is ReservationState.EXPIRED and late.active
    clock.advance(1)
    ledger.stats()
    assert late.state is ReservationState.EXPIRED


def test_rollback_restores_a_reservation_that_expires_on_time(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    res = reserve(ledger, "AAA", 10)
    clock.advance(5)
    with pytest.raises(Boom), ledger.lock():
        assert res.release()
        raise Boom
    assert res.active and res.reserved_at == 0
    clock.advance(ledger.ttl - 5)
    assert ledger.stats().outstanding == 0
    assert res.state is ReservationState.EXPIRED


@pytest.mark.parametrize("order", ["oldest first", "newest first"])
def test_rollback_of_a_block_that_emptied_the_ledger_keeps_every_ttl(
    ledger: PendingEntryLedger, clock: ManualClock, order: str
) -> None:
    old = reserve(ledger, "A", 1)
    clock.advance(1)
    new = reserve(ledger, "B", 2)
    clock.advance(1)
    with pytest.raises(Boom), ledger.lock() as pending:
        for res in (old, new) if order == "oldest first" else (new, old):
            assert res.release()
        assert len(pending) == 0
        pending.reserve("C", 4)
        raise Boom
    assert old.active and new.active
    clock.advance(ledger.ttl - 2)  # old is due (made at 0), new is not (made at 1)
    assert ledger.stats().gross_notional == 2
    assert old.state is ReservationState.EXPIRED
    clock.advance(1)
    assert ledger.stats().outstanding == 0
    assert new.state is ReservationState.EXPIRED


def test_block_that_catches_its_own_exception_keeps_its_changes(
    ledger: PendingEntryLedger,
) -> None:
    with ledger.lock() as pending:
        pending.reserve("AAA", 1)
        with contextlib.suppress(ValueError):
            pending.reserve("BBB", -1)
    assert ledger.stats().outstanding == 1


def test_lock_is_released_after_an_exception(ledger: PendingEntryLedger) -> None:
    with pytest.raises(Boom), ledger.lock():
        raise Boom
    with ledger.lock(timeout=0) as pending:
        assert len(pending) == 0
    # and from another thread too
    done = threading.Event()

    def other() -> None:
        with ledger.lock(timeout=5):
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    assert done.is_set()


def test_base_exceptions_roll_back_too(ledger: PendingEntryLedger) -> None:
    with pytest.raises(KeyboardInterrupt), ledger.lock() as pending:
        pending.reserve("AAA", 1)
        raise KeyboardInterrupt
    assert ledger.stats().outstanding == 0
    with ledger.lock(timeout=0):
        pass


def test_lock_context_manager_is_single_use(ledger: PendingEntryLedger) -> None:
    block = ledger.lock()
    with block:
        pass
    with pytest.raises(LedgerError), block:
        pass
    with ledger.lock(timeout=0):
        pass


# ---------------------------------------------------------------------------- lock(): re-entrancy

Reentry = Callable[[PendingEntryLedger], object]


def _enter_lock(timeout: float | None) -> Reentry:
    def enter(ledger: PendingEntryLedger) -> object:
        with ledger.lock(timeout):
            return None

    return enter


REENTRIES: dict[str, Reentry] = {
    "lock()": _enter_lock(None),
    "lock(timeout=0)": _enter_lock(0),
    "lock(timeout=30)": _enter_lock(30),
    "try_enter": lambda ledger: PortfolioGate(ledger, PortfolioLimits()).try_enter("Z", 1, {}),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("reentry", list(REENTRIES))
def test_reentry_raises_at_once(ledger: PendingEntryLedger, reentry: str) -> None:
    res = reserve(ledger, "AAA", 1)
    before = ledger.stats()
    with ledger.lock() as pending:
        with pytest.raises(ReentrantLockError):
            REENTRIES[reentry](ledger)
        # the block is still usable after the refused re-entry
        assert "AAA" in pending
        pending.reserve("BBB", 2)
    assert isinstance(ReentrantLockError(), RuntimeError)
    stats = ledger.stats()
    assert stats.outstanding == before.outstanding + 1
    assert res.active
    with ledger.lock(timeout=0):
        pass


@pytest.mark.timeout(10)
def test_reentry_error_propagating_out_of_a_block_rolls_back(ledger: PendingEntryLedger) -> None:
    with pytest.raises(ReentrantLockError), ledger.lock() as pending:
        pending.reserve("AAA", 1)
        with ledger.lock():
            pass  # pragma: no cover
    assert ledger.stats().outstanding == 0
    with ledger.lock(timeout=0):
        pass


@pytest.mark.timeout(10)
def test_stats_inside_a_block_reads_the_blocks_state(ledger: PendingEntryLedger) -> None:
    """Re-entry "either works or raises ReentrantLockError"; stats() works, reading in place."""
    kept = reserve(ledger, "AAA", 10)
    with ledger.lock() as pending:
        pending.reserve("BBB", 5)
        assert kept.release()
        stats = ledger.stats()
        assert (stats.outstanding, stats.gross_notional, stats.released) == (1, 5, 1)
        check_counts(stats)
    with pytest.raises(Boom), ledger.lock() as pending:
        pending.reserve("CCC", 7)
        assert ledger.stats().outstanding == 2
        raise Boom
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.reserved) == (1, 5, 2)


@pytest.mark.timeout(10)
def test_another_threads_block_does_not_count_as_reentry(ledger: PendingEntryLedger) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with ledger.lock(timeout=5) as pending:
                pending.reserve("T", 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with ledger.lock() as pending:
        pending.reserve("M", 1)
    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    assert errors == []
    assert ledger.stats().outstanding == 2


# ---------------------------------------------------------------------------- lock(): timeout


@pytest.mark.timeout(10)
@pytest.mark.parametrize("timeout", [0, 0.01])
def test_lock_timeout_when_another_thread_holds_it(
    ledger: PendingEntryLedger, timeout: float
) -> None:
    reserve(ledger, "AAA", 1)
    held = threading.Event()
    let_go = threading.Event()

    def holder() -> None:
        with ledger.lock():
            held.set()
            let_go.wait(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert held.wait(5)
        with pytest.raises(LockTimeout, match=r"timeout|within") as info, ledger.lock(timeout):
            pytest.fail("acquired a lock another thread holds")  # pragma: no cover
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, LedgerError)
    finally:
        let_go.set()
        thread.join(10)
    assert not thread.is_alive()
    with ledger.lock(timeout=0) as pending:  # free again, nothing changed
        assert len(pending) == 1


# ---------------------------------------------------------------------------- lock(): stale view

VIEW_USES: dict[str, Callable[[PendingMap], object]] = {
    "contains": lambda p: p.contains("AAA"),
    "in": lambda p: "AAA" in p,
    "len": len,
    "iter": list,
    "gross_notional": lambda p: p.gross_notional(),
    "symbol_notional": lambda p: p.symbol_notional("AAA"),
    "new_slots": lambda p: p.new_slots(lambda s: False),
    "reserve": lambda p: p.reserve("BBB", 1),
    "release": lambda p: p.release("AAA"),
    "release_order": lambda p: p.release_order("o"),
}


@pytest.mark.parametrize("use", list(VIEW_USES))
def test_view_is_stale_after_its_block(ledger: PendingEntryLedger, use: str) -> None:
    reserve(ledger, "AAA", 1, order_id="o")
    with ledger.lock() as pending:
        VIEW_USES[use](pending)  # fine inside
    before = ledger.stats()
    with pytest.raises(StaleViewError):
        VIEW_USES[use](pending)
    assert issubclass(StaleViewError, LedgerError)
    # still stale while a later block is open
    with ledger.lock(), pytest.raises(LedgerError):
        VIEW_USES[use](pending)
    after = ledger.stats()
    assert (after.outstanding, after.reserved, after.released) == (
        before.outstanding,
        before.reserved,
        before.released,
    )


def test_view_is_stale_after_a_block_that_raised(ledger: PendingEntryLedger) -> None:
    with pytest.raises(Boom), ledger.lock() as pending:
        raise Boom
    with pytest.raises(StaleViewError):
        len(pending)


# ---------------------------------------------------------------------------- misc


def test_ledger_properties(clock: ManualClock) -> None:
    ledger = PendingEntryLedger(2, clock=clock)
    assert ledger.ttl == 2.0
    assert ledger.clock is clock
    assert "PendingEntryLedger" in repr(ledger)


def test_default_clock_is_monotonic() -> None:
    ledger = PendingEntryLedger(60)
    res = reserve(ledger, "AAA", 1)
    assert res.active
    assert res.expires_at == res.reserved_at + 60


def test_a_clock_that_steps_back_breaks_nothing() -> None:
    """A monotonic clock is expected; one that steps back must still not lose reservations."""
    readings = iter([100.0, 50.0, 55.0, 200.0, 200.0])
    ledger = PendingEntryLedger(10, clock=lambda: next(readings))
    first = reserve(ledger, "A", 1)  # clock 100
    second = reserve(ledger, "B", 1)  # clock 50
    assert ledger.stats().outstanding == 2  # clock 55: neither is due
    assert ledger.stats().outstanding == 0  # clock 200: both are
    assert first.state is ReservationState.EXPIRED
    assert second.state is ReservationState.EXPIRED


class _Preempted:
    """A ledger on a ``ManualClock`` whose clock, read by a ``try_enter`` running in a thread of
    its own, holds that thread right after the reading, before it takes the lock: what a thread
    switch there does. ``while_held`` runs the rest of the world in that gap."""

    def __init__(self) -> None:
        self.manual = ManualClock()
        self._read = threading.Event()
        self._go_on = threading.Event()
        self.ledger = PendingEntryLedger(10, clock=self._clock)
        self.gate = PortfolioGate(self.ledger, PortfolioLimits())

    def _clock(self) -> float:
        now = self.manual()
        if threading.current_thread().name == "preempted":
            self._read.set()
            self._go_on.wait(5)
        return now

    def while_held(self, symbol: str, meanwhile: Callable[[], object]) -> Reservation:
        """``try_enter(symbol)`` reads the clock, ``meanwhile()`` runs, then it commits."""
        decisions: list[Decision] = []
        slow = threading.Thread(
            target=lambda: decisions.append(self.gate.try_enter(symbol, 1, {})), name="preempted"
        )
        slow.start()
        try:
            assert self._read.wait(5)
            meanwhile()
        finally:
            self._go_on.set()
            slow.join(5)
        late = decisions[0].reservation
        assert isinstance(late, Reservation)
        return late


@pytest.mark.timeout(10)
def test_reservation_expires_at_its_expires_at_even_when_committed_out_of_order() -> None:
    world = _Preempted()
    fast: list[ReservationHandle | None] = []

    def meanwhile() -> None:
        world.manual.advance(5)
        fast.append(world.gate.try_enter("FAST", 1, {}).reservation)  # reads 5, commits first

    late = world.while_held("SLOW", meanwhile)  # read 0, commits second
    assert fast[0] is not None
    world.manual.advance(5)  # now 10
    world.ledger.stats()
    for res in (late, fast[0]):
        assert res.active is (world.manual() < res.expires_at), (res, res.expires_at)


@pytest.mark.timeout(10)
def test_a_reservation_stamped_from_a_reading_older_than_an_empty_sweep_expires_on_time() -> None:
    """A sweep that empties the ledger sets the next expiry check from its own `now`; a thread
    that read the clock earlier and reserves after it must still expire at its `expires_at`."""
    world = _Preempted()

    def meanwhile() -> None:
        world.manual.advance(100)
        world.ledger.stats()  # sweeps the empty ledger at 100

    late = world.while_held("SLOW", meanwhile)  # read 0, commits after the sweep
    for step in (0, 5, 5):
        world.manual.advance(step)
        world.ledger.stats()
        assert is_active(late) is (world.manual() < late.expires_at), late.expires_at
    assert late.state is ReservationState.EXPIRED


def test_a_reservation_restored_by_a_rollback_still_expires_on_time(clock: ManualClock) -> None:
    """A rollback puts an ended reservation back behind newer ones; the sweep, which takes
    reservations oldest first, must still find it when its TTL runs out."""
    ledger = PendingEntryLedger(10, clock=clock)
    old = reserve(ledger, "AAA", 1, order_id="old")
    clock.advance(5)
    new = reserve(ledger, "BBB", 1, order_id="new")
    with pytest.raises(RuntimeError), ledger.lock() as pending:
        assert pending.release_order("old")
        raise RuntimeError("undo")
    assert is_active(old)
    clock.advance(5)  # old's deadline; new has 5 s left
    assert state_of(old) is ReservationState.EXPIRED
    assert state_of(new) is ReservationState.ACTIVE
    assert ledger.stats().expired == 1


def test_a_rollback_restores_the_amount_after_the_ledger_emptied_in_the_block() -> None:
    """Emptying the ledger lets the common denominator start again; not inside a block that may
    be undone, whose rollback rescales what it restores from the old denominator."""
    ledger = PendingEntryLedger(10, clock=ManualClock())
    res = reserve(ledger, "AAA", Fraction(1, 2), order_id="a")
    with pytest.raises(KeyError), ledger.lock() as pending:
        res.release()  # the ledger is empty now
        pending.reserve("BBB", Fraction(1, 3))
        raise KeyError("undo")
    assert res.notional == Fraction(1, 2)
    assert ledger.stats().gross_notional == Fraction(1, 2)
    res.release()
    gate = PortfolioGate(ledger, PortfolioLimits())
    assert gate.try_enter("CCC", Fraction(1, 5))  # empty, outside a block: it starts again
    assert ledger._den == 5


def test_a_reservation_never_reads_as_active_past_its_ttl(clock: ManualClock) -> None:
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(10, clock=clock, on_expire=expired.append)
    with ledger.lock() as pending:
        res = pending.reserve("AAA", 100)
    clock.advance(9.999)
    assert res.active
    assert res.state is ReservationState.ACTIVE
    clock.advance(0.001)
    # No decision or release has taken the lock since: reading the state sweeps it.
    assert not is_active(res)
    assert state_of(res) is ReservationState.EXPIRED
    assert expired == [res]  # on_expire fired once, after the sweep released the lock
    assert ledger.stats().expired == 1
    assert ledger.stats().outstanding == 0


def test_state_inside_the_own_block_reads_without_sweeping(clock: ManualClock) -> None:
    ledger = PendingEntryLedger(10, clock=clock)
    with ledger.lock() as pending:
        res = pending.reserve("AAA", 100)
    clock.advance(10)
    with ledger.lock() as pending:  # this acquisition sweeps it first
        assert res.state is ReservationState.EXPIRED
        other = pending.reserve("BBB", 1)
        clock.advance(10)
        assert other.active  # no sweep can run inside the block: read as the block sees it
    assert not other.active


def test_rollback_restores_the_type_of_sums(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        pending.reserve("AAA", 1.5)
    with pytest.raises(RuntimeError), ledger.lock() as pending:
        pending.reserve("BBB", Fraction(1, 3))  # a new kind of amount, then the block fails
        raise RuntimeError("abort")
    gross = ledger.stats().gross_notional
    assert gross == 1.5
    assert type(gross) is float  # not Fraction: the block left nothing behind


def test_an_emptied_ledger_forgets_an_odd_denominator(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        odd = pending.reserve("AAA", Fraction(1, 3**600))
    odd.release()
    with ledger.lock() as pending:
        pending.reserve("BBB", 0.5)  # needs a rescale: the empty ledger starts again from 2
    assert ledger._den == 2


def test_a_common_denominator_past_the_cap_is_refused(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        for p in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31):
            pending.reserve(f"S{p}", Fraction(1, p**100))  # each under 1100 bits, ~3650 in all
    before = ledger.stats()
    with pytest.raises(ValueError, match="common denominator"), ledger.lock() as pending:
        pending.reserve("T", Fraction(1, 37**150))  # 781 more bits: past the 4096-bit cap
    assert ledger.stats() == before
