"""PendingEntryLedger, PendingMap, Reservation: reservations, releases, TTL, lock(), audit."""

from __future__ import annotations

import contextlib
import logging
import numbers
import random
import re
import threading
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from pendingledger import (
    Decision,
    DenyReason,
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
    _units,
)
from pendingledger._core import SWEEP_LIMIT
from pendingledger.testing import ManualClock

Number = int | float | Decimal | Fraction
GENERATED = re.compile(r"pl-[0-9a-f]{16}-(0|[1-9][0-9]*)")
"""The documented form of a generated order id: ``pl-<16 hex>-<seq>``."""


def reserve(
    ledger: PendingEntryLedger, symbol: str, notional: object, order_id: str | None = None
) -> Reservation:
    """One reservation made in a lock() block of its own."""
    with ledger.lock() as pending:
        return pending.reserve(symbol, notional, order_id=order_id)


def untyped(value: object) -> Any:
    """``value`` typed as Any: lets a test pass what the signature refuses, on purpose."""
    return value


def is_active(res: Reservation) -> bool:
    """A call, so mypy does not narrow the property across a clock step."""
    return res.active


def state_of(res: Reservation) -> ReservationState:
    """A call, so mypy does not narrow the property across a clock step."""
    return res.state


def as_reservation(handle: ReservationHandle | None) -> Reservation:
    """The in-process Reservation behind a Decision's handle."""
    assert isinstance(handle, Reservation)
    return handle


def check_counts(stats: LedgerStats) -> None:
    """The invariant every LedgerStats keeps."""
    assert stats.reserved == stats.released + stats.expired + stats.outstanding


def prefix_of(res: Reservation) -> str:
    """The ledger's generated-id prefix, ``pl-<16 hex>-``, read off a generated id."""
    match = GENERATED.fullmatch(res.order_id)
    assert match is not None, res.order_id
    return res.order_id[: match.start(1)]


class Boom(Exception):
    """Raised by tests to make a lock() block fail."""


# ---------------------------------------------------------------------------- the seed's behaviours


def test_seed_round_trip_gross_and_new_slots(ledger: PendingEntryLedger) -> None:
    """Reserve two symbols, read gross and new slots, release one, read again."""
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
    """Two reservations on one symbol add up and take one slot, with distinct order ids."""
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
    """A reservation is gone once its TTL has run out, and counts as expired."""
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
    """What a fresh reservation reports."""
    clock.advance(7)
    res = reserve(ledger, "AAA", 1000, order_id="client-1")
    assert res.symbol == "AAA"
    assert res.order_id == "client-1"
    assert res.notional == 1000
    assert res.initial_notional == 1000
    assert res.reserved_at == 7
    assert res.expires_at == 7 + ledger.ttl
    assert res.active is True
    assert res.state is ReservationState.ACTIVE
    assert "client-1" in repr(res) and "active" in repr(res)


def test_reservation_cannot_be_built_directly() -> None:
    """Reservations come from a ledger only."""
    with pytest.raises(TypeError):
        Reservation()  # type: ignore[call-arg]


def test_pending_map_views(ledger: PendingEntryLedger) -> None:
    """len, iteration, membership, sums and new_slots of a PendingMap."""
    with ledger.lock() as pending:
        assert len(pending) == 0
        assert list(pending) == []
        assert pending.gross_notional() == 0
        assert pending.symbol_notional("AAA") == 0
        assert pending.new_slots(lambda symbol: False) == 0
        pending.reserve("AAA", 10)
        pending.reserve("BBB", 20)
        pending.reserve("CCC", 30)
        assert sorted(pending) == ["AAA", "BBB", "CCC"]
        assert pending.contains("AAA") and "AAA" in pending
        assert not pending.contains("DDD") and "DDD" not in pending
        assert pending.new_slots(lambda symbol: symbol in {"AAA", "CCC", "ZZZ"}) == 1


def test_new_slots_calls_is_open_with_each_reserved_symbol(ledger: PendingEntryLedger) -> None:
    """is_open is asked once per reserved symbol, with plain str symbols."""
    asked: list[str] = []

    def is_open(symbol: str) -> bool:
        asked.append(symbol)
        return False

    with ledger.lock() as pending:
        pending.reserve("AAA", 1)
        pending.reserve("AAA", 1)
        pending.reserve("BBB", 1)
        assert pending.new_slots(is_open) == 2
    assert sorted(asked) == ["AAA", "BBB"]
    assert all(type(symbol) is str for symbol in asked)


def test_duplicate_outstanding_order_id_is_refused(ledger: PendingEntryLedger) -> None:
    """An order id may be outstanding once; after it ends, it may be used again."""
    first = reserve(ledger, "AAA", 100, order_id="o-1")
    before = ledger.stats()
    with ledger.lock() as pending:
        with pytest.raises(ValueError, match=r"order_id 'o-1'"):
            pending.reserve("BBB", 5, order_id="o-1")
        assert len(pending) == 1
        assert "BBB" not in pending
    assert ledger.stats() == before
    assert first.active
    assert first.release()
    again = reserve(ledger, "BBB", 5, order_id="o-1")
    assert again.active and again is not first
    assert ledger.release_order("o-1") is True
    assert again.state is ReservationState.RELEASED and first.state is ReservationState.RELEASED


# ---------------------------------------------------------------------------- symbols and order ids
# are non-empty str only


BAD_IDS: list[tuple[object, type[Exception]]] = [
    (1, TypeError),
    (2.5, TypeError),
    (("x", 1), TypeError),
    (b"id", TypeError),
    (frozenset({"x"}), TypeError),
    ("", ValueError),
]


@pytest.mark.parametrize(("bad", "error"), BAD_IDS, ids=repr)
def test_order_ids_must_be_non_empty_str(
    ledger: PendingEntryLedger, bad: object, error: type[Exception]
) -> None:
    """Ints, tuples, bytes and the empty string are refused everywhere an order id goes."""
    kept = reserve(ledger, "AAA", 1, order_id="kept")
    before = ledger.stats()
    with pytest.raises(error, match="order_id"), ledger.lock() as pending:
        pending.reserve("BBB", 1, order_id=untyped(bad))
    with pytest.raises(error, match="order_id"):
        ledger.release_order(untyped(bad))
    with pytest.raises(error, match="order_id"), ledger.lock() as pending:
        pending.release_order(untyped(bad))
    with pytest.raises(error, match="order_id"):
        PortfolioGate(ledger, PortfolioLimits()).try_enter("BBB", 1, order_id=untyped(bad))
    assert ledger.stats() == before
    assert kept.active
    assert ledger.audit() == []


BAD_SYMBOLS: list[tuple[object, type[Exception]]] = [
    (("BTC", "USDT"), TypeError),
    (42, TypeError),
    (None, TypeError),
    (b"AAA", TypeError),
    ("", ValueError),
]


@pytest.mark.parametrize(("bad", "error"), BAD_SYMBOLS, ids=repr)
def test_symbols_must_be_non_empty_str(
    ledger: PendingEntryLedger, bad: object, error: type[Exception]
) -> None:
    """Tuples, ints, None, bytes and "" are not symbols; ``in`` just answers False for them."""
    reserve(ledger, "AAA", 1)
    before = ledger.stats()
    with pytest.raises(error, match="symbol"), ledger.lock() as pending:
        pending.reserve(untyped(bad), 1)
    with pytest.raises(error, match="symbol"):
        ledger.release(untyped(bad))
    with ledger.lock() as pending:
        assert (bad in pending) is False
        for use in (pending.contains, pending.symbol_notional, pending.release):
            with pytest.raises(error, match="symbol"):
                use(untyped(bad))
    assert ledger.stats() == before


HASHED: list[str] = []


class LoudStr(str):
    """A str subclass whose ``__hash__`` is caller code, which the ledger must not run."""

    __slots__ = ()

    def __hash__(self) -> int:
        HASHED.append(str.__str__(self))
        return str.__hash__(self)


def test_str_subclasses_are_copied_to_plain_str(ledger: PendingEntryLedger) -> None:
    """A str subclass symbol or order id is stored as a plain str: its __hash__ never runs."""
    HASHED.clear()
    with ledger.lock() as pending:
        res = pending.reserve(LoudStr("AAA"), 1, order_id=LoudStr("o-1"))
        assert LoudStr("AAA") in pending
        assert pending.contains(LoudStr("AAA"))
        assert pending.symbol_notional(LoudStr("AAA")) == 1
    assert type(res.symbol) is str and res.symbol == "AAA"
    assert type(res.order_id) is str and res.order_id == "o-1"
    assert ledger.release_order(LoudStr("o-1")) is True
    reserve(ledger, "BBB", 1)
    assert ledger.release(LoudStr("BBB")) is True
    assert HASHED == []


# ---------------------------------------------------------------------------- generated order ids


def test_generated_order_ids_are_distinct_str_of_the_documented_form(
    ledger: PendingEntryLedger,
) -> None:
    """``pl-<16 hex>-<seq>``: one prefix per ledger, distinct ids, the same on every read, and
    callers' ids that look like numbers never clash with them."""
    with ledger.lock() as pending:
        generated = [pending.reserve("AAA", 1) for _ in range(5)]
        for i in range(10):
            pending.reserve("BBB", 1, order_id=str(i))
        assert len(pending) == 15
    ids = [res.order_id for res in generated]
    assert all(type(oid) is str and GENERATED.fullmatch(oid) for oid in ids)
    assert len(set(ids)) == 5
    assert len({prefix_of(res) for res in generated}) == 1
    assert [res.order_id for res in generated] == ids  # made when read, the same each time
    other = reserve(PendingEntryLedger(5), "AAA", 1)
    assert prefix_of(other) != prefix_of(generated[0])  # 64 random bits per ledger


def test_generated_ids_parse_back(ledger: PendingEntryLedger) -> None:
    """release_order, a PendingMap's release_order and confirm_fill all find a generated id."""
    gate = PortfolioGate(ledger, PortfolioLimits())
    first = reserve(ledger, "AAA", 1)
    second = reserve(ledger, "AAA", 2)
    assert ledger.release_order(first.order_id) is True
    assert first.state is ReservationState.RELEASED and second.active
    assert ledger.release_order(first.order_id) is False
    with ledger.lock() as pending:
        assert pending.release_order(second.order_id) is True
        assert pending.release_order(second.order_id) is False
    third = as_reservation(gate.try_enter("BBB", 3).reservation)
    assert GENERATED.fullmatch(third.order_id)
    assert gate.confirm_fill(third.order_id, 3) is True
    assert third.state is ReservationState.FILLED
    assert gate.positions() == {"BBB": 3}
    assert ledger.audit() == []


def test_malformed_or_foreign_generated_looking_ids_find_nothing(
    ledger: PendingEntryLedger,
) -> None:
    """Ids that look generated but are not one of this ledger's outstanding ones find nothing,
    and nothing changes."""
    made = [reserve(ledger, "AAA", 1) for _ in range(3)]
    target = made[2]
    prefix = prefix_of(target)
    seq = target.order_id[len(prefix) :]
    foreign = PendingEntryLedger(5)
    foreign_id = [reserve(foreign, "AAA", 1) for _ in range(3)][2].order_id
    assert foreign_id.endswith("-" + seq)
    bad = [
        prefix,
        prefix + "x",
        prefix + "-" + seq,
        prefix + "+" + seq,
        prefix + " " + seq,
        prefix + seq + " ",
        prefix + seq + ".0",
        prefix + seq + "x",
        prefix + "\u0662",  # ARABIC-INDIC DIGIT TWO: a digit, not an ASCII one
        prefix + "99",
        prefix + "1" + "0" * 30,
        target.order_id.upper(),
        foreign_id,
    ]
    gate = PortfolioGate(ledger, PortfolioLimits())
    before = ledger.stats()
    for oid in bad:
        assert ledger.release_order(oid) is False, oid
        with ledger.lock() as pending:
            assert pending.release_order(oid) is False, oid
        assert gate.confirm_fill(oid, 5) is False, oid
    assert ledger.stats() == before
    assert all(res.active for res in made)
    assert gate.positions() == {}


def test_a_generated_id_with_leading_zeros_finds_nothing(ledger: PendingEntryLedger) -> None:
    """``pl-<hex>-03`` is not an id the ledger generated (it wrote ``pl-<hex>-3``): like any
    other malformed id it must find nothing."""
    made = [reserve(ledger, "AAA", 1) for _ in range(4)]
    target = made[3]
    prefix = prefix_of(target)
    seq = target.order_id[len(prefix) :]
    for oid in (prefix + "0" + seq, prefix + "000" + seq):
        assert ledger.release_order(oid) is False, oid
    assert target.active


def test_a_generated_id_never_names_a_callers_reservation(ledger: PendingEntryLedger) -> None:
    """The sequence number of a reservation the caller named is not reachable as a generated id."""
    named = reserve(ledger, "AAA", 1, order_id="c")  # sequence number 0
    generated = reserve(ledger, "AAA", 1)  # 1
    assert generated.order_id.endswith("-1")
    assert ledger.release_order(prefix_of(generated) + "0") is False
    assert named.active
    assert ledger.release_order("c") is True


def test_a_caller_id_in_this_ledgers_generated_form_is_refused(
    ledger: PendingEntryLedger,
) -> None:
    """A new order id with this ledger's generated prefix is refused (it could name another
    order); another ledger's generated id is just a caller's str here."""
    gate = PortfolioGate(ledger, PortfolioLimits())
    res = reserve(ledger, "AAA", 1)
    prefix = prefix_of(res)
    before = ledger.stats()
    for oid in (res.order_id, prefix + "12345", prefix, prefix + "x"):
        with pytest.raises(ValueError, match="generated"), ledger.lock() as pending:
            pending.reserve("BBB", 1, order_id=oid)
        with pytest.raises(ValueError, match="generated"):
            gate.try_enter("BBB", 1, order_id=oid)
    assert ledger.stats() == before
    assert gate.stats().decisions == 0
    foreign_id = reserve(PendingEntryLedger(5), "X", 1).order_id
    mine = reserve(ledger, "BBB", 1, order_id=foreign_id)
    assert mine.order_id == foreign_id
    assert ledger.release_order(foreign_id) is True
    assert res.active


# ---------------------------------------------------------------------------- per-order TTL


def test_top_up_does_not_extend_an_older_reservations_life(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """Each reservation on a symbol keeps its own TTL."""
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
    """At exactly reserved_at + ttl a reservation is expired."""
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
    """Reservations made a second apart expire a second apart, oldest first."""
    made = []
    for i in range(20):
        made.append(reserve(ledger, f"S{i % 7}", i + 1, order_id=f"o{i}"))
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
    """Releasing the oldest first does not confuse the sweep."""
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
    """A ledger that emptied itself still expires what comes next."""
    for _ in range(3):
        res = reserve(ledger, "A", 5)
        assert res.release()
    clock.advance(1)
    late = reserve(ledger, "B", 5)
    clock.advance(ledger.ttl)
    assert ledger.stats().outstanding == 0
    assert late.state is ReservationState.EXPIRED


def test_a_reservation_never_reads_as_active_past_its_ttl(clock: ManualClock) -> None:
    """Reading state of a due reservation expires it there and then, firing on_expire once."""
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
    """Inside this thread's own block, state is what the block sees: no sweep runs there."""
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


# ---------------------------------------------------------------------------- the bounded sweep


def _due_at_once(
    clock: ManualClock, count: int, expired: list[Reservation]
) -> tuple[PendingEntryLedger, list[Reservation]]:
    """A 10 s ledger whose on_expire appends to ``expired``, with ``count`` reservations of 1
    made at one instant and all due now."""
    ledger = PendingEntryLedger(10, clock=clock, on_expire=expired.append)
    with ledger.lock() as pending:
        made = [pending.reserve(f"S{i % 10}", 1) for i in range(count)]
    clock.advance(10)
    return ledger, made


def test_the_sweep_limit_is_1000() -> None:
    """The documented bound of one acquisition's sweep."""
    assert SWEEP_LIMIT == 1000


def test_one_acquisition_expires_at_most_sweep_limit(
    clock: ManualClock,
) -> None:
    """2,500 due at once: each acquisition expires exactly 1,000 more, oldest first, once each."""
    expired_by: list[Reservation] = []
    ledger, made = _due_at_once(clock, 2500, expired_by)
    for swept in (1000, 2000, 2500, 2500):
        stats = ledger.stats()
        assert (stats.expired, stats.outstanding) == (swept, 2500 - swept)
        assert stats.gross_notional == 2500 - swept
        assert expired_by == made[:swept]
        assert ledger.audit() == []


def test_due_reservations_past_the_sweep_limit_still_count(
    clock: ManualClock,
) -> None:
    """What one acquisition could not sweep still counts against the limits (over-blocking,
    the safe side) until later acquisitions sweep it."""
    expired_by: list[Reservation] = []
    ledger, _ = _due_at_once(clock, 2500, expired_by)
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=2500))
    assert gate.try_enter("X", 1001).reason is DenyReason.MAX_GROSS_EXPOSURE  # 1500 still count
    assert gate.try_enter("X", 2001).reason is DenyReason.MAX_GROSS_EXPOSURE  # 500 still count
    assert gate.try_enter("X", 2500)  # the third acquisition swept the last 500
    stats = ledger.stats()
    assert (stats.expired, stats.outstanding, stats.gross_notional) == (2500, 1, 2500)
    assert len(expired_by) == 2500


def test_a_lock_block_sees_what_its_entry_could_not_sweep(
    clock: ManualClock,
) -> None:
    """A lock() block is an acquisition like any other: its view holds the unswept rest."""
    expired_by: list[Reservation] = []
    ledger, _ = _due_at_once(clock, 1500, expired_by)
    with ledger.lock() as pending:
        assert len(pending) == 500
        assert pending.gross_notional() == 500
        assert len(expired_by) == 0  # on_expire waits for the block to end
    assert len(expired_by) == 1000
    with ledger.lock() as pending:
        assert len(pending) == 0


def test_state_of_a_due_reservation_past_the_sweep_limit_expires_it(
    clock: ManualClock,
) -> None:
    """Reading state sweeps 1,000 oldest and expires the one read, whatever its place."""
    expired_by: list[Reservation] = []
    ledger, made = _due_at_once(clock, 2500, expired_by)
    last = made[-1]
    assert last.state is ReservationState.EXPIRED
    assert expired_by == [*made[:1000], last]
    stats = ledger.stats()  # sweeps the next 1,000 oldest
    assert (stats.expired, stats.outstanding) == (2001, 499)
    assert made[1999].state is ReservationState.EXPIRED
    assert ledger.stats().outstanding == 0
    assert len(expired_by) == 2500 == len(set(map(id, expired_by)))
    assert ledger.audit() == []


def test_a_sweep_cut_short_resumes_where_it_stopped(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """A sweep stopped by the limit goes on at the next acquisition, and still stops at the first
    reservation not yet due."""
    with ledger.lock() as pending:
        early = [pending.reserve("E", 1) for _ in range(1500)]
    clock.advance(ledger.ttl / 2)
    late = [reserve(ledger, "L", 1) for _ in range(10)]
    clock.advance(ledger.ttl / 2)  # early are all due, late are half way
    assert ledger.stats().outstanding == 510
    assert ledger.stats().outstanding == 10
    assert ledger.stats().outstanding == 10
    assert all(state_of(res) is ReservationState.EXPIRED for res in early)
    assert all(is_active(res) for res in late)
    clock.advance(ledger.ttl / 2)
    assert ledger.stats().outstanding == 0


# ---------------------------------------------------------------------------- expiry is noticed on
# every acquisition that sweeps, and on_expire runs once per reservation with the lock free

Trigger = Callable[[PendingEntryLedger, Reservation], object]


def _take_lock(ledger: PendingEntryLedger, res: Reservation) -> object:
    with ledger.lock() as pending:
        return len(pending)


def _gate(ledger: PendingEntryLedger) -> PortfolioGate:
    return PortfolioGate(ledger, PortfolioLimits())


def _no_positions() -> dict[str, Number]:
    return {}


TRIGGERS: dict[str, Trigger] = {
    "stats": lambda ledger, res: ledger.stats(),
    "lock": _take_lock,
    "state": lambda ledger, res: res.state,
    "try_enter": lambda ledger, res: _gate(ledger).try_enter("ZZZ", 1),
    "try_enter_mapping": lambda ledger, res: _gate(ledger).try_enter("ZZZ", 1, {}),
    "try_enter_callable": lambda ledger, res: _gate(ledger).try_enter("ZZZ", 1, _no_positions),
    "try_enter_timeout": lambda ledger, res: _gate(ledger).try_enter("ZZZ", 1, timeout=5),
    "set_position": lambda ledger, res: _gate(ledger).set_position("ZZZ", 1),
    "close_position": lambda ledger, res: _gate(ledger).close_position("ZZZ"),
    "confirm_fill_other": lambda ledger, res: _gate(ledger).confirm_fill("x", 1, symbol="ZZZ"),
}


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_on_expire_runs_once_per_reservation_with_the_lock_free(
    clock: ManualClock, trigger: str
) -> None:
    """Each acquisition that sweeps (decisions, lock() blocks, stats, state, writes to the
    owned book) notices the expiry; on_expire runs once, after the lock is released; and the
    clock is read before the lock is taken."""
    calls: list[tuple[Reservation, bool, bool]] = []
    clock_saw_lock: list[bool] = []

    def on_expire(res: Reservation) -> None:
        free = not ledger.locked()
        with ledger.lock(timeout=0) as pending:
            calls.append((res, free, res.symbol in pending))

    def watched_clock() -> float:
        clock_saw_lock.append(ledger.locked())
        return clock()

    ledger = PendingEntryLedger(10, clock=watched_clock, on_expire=on_expire)
    res = reserve(ledger, "AAA", 100, order_id="o")
    other = reserve(ledger, "BBB", 50, order_id="other")
    assert other.release()
    clock.advance(10)
    clock_saw_lock.clear()
    result = TRIGGERS[trigger](ledger, res)
    assert [(r, free) for r, free, _ in calls] == [(res, True)]
    assert calls[0][2] is False  # the callback already sees the reservation gone
    assert clock_saw_lock and not any(clock_saw_lock)
    assert res.state is ReservationState.EXPIRED
    if trigger == "confirm_fill":
        assert result is False  # it expired first: nothing left to fill
    stats = ledger.stats()
    assert stats.expired == 1
    assert stats.released == 1  # only "other"
    check_counts(stats)
    with ledger.lock():
        pass
    assert len(calls) == 1  # never again
    assert ledger.audit() == []


def test_on_expire_still_fires_when_confirm_fill_refuses_a_wrong_symbol(
    clock: ManualClock,
) -> None:
    """confirm_fill sweeps before it finds the order; when it then refuses a symbol that is not
    the order's (ValueError), what its sweep expired must still reach on_expire."""
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(10, clock=clock, on_expire=expired.append)
    gate = PortfolioGate(ledger, PortfolioLimits())
    old = as_reservation(gate.try_enter("AAA", 1, order_id="old").reservation)
    clock.advance(5)
    gate.try_enter("BBB", 1, order_id="b")
    clock.advance(5)  # old is due
    with pytest.raises(ValueError, match="reserved on 'BBB'"):
        gate.confirm_fill("b", 3, symbol="CCC")
    assert ledger.stats().expired == 1  # the refused call's sweep did expire it
    assert expired == [old]


def test_on_expire_fires_after_the_lock_block_ends(clock: ManualClock) -> None:
    """What a block's entry swept is reported once the block has let go of the lock."""
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(5, clock=clock, on_expire=expired.append)
    res = reserve(ledger, "AAA", 1)
    clock.advance(5)
    with ledger.lock() as pending:
        assert "AAA" not in pending  # dropped on acquisition
        assert expired == []  # but the callback waits until the lock is released
    assert expired == [res]


def test_on_expire_fires_for_what_a_block_that_raised_swept(clock: ManualClock) -> None:
    """A rollback undoes the block's own changes, not the expiry its entry found."""
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(5, clock=clock, on_expire=expired.append)
    res = reserve(ledger, "AAA", 1)
    clock.advance(5)
    with pytest.raises(Boom), ledger.lock() as pending:
        pending.reserve("BBB", 1)
        raise Boom
    assert expired == [res]
    assert res.state is ReservationState.EXPIRED
    stats = ledger.stats()
    assert (stats.outstanding, stats.expired, stats.reserved) == (0, 1, 1)


def test_on_expire_called_for_each_expired_reservation(clock: ManualClock) -> None:
    """Every reservation that expires is reported once; a released one is not."""
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(5, clock=clock, on_expire=expired.append)
    made = [reserve(ledger, "AAA" if i % 2 else "BBB", i + 1, order_id=f"o{i}") for i in range(6)]
    assert made[3].release()
    clock.advance(5)
    ledger.stats()
    assert [r.order_id for r in expired] == ["o0", "o1", "o2", "o4", "o5"]  # oldest first
    assert len(expired) == len(set(map(id, expired)))


def test_on_expire_exceptions_are_logged_not_raised(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing callback is logged and does not stop the next one, nor break the ledger."""
    seen: list[str] = []

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
    """The callback runs with the lock free, so it may release and reserve."""
    ledger: PendingEntryLedger

    def on_expire(res: Reservation) -> None:
        ledger.release(res.symbol)  # e.g. tidy the rest of the symbol
        reserve(ledger, "NEW", 1, order_id=f"renew-{res.order_id}")

    ledger = PendingEntryLedger(5, clock=clock, on_expire=on_expire)
    reserve(ledger, "AAA", 1, order_id="1")
    clock.advance(5)
    assert ledger.stats().outstanding == 0  # the snapshot is taken before the callback runs
    with ledger.lock() as pending:
        assert "NEW" in pending
        assert len(pending) == 1
    assert ledger.release_order("renew-1") is True


# ---------------------------------------------------------------------------- no caller code runs
# under the lock, and audit() finds the books agree, after every kind of operation


class Watched:
    """A ledger and gate whose caller code (the clock, on_expire, a positions callable) records
    whether the ledger lock was held when it ran. ``due`` is due now, ``res`` is not."""

    def __init__(self) -> None:
        self.manual = ManualClock()
        self.seen: list[tuple[str, bool]] = []
        self.ledger = PendingEntryLedger(10, clock=self._clock, on_expire=self._on_expire)
        self.gate = PortfolioGate(self.ledger, PortfolioLimits())
        self.due = reserve(self.ledger, "DUE", 1, order_id="due")
        self.manual.advance(5)
        self.res = reserve(self.ledger, "AAA", 5, order_id="o")
        self.generated = reserve(self.ledger, "GEN", 2)
        self.manual.advance(5)
        self.seen.clear()

    def _record(self, what: str) -> None:
        self.seen.append((what, self.ledger.locked()))

    def _clock(self) -> float:
        self._record("clock")
        return self.manual()

    def _on_expire(self, res: Reservation) -> None:
        self._record("on_expire")

    def positions(self) -> dict[str, Number]:
        """A positions callable that uses the ledger: it runs outside the lock, so it may."""
        self._record("positions")
        self.ledger.stats()
        return {"P": 1}


def _block(w: Watched, fail: bool) -> None:
    with contextlib.suppress(Boom), w.ledger.lock() as pending:
        pending.reserve("NEW", 1)
        pending.reserve("AAA", Fraction(1, 3), order_id="o2")
        assert pending.release_order("o")
        assert w.generated.reduce(1)
        if fail:
            raise Boom


def _timed_out(w: Watched) -> None:
    """A decision and a lock() that time out while another thread holds the lock."""
    held, let_go = threading.Event(), threading.Event()

    def holder() -> None:
        with w.ledger.lock():
            held.set()
            let_go.wait(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert held.wait(10)
        assert w.gate.try_enter("X", 1, timeout=0).reason is DenyReason.LOCK_TIMEOUT
        with pytest.raises(LockTimeout), w.ledger.lock(timeout=0):
            pass  # pragma: no cover
    finally:
        let_go.set()
        thread.join(10)


def _refused(w: Watched) -> None:
    """Calls refused with an error: duplicate id, generated-form id, wrong symbol, re-entry."""
    with pytest.raises(ValueError, match="outstanding"):
        w.gate.try_enter("AAA", 1, order_id="o")
    with pytest.raises(ValueError, match="generated"):
        w.gate.try_enter("AAA", 1, order_id=w.generated.order_id)
    with pytest.raises(ReentrantLockError), w.ledger.lock():
        w.gate.try_enter("AAA", 1)


def _halted(w: Watched) -> None:
    w.gate.halt()
    assert w.gate.try_enter("NEW", 1).reason is DenyReason.HALTED
    w.gate.resume()


def _open_and_close(w: Watched) -> None:
    w.gate.set_position("P", 1)
    assert w.gate.close_position("P") is True


OPERATIONS: dict[str, Callable[[Watched], object]] = {
    "lock": lambda w: _block(w, fail=False),
    "lock_rolled_back": lambda w: _block(w, fail=True),
    "stats": lambda w: w.ledger.stats(),
    "state": lambda w: w.due.state,
    "active": lambda w: w.res.active,
    "release": lambda w: w.ledger.release("AAA"),
    "release_order": lambda w: w.ledger.release_order("o"),
    "release_generated": lambda w: w.ledger.release_order(w.generated.order_id),
    "reservation_release": lambda w: w.res.release(),
    "reservation_reduce": lambda w: w.res.reduce(Decimal("0.5")),
    "reduce_to_filled": lambda w: w.res.reduce(5),
    "try_enter": lambda w: w.gate.try_enter("NEW", 1),
    "try_enter_mapping": lambda w: w.gate.try_enter("NEW", 1, {"AAA": 3, "P": -2.5}),
    "try_enter_callable": lambda w: w.gate.try_enter("NEW", 1, w.positions),
    "try_enter_timeout": lambda w: w.gate.try_enter("NEW", 1, timeout=5),
    "try_enter_denied": lambda w: PortfolioGate(
        w.ledger, PortfolioLimits(max_gross_exposure=1)
    ).try_enter("NEW", 1),
    "timed_out": _timed_out,
    "refused": _refused,
    "halted": _halted,
    "set_position": lambda w: w.gate.set_position("AAA", -7),
    "close_position": _open_and_close,
    "confirm_fill": lambda w: w.gate.confirm_fill("o", 5),
    "confirm_fill_generated": lambda w: w.gate.confirm_fill(w.generated.order_id, 2),
    "confirm_fill_late": lambda w: w.gate.confirm_fill("gone", 1, symbol="DUE"),
    "positions": lambda w: w.gate.positions(),
    "gate_stats": lambda w: w.gate.stats(),
}
SWEEPS = {"lock", "lock_rolled_back", "stats", "state", "set_position", "close_position"}
SWEEPS |= {name for name in OPERATIONS if name.startswith(("try_enter", "confirm_fill"))}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("operation", [name for name in OPERATIONS if name != "timed_out"])
def test_no_caller_code_runs_under_the_lock(operation: str) -> None:
    """The clock, on_expire and a positions callable all run with the ledger lock free (a
    positions callable may even call the ledger); operations that sweep expire what is due."""
    w = Watched()
    OPERATIONS[operation](w)
    assert [what for what, locked in w.seen if locked] == []
    if operation in SWEEPS:
        assert ("clock", False) in w.seen
        assert ("on_expire", False) in w.seen
        assert w.due.state is ReservationState.EXPIRED


@pytest.mark.timeout(20)
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_audit_is_empty_after_every_kind_of_operation(operation: str) -> None:
    """Every running total agrees with the raw records after each operation, and after an
    expiry sweep on top of it."""
    w = Watched()
    assert w.ledger.audit() == []
    OPERATIONS[operation](w)
    assert w.ledger.audit() == []
    check_counts(w.ledger.stats())
    w.manual.advance(10)  # everything still outstanding is due
    assert w.ledger.stats().outstanding == 0
    assert w.ledger.audit() == []


class Walk:
    """A seeded random walk over every public operation of a ledger and a gate, keeping every
    reservation made so the end state can be checked against them."""

    SYMBOLS = ("A", "B", "C", "D", "E", "F")
    IDS = tuple(f"o{i}" for i in range(8))
    AMOUNTS: tuple[Number, ...] = (1, 2.5, Decimal("0.3"), Fraction(1, 3), 7, 0.1, 1e-12)

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = ManualClock()
        self.expired: list[Reservation] = []
        self.ledger = PendingEntryLedger(10, clock=self.clock, on_expire=self.expired.append)
        limits = PortfolioLimits(
            max_concurrent_positions=5, max_gross_exposure=60, max_symbol_exposure=25
        )
        self.gate = PortfolioGate(self.ledger, limits)
        self.made: list[Reservation] = []
        self.book: dict[str, Number] = {}

    def symbol(self) -> str:
        return self.rng.choice(self.SYMBOLS)

    def amount(self) -> Number:
        return self.rng.choice(self.AMOUNTS)

    def new_id(self) -> str | None:
        return None if self.rng.random() < 0.5 else self.rng.choice(self.IDS)

    def any_id(self) -> str:
        if self.made and self.rng.random() < 0.5:
            return self.rng.choice(self.made).order_id
        return self.rng.choice(self.IDS)

    def one(self) -> Reservation | None:
        return self.rng.choice(self.made) if self.made else None

    def step(self) -> None:
        action = self.rng.choice(
            [
                self.block,
                self.try_enter,
                self.release,
                self.end_one,
                self.advance,
                self.owned_book,
                self.confirm_fill,
                self.halt_or_resume,
            ]
        )
        action()

    def block(self) -> None:
        """A lock() block of a few changes, committed or (raising) rolled back."""
        with contextlib.suppress(Boom, ValueError), self.ledger.lock() as pending:
            for _ in range(self.rng.randint(1, 4)):
                kind = self.rng.randrange(4)
                if kind == 0:
                    self.made.append(
                        pending.reserve(self.symbol(), self.amount(), order_id=self.new_id())
                    )
                elif kind == 1:
                    pending.release(self.symbol())
                elif kind == 2:
                    pending.release_order(self.any_id())
                elif (res := self.one()) is not None:
                    res.reduce(self.amount())
            if self.rng.random() < 0.4:
                raise Boom

    def try_enter(self) -> None:
        positions: Any = self.rng.choice([None, self.book, lambda: dict(self.book)])
        with contextlib.suppress(ValueError):  # an order id outstanding already
            decision = self.gate.try_enter(
                self.symbol(), self.amount(), positions, order_id=self.new_id()
            )
            if decision:
                self.made.append(as_reservation(decision.reservation))

    def release(self) -> None:
        if self.rng.random() < 0.5:
            self.ledger.release(self.symbol())
        else:
            self.ledger.release_order(self.any_id())

    def end_one(self) -> None:
        res = self.one()
        if res is None:
            return
        choice = self.rng.randrange(3)
        if choice == 0:
            res.release()
        elif choice == 1:
            res.reduce(self.amount())
        else:
            _ = res.state

    def advance(self) -> None:
        self.clock.advance(self.rng.choice([0, 1, 3, 10]))

    def owned_book(self) -> None:
        symbol = self.symbol()
        if self.rng.random() < 0.3:
            self.gate.close_position(symbol)
            self.book.pop(symbol, None)
        else:
            exposure = self.amount() * self.rng.choice([1, -1])
            self.gate.set_position(symbol, exposure)
            self.book[symbol] = exposure

    def confirm_fill(self) -> None:
        res = self.one()
        if res is None:
            return
        # A generated id names one reservation for ever; a caller's id may name a later one
        # on another symbol, so it is confirmed without a symbol (a mismatch raises).
        generated = GENERATED.fullmatch(res.order_id) is not None
        symbol = res.symbol if generated and self.rng.random() < 0.5 else None
        self.gate.confirm_fill(res.order_id, self.amount(), symbol=symbol)

    def halt_or_resume(self) -> None:
        if self.rng.random() < 0.5:
            self.gate.halt()
        else:
            self.gate.resume()


def units_of(value: object) -> int:
    """An amount in units, as the ledger counts it."""
    return _units.units("amount", value, True)


def check_walk(walk: Walk) -> int:
    """The counts, the gross and on_expire agree with the states of the reservations made;
    returns how many are active."""
    states = [res.state for res in walk.made]  # reading a due one expires it
    stats = walk.ledger.stats()
    check_counts(stats)
    assert stats.outstanding == states.count(ReservationState.ACTIVE)
    assert stats.reserved == len(walk.made) - states.count(ReservationState.ROLLED_BACK)
    assert stats.released == states.count(ReservationState.RELEASED) + states.count(
        ReservationState.FILLED
    )
    assert stats.expired == states.count(ReservationState.EXPIRED) == len(walk.expired)
    assert len(set(map(id, walk.expired))) == len(walk.expired)
    assert all(res.state is ReservationState.EXPIRED for res in walk.expired)
    active = [res for res in walk.made if res.state is ReservationState.ACTIVE]
    assert units_of(stats.gross_notional) == sum(units_of(res.notional) for res in active)
    assert walk.ledger.audit() == []
    return len(active)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_audit_stays_empty_through_a_random_walk(seed: int) -> None:
    """After every step of a random walk the audit is empty; now and then, and at the end, the
    counts, the gross and on_expire agree with the states of the reservations made."""
    walk = Walk(seed)
    active_seen = 0
    for step in range(1, 1501):
        walk.step()
        assert walk.ledger.audit() == []
        if step % 100 == 0:
            active_seen += check_walk(walk)
    check_walk(walk)
    assert active_seen > 0
    states = {res.state for res in walk.made}
    assert states >= set(ReservationState) - {ReservationState.ACTIVE}  # every path was taken


def test_locked_says_whether_anyone_holds_the_lock_now(ledger: PendingEntryLedger) -> None:
    """locked() is False when idle, True inside a block and while another thread holds the lock,
    and False again after a block that raised or an acquisition that timed out."""
    assert ledger.locked() is False
    with ledger.lock():
        assert ledger.locked() is True
    assert ledger.locked() is False
    with pytest.raises(Boom), ledger.lock():
        raise Boom
    assert ledger.locked() is False
    held, let_go = threading.Event(), threading.Event()

    def holder() -> None:
        with ledger.lock():
            held.set()
            let_go.wait(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert held.wait(10)
        assert ledger.locked() is True
        with pytest.raises(LockTimeout), ledger.lock(timeout=0):
            pass  # pragma: no cover
        assert ledger.locked() is True  # still the other thread's
    finally:
        let_go.set()
        thread.join(10)
    assert ledger.locked() is False


@pytest.mark.timeout(20)
def test_audit_inside_the_own_block_does_not_wait_for_ever(ledger: PendingEntryLedger) -> None:
    """Re-entry either works or raises ReentrantLockError at once: audit() from inside this
    thread's own lock() block must not wait for the lock the thread itself holds."""
    outcome: list[object] = []

    def in_block() -> None:
        with ledger.lock() as pending:
            pending.reserve("AAA", 1)
            try:
                outcome.append(ledger.audit())
            except ReentrantLockError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=in_block, daemon=True)  # a daemon: it may never end
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "audit() inside the thread's own lock() block never returned"
    assert outcome == [[]] or isinstance(outcome[0], ReentrantLockError)


# ---------------------------------------------------------------------------- release paths


def test_release_symbol_drops_every_order_on_it(ledger: PendingEntryLedger) -> None:
    """release(symbol) ends every reservation on it and no other; it is idempotent."""
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
    """release_order ends one order; the symbol's others stay."""
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
    """A second release does nothing; an ended reservation keeps the amount it held."""
    res = reserve(ledger, "AAA", 100)
    other = reserve(ledger, "AAA", 1)
    assert res.release() is True
    assert res.release() is False
    assert res.state is ReservationState.RELEASED
    assert res.notional == 100  # keeps the amount it held when it ended
    assert other.active
    assert ledger.stats().released == 1


def test_release_paths_inside_a_block(ledger: PendingEntryLedger) -> None:
    """Inside a block, the ledger's and reservations' release methods act through the block."""
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
    """A PendingMap's release_order ends the order once."""
    reserve(ledger, "AAA", 1, order_id="a")
    with ledger.lock() as pending:
        assert pending.release_order("a") is True
        assert pending.release_order("a") is False
        assert "AAA" not in pending


def test_ledgers_share_nothing(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    """Two ledgers keep separate books."""
    other_ledger = PendingEntryLedger(5, clock=clock)
    res = reserve(other_ledger, "AAA", 1)
    assert res.release() is True
    assert ledger.stats().released == 0
    assert ledger.release_order(res.order_id) is False


# ---------------------------------------------------------------------------- partial fills


def test_reduce_partial_fills_then_to_zero(ledger: PendingEntryLedger) -> None:
    """reduce shrinks the reservation; reducing what remains ends it as FILLED."""
    res = reserve(ledger, "AAA", 1000)
    assert res.reduce(300) is True
    assert res.notional == 700
    assert res.initial_notional == 1000
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


def test_reduce_over_fill_ends_it_as_filled(ledger: PendingEntryLedger) -> None:
    """Reducing by more than remains fills it, holding what remained."""
    res = reserve(ledger, "AAA", 100)
    keep = reserve(ledger, "AAA", 5)
    assert res.reduce(250) is True
    assert res.state is ReservationState.FILLED
    assert res.notional == 100  # ended holding what remained
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.released) == (1, 5, 1)
    assert keep.active


class _Drifting:
    """A Real whose float() is 1e-9 once and 90.0 after: a reduction converts it twice (rounded
    up, then down), and must not take off more than the rounded-up amount."""

    def __init__(self) -> None:
        self.calls = 0

    def __float__(self) -> float:
        self.calls += 1
        return 1e-9 if self.calls == 1 else 90.0


numbers.Real.register(_Drifting)


def test_a_reduction_that_converts_differently_twice_never_goes_negative(
    ledger: PendingEntryLedger,
) -> None:
    res = reserve(ledger, "AAA", 50)
    assert res.reduce(_Drifting()) is True
    assert res.active and 0 < res.notional <= 50  # one unit off at most: never below zero
    assert ledger.audit() == []
    assert float(ledger.stats().gross_notional) == float(res.notional)


def test_confirm_fill_ends_the_reservation_as_filled(ledger: PendingEntryLedger) -> None:
    """confirm_fill sets the position and ends the reservation as FILLED, counted as released."""
    gate = PortfolioGate(ledger, PortfolioLimits())
    res = as_reservation(gate.try_enter("AAA", 10, order_id="f").reservation)
    assert gate.confirm_fill("f", 10) is True
    assert res.state is ReservationState.FILLED
    assert gate.positions() == {"AAA": 10}
    assert gate.confirm_fill("f", 11) is False  # ended: nothing changes without a symbol
    assert gate.positions() == {"AAA": 10}
    stats = ledger.stats()
    assert (stats.outstanding, stats.released, stats.expired) == (0, 1, 0)


def test_reduce_keeps_the_reservation_life(ledger: PendingEntryLedger, clock: ManualClock) -> None:
    """A partial fill does not restart the TTL."""
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
    """Once swept, an expired reservation cannot be released, reduced or filled."""
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
    """reduce inside a block acts through it."""
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
    """Every way a reservation ends is counted once, as released (fills too) or expired."""
    gate = PortfolioGate(ledger, PortfolioLimits())
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (0, 0)
    assert (stats.reserved, stats.released, stats.expired) == (0, 0, 0)
    made = [reserve(ledger, f"S{i}", 10, order_id=f"o{i}") for i in range(7)]
    made[0].release()
    ledger.release_order("o1")
    ledger.release("S2")
    made[3].reduce(10)  # filled: counts as released
    made[4].reduce(4)  # partial: still outstanding
    gate.confirm_fill("o5", 10)  # filled
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (2, 16)
    assert (stats.reserved, stats.released, stats.expired) == (7, 5, 0)
    clock.advance(ledger.ttl)
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional) == (0, 0)
    assert (stats.reserved, stats.released, stats.expired) == (7, 5, 2)
    check_counts(stats)


def test_stats_is_a_frozen_snapshot(ledger: PendingEntryLedger) -> None:
    """A LedgerStats does not change afterwards and cannot be changed."""
    stats = ledger.stats()
    reserve(ledger, "A", 1)
    assert stats.outstanding == 0
    with pytest.raises(AttributeError):
        stats.outstanding = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------- lock(): atomicity


def _state(ledger: PendingEntryLedger, made: list[Reservation]) -> object:
    return (
        ledger.stats(),
        [(r.active, r.state, r.notional, r.reserved_at, r.order_id) for r in made],
        _book(ledger),
    )


def _book(ledger: PendingEntryLedger) -> object:
    with ledger.lock(timeout=0) as pending:
        symbols = sorted(pending)
        return (
            len(pending),
            pending.gross_notional(),
            type(pending.gross_notional()),
            symbols,
            [pending.symbol_notional(s) for s in symbols],
            pending.new_slots(lambda s: s == "AAA"),
        )


def test_lock_block_that_raises_is_rolled_back(
    ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """Every change a raising block made is undone: reservations, releases, reductions, fills,
    a reused order id, and the kind the sums come back in."""
    made = [
        reserve(ledger, "AAA", 100, order_id="a"),
        reserve(ledger, "AAA", 0.25, order_id="a2"),
        reserve(ledger, "BBB", Decimal("7.5"), order_id="b"),
        reserve(ledger, "CCC", 40, order_id="c"),
        reserve(ledger, "DDD", 9, order_id="d"),
        reserve(ledger, "HHH", 3),
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
        assert ledger.release_order(made[5].order_id) is True  # a generated id
        inside.append(pending.reserve("FFF", Fraction(1, 3), order_id="f"))  # a new kind
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
    assert ledger.audit() == []
    # the restored reservations behave as before: their TTL and release still work
    assert made[0].reserved_at == 0
    assert ledger.release_order("a") is True
    assert ledger.release_order(made[5].order_id) is True
    clock.advance(ledger.ttl)
    stats = ledger.stats()
    assert stats.outstanding == 0
    assert (stats.reserved, stats.released, stats.expired) == (6, 2, 4)


def test_rollback_of_an_empty_ledger(ledger: PendingEntryLedger) -> None:
    """A raising block on an empty ledger leaves it empty; its reservation is ROLLED_BACK."""
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
    """A rolled-back reservation leaves no hole in the expiry order."""
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
    """A release undone by a rollback keeps the reservation's original stamp."""
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
    """Restored reservations expire in their own order whichever order they were released in."""
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
    """A block that empties the ledger and then raises gives back exactly what it released."""
    ledger = PendingEntryLedger(10, clock=ManualClock())
    res = reserve(ledger, "AAA", Fraction(1, 2), order_id="a")
    with pytest.raises(KeyError), ledger.lock() as pending:
        res.release()  # the ledger is empty now
        pending.reserve("BBB", Fraction(1, 3))
        raise KeyError("undo")
    assert res.notional == Fraction(1, 2)
    assert ledger.stats().gross_notional == Fraction(1, 2)
    assert ledger.audit() == []
    res.release()
    gate = PortfolioGate(ledger, PortfolioLimits())
    assert gate.try_enter("CCC", Fraction(1, 5))
    assert ledger.stats().gross_notional == Fraction(1, 5)


def test_rollback_restores_the_type_of_sums(ledger: PendingEntryLedger) -> None:
    """A block that reserved a new kind of amount and raised leaves the sums' type as it was."""
    with ledger.lock() as pending:
        pending.reserve("AAA", 1.5)
    with pytest.raises(RuntimeError), ledger.lock() as pending:
        pending.reserve("BBB", Fraction(1, 3))  # a new kind of amount, then the block fails
        raise RuntimeError("abort")
    gross = ledger.stats().gross_notional
    assert gross == 1.5
    assert type(gross) is float  # not Fraction: the block left nothing behind


def test_rollback_restores_the_type_a_reduction_brought(ledger: PendingEntryLedger) -> None:
    """A reduction by a new kind of amount, undone, leaves the sums' type as it was."""
    res = reserve(ledger, "AAA", 10)
    with pytest.raises(Boom), ledger.lock():
        assert res.reduce(Decimal("0.5"))
        raise Boom
    assert type(ledger.stats().gross_notional) is int
    assert res.reduce(Decimal("0.5"))
    assert type(ledger.stats().gross_notional) is Decimal


def test_block_that_catches_its_own_exception_keeps_its_changes(
    ledger: PendingEntryLedger,
) -> None:
    """Only an exception that leaves the block rolls it back."""
    with ledger.lock() as pending:
        pending.reserve("AAA", 1)
        with contextlib.suppress(ValueError):
            pending.reserve("BBB", -1)
    assert ledger.stats().outstanding == 1


def test_lock_is_released_after_an_exception(ledger: PendingEntryLedger) -> None:
    """A raising block lets go of the lock, for this thread and for others."""
    with pytest.raises(Boom), ledger.lock():
        raise Boom
    with ledger.lock(timeout=0) as pending:
        assert len(pending) == 0
    done = threading.Event()

    def other() -> None:
        with ledger.lock(timeout=5):
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    assert done.is_set()


def test_base_exceptions_roll_back_too(ledger: PendingEntryLedger) -> None:
    """KeyboardInterrupt out of a block rolls it back as any exception does."""
    with pytest.raises(KeyboardInterrupt), ledger.lock() as pending:
        pending.reserve("AAA", 1)
        raise KeyboardInterrupt
    assert ledger.stats().outstanding == 0
    with ledger.lock(timeout=0):
        pass


def test_lock_context_manager_is_single_use(ledger: PendingEntryLedger) -> None:
    """A lock() context manager cannot be entered twice."""
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
    "try_enter": lambda ledger: _gate(ledger).try_enter("Z", 1, {}),
    "try_enter(own book)": lambda ledger: _gate(ledger).try_enter("Z", 1),
    "try_enter(timeout=0)": lambda ledger: _gate(ledger).try_enter("Z", 1, timeout=0),
    "halt": lambda ledger: _gate(ledger).halt(),
    "resume": lambda ledger: _gate(ledger).resume(),
    "set_position": lambda ledger: _gate(ledger).set_position("Z", 1),
    "close_position": lambda ledger: _gate(ledger).close_position("Z"),
    "confirm_fill": lambda ledger: _gate(ledger).confirm_fill("x", 1, symbol="Z"),
    "positions": lambda ledger: _gate(ledger).positions(),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("reentry", list(REENTRIES))
def test_reentry_raises_at_once(ledger: PendingEntryLedger, reentry: str) -> None:
    """Taking the lock again from inside this thread's block raises ReentrantLockError at once
    and leaves the block usable."""
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
    """A ReentrantLockError that leaves the block rolls it back like any exception."""
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
        assert ledger.locked() is True
    with pytest.raises(Boom), ledger.lock() as pending:
        pending.reserve("CCC", 7)
        assert ledger.stats().outstanding == 2
        raise Boom
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.reserved) == (1, 5, 2)


@pytest.mark.timeout(10)
def test_another_threads_block_does_not_count_as_reentry(ledger: PendingEntryLedger) -> None:
    """A block taken by another thread after ours ended is not re-entry."""
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
    """lock(timeout) raises LockTimeout (a TimeoutError and a LedgerError) and changes nothing."""
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
    assert ledger.audit() == []


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
    """A PendingMap used after its block raises StaleViewError and changes nothing."""
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
    """The view of a block that raised is stale too."""
    with pytest.raises(Boom), ledger.lock() as pending:
        raise Boom
    with pytest.raises(StaleViewError):
        len(pending)


# ---------------------------------------------------------------------------- the clock


def test_ledger_properties(clock: ManualClock) -> None:
    """ttl, clock and repr."""
    ledger = PendingEntryLedger(2, clock=clock)
    assert ledger.ttl == 2.0
    assert ledger.clock is clock
    assert "PendingEntryLedger" in repr(ledger)


def test_default_clock_is_monotonic() -> None:
    """Without a clock the ledger stamps with time.monotonic."""
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


@pytest.mark.parametrize("reading", [float("nan"), float("inf"), "12", None, True])
def test_a_clock_that_returns_no_finite_seconds_is_an_error(reading: object) -> None:
    """A bad clock reading raises LedgerError before the lock is taken, leaving it free."""
    ledger = PendingEntryLedger(10, clock=lambda: untyped(reading))
    with pytest.raises(LedgerError, match="clock"), ledger.lock():
        pass  # pragma: no cover
    with pytest.raises(LedgerError, match="clock"):
        ledger.stats()
    assert ledger.locked() is False


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
            assert not self.ledger.locked()  # the clock was read before the lock
            meanwhile()
        finally:
            self._go_on.set()
            slow.join(5)
        return as_reservation(decisions[0].reservation)


@pytest.mark.timeout(10)
def test_reservation_expires_at_its_expires_at_even_when_committed_out_of_order() -> None:
    """A reservation committed after a newer one still expires at its own expires_at."""
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


def test_a_fill_that_lands_as_the_ttl_runs_out_is_a_fill(clock: ManualClock) -> None:
    """confirm_fill looks the order up before its own sweep: a fill reported at (or after) the
    deadline, before anything swept the reservation, records the position and ends it FILLED,
    without ``symbol=`` too; an expiry would have lost the position and under-counted."""
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(10, clock=clock, on_expire=expired.append)
    gate = PortfolioGate(ledger, PortfolioLimits())
    res = gate.try_enter("AAA", 100, order_id="o").reservation
    assert isinstance(res, Reservation)
    clock.advance(10)
    assert gate.confirm_fill("o", 100)
    assert res.state is ReservationState.FILLED
    assert gate.positions() == {"AAA": 100}
    assert expired == [] and ledger.audit() == []
