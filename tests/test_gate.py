"""PortfolioGate: every rule, the check order, halt/resume, positions, limits, stats, a model."""

from __future__ import annotations

import copy
import enum
import gc
import itertools
import math
import pickle
import random
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType

import pytest
import typecheck

from pendingledger import (
    Admitted,
    Decision,
    Denied,
    DenyReason,
    GateStats,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Positions,
    ReentrantLockError,
    Reservation,
    ReservationHandle,
    ReservationState,
    Side,
    TradingState,
    rules,
)
from pendingledger.gate import MAX_READS
from pendingledger.limits import DENIED, REASONS, denied
from pendingledger.testing import ManualClock, ManualWallClock, run_concurrently

Number = int | float | Decimal | Fraction
Book = dict[str, Number]
NO_POSITIONS: Book = {}
Unchanged = Callable[..., AbstractContextManager[None]]
SCALE = 10**9  # units per 1: the amount model's, restated here so the model computes its own
DEADLOCK = 30.0  # seconds a helper thread may take before the test calls it a deadlock


def call_in_thread(fn: Callable[[], object], timeout: float = DEADLOCK) -> BaseException | None:
    """Run ``fn`` on a daemon thread; return what it raised (None if nothing).

    A call still running after ``timeout`` fails the test as a deadlock instead of hanging it.
    """
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "deadlock: the call never returned"
    return raised[0] if raised else None


@contextmanager
def lock_held_elsewhere(ledger: PendingEntryLedger) -> Iterator[None]:
    """Hold the ledger lock on a helper thread for the whole body of the ``with``."""
    taken = threading.Event()
    done = threading.Event()

    def hold() -> None:
        with ledger.lock():
            taken.set()
            done.wait(DEADLOCK)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(DEADLOCK), "the helper never took the lock"
    try:
        yield
    finally:
        done.set()
        thread.join(DEADLOCK)
    assert not thread.is_alive()


def is_halted(gate: PortfolioGate) -> bool:
    """``gate.halted`` through a call, so mypy does not narrow the property across halt()."""
    return gate.halted


def reservation_of(decision: Decision) -> Reservation:
    """The in-process ``Reservation`` an admitted decision carries."""
    res = decision.reservation
    assert isinstance(res, Reservation), decision
    return res


def limits(
    positions: int | None = None, gross: Number | None = None, symbol: Number | None = None
) -> PortfolioLimits:
    """``PortfolioLimits`` by short names."""
    return PortfolioLimits(
        max_concurrent_positions=positions, max_gross_exposure=gross, max_symbol_exposure=symbol
    )


GENERATED_ID = re.compile(r"(pl-[0-9a-f]{16}-)([0-9]+)")


# ---------------------------------------------------------------------------- decisions


def test_admitted_decision(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    """An admitted decision is truthy, has no reason and carries the reservation it made."""
    decision = gate.try_enter("AAA", 1000, NO_POSITIONS, order_id="c-1")
    assert decision
    assert decision.admitted is True
    assert decision.reason is None
    res = reservation_of(decision)
    assert (res.symbol, res.order_id, res.notional, res.active) == ("AAA", "c-1", 1000, True)
    assert repr(decision).startswith("Admitted(reservation=")
    with ledger.lock() as pending:
        assert pending.symbol_notional("AAA") == 1000


def test_denied_decision(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    """A denied decision is falsy, names the failed rule and reserves nothing."""
    gate.limits = limits(positions=0)
    decision = gate.try_enter("AAA", 1000, NO_POSITIONS)
    assert not decision
    assert decision.admitted is False
    assert decision.reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert decision.reservation is None
    assert "MAX_CONCURRENT_POSITIONS" in repr(decision)
    assert ledger.stats().outstanding == 0


def test_decisions_are_admitted_with_a_reservation_or_denied_with_a_reason() -> None:
    """``Admitted`` needs its reservation; ``Denied`` a ``DenyReason`` and at most a strategy's
    name; each answers every attribute of the other with the value that says which it is."""
    with pytest.raises(ValueError, match="None"):
        Admitted(None)
    with pytest.raises(TypeError, match="'halted'"):
        Denied("halted")
    with pytest.raises(ValueError, match="scope"):
        Denied(DenyReason.HALTED, "")
    denied = Denied(DenyReason.HALTED, "s1")
    assert (denied.admitted, bool(denied), denied.reservation) == (False, False, None)
    assert (denied.reason, denied.scope) is not None
    assert repr(denied) == "Denied(reason=HALTED, scope='s1')"
    marker = object()
    admitted = Admitted(marker)
    assert (admitted.admitted, bool(admitted), admitted.reason, admitted.scope) == (
        True, True, None, None)  # fmt: skip
    assert admitted.reservation is marker
    assert isinstance(admitted, Decision) and isinstance(denied, Decision)


def test_deny_reason_str() -> None:
    """Reasons are StrEnum members whose str is their value."""
    assert str(DenyReason.MAX_GROSS_EXPOSURE) == "max_gross_exposure"
    assert str(DenyReason.LOCK_TIMEOUT) == "lock_timeout"


def test_denied_decisions_are_shared_one_per_reason(gate: PortfolioGate) -> None:
    """``DENIED`` holds one shared denied decision per reason, in rule-code order, ``denied()``
    finds it, and the gate answers a denial with exactly that object (denials allocate nothing)."""
    assert isinstance(DENIED, tuple)
    assert REASONS[0] is None and REASONS[1:] == tuple(DenyReason)
    for code, reason in enumerate(DenyReason, start=1):
        assert DENIED[code - 1].reason is reason and not DENIED[code - 1]
        assert denied(reason) is DENIED[code - 1]
        assert REASONS[code] is reason
    codes = {
        rules.HALTED: DenyReason.HALTED,
        rules.REDUCING_ONLY: DenyReason.REDUCING_ONLY,
        rules.MAX_CONCURRENT_POSITIONS: DenyReason.MAX_CONCURRENT_POSITIONS,
        rules.MAX_GROSS_EXPOSURE: DenyReason.MAX_GROSS_EXPOSURE,
        rules.MAX_SYMBOL_EXPOSURE: DenyReason.MAX_SYMBOL_EXPOSURE,
        rules.MAX_NET_EXPOSURE: DenyReason.MAX_NET_EXPOSURE,
        rules.MAX_ORDER_NOTIONAL: DenyReason.MAX_ORDER_NOTIONAL,
        rules.MAX_OPEN_ORDERS: DenyReason.MAX_OPEN_ORDERS,
        rules.MAX_OPEN_ORDERS_PER_SYMBOL: DenyReason.MAX_OPEN_ORDERS_PER_SYMBOL,
        rules.MAX_ORDERS_PER_INTERVAL: DenyReason.MAX_ORDERS_PER_INTERVAL,
        rules.BACKEND_UNAVAILABLE: DenyReason.BACKEND_UNAVAILABLE,
        rules.BOOK_NOT_RESTORED: DenyReason.BOOK_NOT_RESTORED,
        rules.LOCK_TIMEOUT: DenyReason.LOCK_TIMEOUT,
    }
    assert all(REASONS[code] is reason for code, reason in codes.items())
    assert sorted(codes) == list(range(1, len(REASONS)))  # every code, the backends' moved up
    assert (rules.BACKEND_UNAVAILABLE, rules.BOOK_NOT_RESTORED, rules.LOCK_TIMEOUT) == (11, 12, 13)
    gate.limits = limits(positions=0)
    assert gate.try_enter("AAA", 1) is denied(DenyReason.MAX_CONCURRENT_POSITIONS)
    assert gate.try_enter("AAA", 1, NO_POSITIONS) is denied(DenyReason.MAX_CONCURRENT_POSITIONS)
    gate.halt()
    assert gate.try_enter("AAA", 1, lambda: NO_POSITIONS) is denied(DenyReason.HALTED)


# ---------------------------------------------------------------------------- order ids


def test_generated_order_id_when_none_given(gate: PortfolioGate, clock: ManualClock) -> None:
    """Without an order id the ledger names the order ``"pl-<16 hex>-<seq>"``: a plain str, one
    prefix per ledger, a different sequence number per reservation."""
    first = reservation_of(gate.try_enter("AAA", 1, NO_POSITIONS))
    second = reservation_of(gate.try_enter("AAA", 1, NO_POSITIONS))
    ids = [first.order_id, second.order_id]
    assert all(type(oid) is str for oid in ids)
    found = [GENERATED_ID.fullmatch(oid) for oid in ids]
    assert found[0] is not None and found[1] is not None, ids
    assert found[0][1] == found[1][1]  # one ledger, one prefix
    assert found[0][2] != found[1][2]
    elsewhere = PortfolioGate(PendingEntryLedger(10.0, clock=clock), PortfolioLimits())
    theirs = reservation_of(elsewhere.try_enter("AAA", 1)).order_id
    assert not theirs.startswith(found[0][1])  # another ledger, another prefix


def test_generated_order_id_finds_its_reservation(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """A generated id is made when read; every reading names the same reservation."""
    res = reservation_of(gate.try_enter("AAA", 1))
    other = reservation_of(gate.try_enter("BBB", 1))
    assert res.order_id == res.order_id and hash(res.order_id) == hash(res.order_id)
    assert {res.order_id: 1}[res.order_id] == 1
    assert res.order_id != other.order_id and res.order_id != repr(res.order_id)
    assert gate.confirm_fill(res.order_id, 1) is True  # found by its generated id
    assert res.state is ReservationState.FILLED and gate.positions() == {"AAA": 1}
    assert ledger.release_order(res.order_id) is False  # ended: nothing to release
    assert ledger.release_order(other.order_id) is True
    assert other.state is ReservationState.RELEASED


def test_a_callers_id_shaped_like_a_generated_one_is_only_the_callers(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """Only this ledger's own generated ids are refused as a caller's: an id of the same shape
    from another ledger is a caller's id like any other, found by its text, and it never stands
    for (or blocks) a reservation the ledger names itself."""
    elsewhere = PortfolioGate(PendingEntryLedger(10.0, clock=clock), PortfolioLimits())
    foreign = reservation_of(elsewhere.try_enter("ZZZ", 1)).order_id  # seq 0 over there
    mine = reservation_of(gate.try_enter("AAA", 1, order_id=foreign))  # seq 0 here
    generated = reservation_of(gate.try_enter("BBB", 1))
    odd = [reservation_of(gate.try_enter("CCC", 1, order_id=oid)) for oid in ("pl-", "pl-x-1")]
    assert mine.order_id == foreign and generated.order_id != foreign
    assert [res.order_id for res in odd] == ["pl-", "pl-x-1"]
    assert ledger.release_order(foreign) is True
    assert mine.state is ReservationState.RELEASED and generated.active
    assert ledger.release_order("pl-x-1") is True and odd[0].active
    assert ledger.release_order(generated.order_id) is True


def test_generated_order_id_holds_nothing_and_pickles(gate: PortfolioGate) -> None:
    """An id kept in a caller's records is a plain str: it keeps no reservation or ledger alive,
    and it travels (pickle, copy) and still names its reservation."""
    res = reservation_of(gate.try_enter("AAA", 1))
    order_id = res.order_id
    assert type(order_id) is str
    assert gc.get_referents(order_id) == []
    assert pickle.loads(pickle.dumps(order_id)) == order_id
    assert copy.deepcopy(order_id) == order_id and hash(copy.copy(order_id)) == hash(order_id)
    assert gate.release_order(pickle.loads(pickle.dumps(order_id))) is True


def test_generated_order_id_of_another_ledger_finds_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """Not even the reservation with the same sequence number in the other ledger."""
    res = reservation_of(gate.try_enter("AAA", 1))
    elsewhere = PendingEntryLedger(10.0, clock=clock)
    theirs = reservation_of(PortfolioGate(elsewhere, PortfolioLimits()).try_enter("AAA", 1))
    mine_id, their_id = (
        GENERATED_ID.fullmatch(res.order_id),
        GENERATED_ID.fullmatch(theirs.order_id),
    )
    assert mine_id is not None and their_id is not None
    assert mine_id[2] == their_id[2]  # the same sequence number: what a lookup by it would match
    assert res.order_id != theirs.order_id
    assert elsewhere.release_order(res.order_id) is False
    assert ledger.release_order(theirs.order_id) is False
    assert res.active and theirs.active


# Run in a fresh interpreter: the first ledger there, its first reservation made without an id.
_FIRST_GENERATED_ID = """
import pickle, sys
from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits
ledger = PendingEntryLedger(10.0)
res = PortfolioGate(ledger, PortfolioLimits()).try_enter("AAA", 1).reservation
if len(sys.argv) > 1:  # given another process's id: it must name nothing here
    foreign = pickle.loads(bytes.fromhex(sys.argv[1]))
    print(foreign == res.order_id, ledger.release_order(foreign), res.active)
else:
    print(pickle.dumps(res.order_id).hex())
"""


def test_generated_order_id_from_another_process_names_nothing_here() -> None:
    """Ids outlive their process (a bot's records, a restart): one process's first generated id
    must not equal, and must not release, another's first reservation."""
    # -P as this interpreter runs: the child imports the same build (installed or source tree)
    safe_path = ["-P"] if sys.flags.safe_path else []

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *safe_path, "-c", _FIRST_GENERATED_ID, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.strip()

    assert run(run()) == "False False True"


def test_a_generated_order_id_cannot_be_passed_as_a_callers(
    gate: PortfolioGate, ledger: PendingEntryLedger, unchanged: Unchanged
) -> None:
    """Passing one of this ledger's generated ids as a new ``order_id`` is a ValueError."""
    res = reservation_of(gate.try_enter("AAA", 1))
    with unchanged(ledger, gate), pytest.raises(ValueError, match="generated"):
        gate.try_enter("BBB", 1, order_id=res.order_id)
    with unchanged(ledger, gate), pytest.raises(ValueError, match="generated"):
        gate.try_enter("BBB", 1, lambda: NO_POSITIONS, order_id=res.order_id)
    with ledger.lock() as pending, pytest.raises(ValueError, match="generated"):
        pending.reserve("BBB", 1, order_id=res.order_id)


class Venue(enum.StrEnum):
    """Symbols as a StrEnum, as a bot might name its instruments."""

    BTC = "BTCUSDT"
    ETH = "ETHUSDT"


class Touchy(str):
    """A str subclass whose hashing and comparing fail: the ledger must copy it, not use it."""

    __slots__ = ()

    def __hash__(self) -> int:
        raise AssertionError(f"hashed {str.__str__(self)!r}")

    def __eq__(self, other: object) -> bool:
        raise AssertionError(f"compared {str.__str__(self)!r}")


def test_str_subclass_symbols_and_ids_are_keyed_as_plain_str(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """A StrEnum member (or any str subclass) is accepted and kept as the plain str it spells:
    the same symbol and order id as that str, and no subclass method ever runs."""
    gate.limits = limits(positions=2)
    res = reservation_of(gate.try_enter(Venue.BTC, 1, order_id=Venue.ETH))
    assert (type(res.symbol), type(res.order_id)) == (str, str)
    assert (res.symbol, res.order_id) == ("BTCUSDT", "ETHUSDT")
    assert gate.try_enter("BTCUSDT", 1)  # a top-up of the same symbol
    gate.set_position(Venue.ETH, 5)
    assert [type(symbol) for symbol in gate.positions()] == [str]
    assert gate.try_enter("NEW", 1).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    cache: Book = {Venue.BTC: 1, Venue.ETH: 1}  # BTCUSDT open and reserved: one slot
    assert gate.try_enter("NEW", 1, cache) is denied(DenyReason.MAX_CONCURRENT_POSITIONS)
    assert gate.try_enter("ETHUSDT", 1, cache)
    with ledger.lock() as pending:
        assert {type(symbol) for symbol in pending} == {str}
    touchy = reservation_of(gate.try_enter(Touchy("ETHUSDT"), 1, order_id=Touchy("t-1")))
    assert (type(touchy.symbol), type(touchy.order_id)) == (str, str)
    assert gate.release_order(Touchy("t-1")) is True
    assert gate.close_position(Touchy("ETHUSDT")) is True
    assert ledger.release(Venue.BTC) is True and ledger.release(Venue.ETH) is True
    assert ledger.stats().outstanding == 0 and ledger.audit() == []


# ---------------------------------------------------------------------------- the rules


def test_halted_until_resume(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    """halt() denies every entry, even a top-up, until resume(); reservations stay."""
    kept = gate.try_enter("AAA", 1, NO_POSITIONS).reservation
    assert is_halted(gate) is False
    gate.halt()
    assert is_halted(gate) is True
    decision = gate.try_enter("BBB", 1, NO_POSITIONS)
    assert decision.reason is DenyReason.HALTED
    assert gate.try_enter("AAA", 1, NO_POSITIONS).reason is DenyReason.HALTED  # even a top-up
    assert kept is not None and kept.active  # outstanding reservations stay
    gate.halt()  # idempotent
    gate.resume()
    assert is_halted(gate) is False
    assert gate.try_enter("BBB", 1, NO_POSITIONS)
    assert ledger.stats().outstanding == 2


def test_max_positions_counts_open_and_reserved(gate: PortfolioGate) -> None:
    """Open positions and reserved symbols both take a concurrency slot."""
    gate.limits = limits(positions=3)
    positions: Book = {"AAA": 100}
    assert gate.try_enter("BBB", 1, positions)
    assert gate.try_enter("CCC", 1, positions)
    assert gate.try_enter("DDD", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_symbol_already_reserved_takes_no_new_slot(gate: PortfolioGate) -> None:
    """A top-up of a reserved symbol passes the concurrency rule."""
    gate.limits = limits(positions=1)
    assert gate.try_enter("AAA", 1, NO_POSITIONS)
    assert gate.try_enter("AAA", 1, NO_POSITIONS)  # top-up: same slot
    assert gate.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_symbol_already_open_takes_no_new_slot(gate: PortfolioGate) -> None:
    """Adding to an open position passes the concurrency rule."""
    gate.limits = limits(positions=1)
    positions: Book = {"AAA": 500}
    assert gate.try_enter("AAA", 1, positions)  # adds to the open position
    assert gate.try_enter("AAA", 1, positions)
    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_reserved_symbol_that_is_open_is_counted_once(gate: PortfolioGate) -> None:
    """A symbol both open and reserved holds one slot, not two."""
    gate.limits = limits(positions=2)
    assert gate.try_enter("AAA", 1, NO_POSITIONS)
    # the fill is in the cache but the reservation is not released yet: AAA still one slot
    positions: Book = {"AAA": 1}
    assert gate.try_enter("BBB", 1, positions)
    assert gate.try_enter("CCC", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_zero_positions_limit_allows_no_new_position(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """With ``max_concurrent_positions=0`` only symbols already open or reserved pass (open in
    the owned book: a caller's read cannot vouch that a symbol is still open, see
    ``test_a_callers_book_over_the_position_limit_denies_adding_to_an_open_one``)."""
    with ledger.lock() as pending:
        pending.reserve("RRR", 1)  # reserved before the limit went to zero
    gate.limits = limits(positions=0)
    assert gate.try_enter("NEW", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("NEW", 1, {"OPEN": 1}).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("OPEN", 1, {"OPEN": 1}).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("RRR", 1, NO_POSITIONS)  # already reserved
    assert gate.try_enter("RRR", 1, {"RRR": 1})  # open and reserved
    gate.set_position("OPEN", 1)
    assert gate.try_enter("OPEN", 1)  # already open in the owned book


def test_a_position_with_zero_exposure_is_open(gate: PortfolioGate) -> None:
    """A key present means open, whatever its exposure."""
    gate.limits = limits(positions=1)
    positions: Book = {"AAA": 0}
    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("AAA", 1, positions)


def test_positions_limit_frees_up_when_a_reservation_ends(gate: PortfolioGate) -> None:
    """Releasing a reservation gives its slot back."""
    gate.limits = limits(positions=1)
    decision = gate.try_enter("AAA", 1, NO_POSITIONS)
    assert gate.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert decision.reservation is not None
    decision.reservation.release()  # exchange reject
    assert gate.try_enter("BBB", 1, NO_POSITIONS)


def test_gross_exactly_at_limit_is_admitted_above_is_denied(gate: PortfolioGate) -> None:
    """Landing exactly on the gross limit is admitted; one unit (1e-9) more is denied."""
    gate.limits = limits(gross=1000)
    positions: Book = {"OPEN": 300}
    assert gate.try_enter("AAA", 400, positions)
    assert gate.try_enter("BBB", 301, positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("BBB", 300, positions)  # 300 + 400 + 300 == 1000: admitted
    assert gate.try_enter("CCC", Fraction(1, 10**9), positions).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )


def test_gross_boundary_is_exact_with_decimals_and_fractions(gate: PortfolioGate) -> None:
    """Amounts with at most 9 decimals are exact; anything finer counts as a whole unit."""
    gate.limits = limits(gross=Decimal("0.3"))
    assert gate.try_enter("A", Decimal("0.1"), NO_POSITIONS)
    assert gate.try_enter("B", Decimal("0.2"), NO_POSITIONS)  # exactly 0.3
    assert gate.try_enter("C", Decimal("1e-30"), NO_POSITIONS).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )


def test_floats_count_as_the_decimal_they_print_as(gate: PortfolioGate) -> None:
    """0.1 + 0.2 fits a limit of 0.3 (as a person reads it, not as binary floats add up)."""
    gate.limits = limits(gross=0.3)
    assert gate.try_enter("A", 0.1, NO_POSITIONS)
    assert gate.try_enter("B", 0.2, NO_POSITIONS)
    assert gate.try_enter("C", 1e-9, NO_POSITIONS).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.ledger.stats().gross_notional == 0.3


def test_amounts_finer_than_a_unit_count_up_and_limits_round_down(gate: PortfolioGate) -> None:
    """A third reserves ceil(1e9 / 3) units, so three thirds do not fit a limit of 1; a limit of
    a third rounds down, so a third does not fit it, but 0.333333333 does."""
    gate.limits = limits(gross=Fraction(1))
    assert gate.try_enter("A", Fraction(1, 3), NO_POSITIONS)
    assert gate.try_enter("B", Fraction(1, 3), NO_POSITIONS)
    assert gate.try_enter("C", Fraction(1, 3), NO_POSITIONS).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )
    assert gate.ledger.stats().gross_notional == Fraction(2 * 333333334, SCALE)
    assert gate.try_enter("C", Fraction(333333332, SCALE), NO_POSITIONS)  # exactly 1 again
    gate.limits = limits(symbol=Fraction(1, 3))
    assert gate.try_enter("D", Fraction(1, 3), NO_POSITIONS).reason is (
        DenyReason.MAX_SYMBOL_EXPOSURE
    )
    assert gate.try_enter("D", Decimal("0.333333333"), NO_POSITIONS)


def test_short_positions_count_by_absolute_value(gate: PortfolioGate) -> None:
    """A short position's exposure counts by its absolute value, in gross and per symbol."""
    gate.limits = limits(gross=1000, symbol=700)
    positions: Book = {"AAA": -600, "BBB": 100}
    assert gate.try_enter("CCC", 301, positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("CCC", 300, positions)
    gate.limits = limits(symbol=700)
    assert gate.try_enter("AAA", 101, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE
    assert gate.try_enter("AAA", 100, positions)


def test_symbol_limit_counts_position_and_that_symbols_reservations_only(
    gate: PortfolioGate,
) -> None:
    """The symbol rule adds the symbol's position and its own reservations, nothing else."""
    gate.limits = limits(symbol=1000)
    positions: Book = {"AAA": 200, "BBB": 900}
    assert gate.try_enter("AAA", 500, positions)
    assert gate.try_enter("AAA", 301, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE
    assert gate.try_enter("AAA", 300, positions)  # 200 + 800 == 1000
    assert gate.try_enter("CCC", 1000, positions)  # other symbols don't count
    assert gate.try_enter("BBB", 100, positions)
    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE


def test_check_order_first_failure_wins(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    """Halted, then positions, then gross, then symbol: the first rule that fails is reported."""
    positions: Book = {"OPEN": 1000}
    everything_fails = limits(positions=1, gross=10, symbol=5)
    gate.limits = everything_fails
    gate.halt()
    assert gate.try_enter("NEW", 100, positions).reason is DenyReason.HALTED
    gate.resume()
    assert gate.try_enter("NEW", 100, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    # the positions rule passes for a symbol already open: gross is next
    assert gate.try_enter("OPEN", 100, positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    gate.limits = limits(positions=1, gross=None, symbol=5)
    assert gate.try_enter("OPEN", 100, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE
    gate.limits = limits(positions=2, gross=2000, symbol=5)
    assert gate.try_enter("NEW", 6, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE
    assert gate.try_enter("NEW", 5, positions)
    assert ledger.stats().outstanding == 1


def test_no_limits_admits_everything(gate: PortfolioGate) -> None:
    """With no limit set, any amount below 1e15 is admitted, however many and however large."""
    positions: Book = {f"P{i}": 10**12 for i in range(100)}
    for i in range(50):
        assert gate.try_enter(f"S{i}", 10**15 - 1, positions)


def test_decisions_see_reservations_made_in_lock_blocks(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """A reservation made through ``lock()`` counts in the next decision."""
    gate.limits = limits(positions=2, gross=100)
    with ledger.lock() as pending:
        pending.reserve("AAA", 60)
    assert gate.try_enter("BBB", 41, NO_POSITIONS).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("BBB", 40, NO_POSITIONS)
    assert gate.try_enter("CCC", 0.001, NO_POSITIONS).reason is (
        DenyReason.MAX_CONCURRENT_POSITIONS
    )


def test_expired_reservations_no_longer_count(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """Once its TTL has run out a reservation is expired by the next decision and frees room."""
    gate.limits = limits(positions=1, gross=100)
    first = gate.try_enter("AAA", 100, NO_POSITIONS).reservation
    assert gate.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    clock.advance(ledger.ttl)
    assert gate.try_enter("BBB", 100, NO_POSITIONS)
    assert isinstance(first, Reservation)  # the in-process gate hands out ledger reservations
    assert first.state is ReservationState.EXPIRED
    assert ledger.stats().expired == 1


def test_several_gates_on_one_ledger_share_its_reservations(
    ledger: PendingEntryLedger,
) -> None:
    """Gates on one ledger see each other's reservations but keep their own limits and counts."""
    strict = PortfolioGate(ledger, limits(positions=1))
    loose = PortfolioGate(ledger, limits(positions=3))
    assert loose.try_enter("AAA", 1, NO_POSITIONS)
    assert strict.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert loose.try_enter("BBB", 1, NO_POSITIONS)
    assert loose.stats().admitted == 2
    assert strict.stats().admitted == 0


# ---------------------------------------------------------------------------- halt


def test_halt_denies_a_decision_already_reading_its_positions(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """halt() does not wait for a decision that is reading positions (that happens outside the
    lock), and that decision, committing after halt() returned, is denied HALTED."""
    reading = threading.Event()
    go_on = threading.Event()
    outcome: list[Decision] = []

    def positions() -> Book:
        reading.set()
        assert go_on.wait(DEADLOCK)
        return {}

    def decide() -> None:
        outcome.append(gate.try_enter("AAA", 1, positions))

    thread = threading.Thread(target=decide, daemon=True)
    thread.start()
    try:
        assert reading.wait(DEADLOCK)
        gate.halt()  # returns while the other thread is mid-decision
    finally:
        go_on.set()
        thread.join(DEADLOCK)
    assert outcome == [denied(DenyReason.HALTED)]
    assert ledger.stats().outstanding == 0


SOURCES: list[Positions | None] = [None, NO_POSITIONS, lambda: NO_POSITIONS]


@pytest.mark.timeout(60)
def test_no_decision_started_after_halt_returns_is_admitted(
    gate: PortfolioGate, fast_switching: float
) -> None:
    """Threads decide in a loop (own book, a mapping, a callable) while one halts the gate; each
    decision notes whether halt() had returned before it started. Every one that started after
    is denied HALTED; the ones before were admitted (so the race was run, not skipped)."""
    halted = threading.Event()
    admitted = threading.Event()
    late: list[Decision] = []
    early: list[Decision] = []
    late_per_thread = 200

    def worker(index: int) -> None:
        if index == 0:
            assert admitted.wait(DEADLOCK)
            gate.halt()
            halted.set()
            return
        seen_late = 0
        while seen_late < late_per_thread:
            after = halted.is_set()
            decision = gate.try_enter(f"S{index}", 1, SOURCES[index % 3])
            if decision.reservation is not None:
                decision.reservation.release()
                admitted.set()
            if after:
                late.append(decision)
                seen_late += 1
            else:
                early.append(decision)

    run_concurrently(worker, 7)
    assert len(late) == 6 * late_per_thread
    assert all(decision is denied(DenyReason.HALTED) for decision in late)
    assert any(decision for decision in early)


# ---------------------------------------------------------------------------- positions


def test_positions_callable_is_called_and_its_result_used(gate: PortfolioGate) -> None:
    """The callable is called once per decision when nothing interferes, and decides it."""
    gate.limits = limits(positions=2, gross=1000)
    calls: list[int] = []

    def positions() -> Book:
        calls.append(1)
        return {"AAA": 600, "BBB": -100}

    assert gate.try_enter("CCC", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("AAA", 301, positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("AAA", 300, positions)
    assert len(calls) == 3  # once per decision when nothing interferes


def test_an_expiry_found_by_the_decision_makes_the_read_stale(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """The decision's own sweep ends a reservation after the positions were read (its fill may
    have landed meanwhile): the callable is called again and the second read decides."""
    gate.limits = limits(positions=1)
    gate.try_enter("AAA", 1, NO_POSITIONS)
    clock.advance(ledger.ttl)
    reads: list[Book] = [{}, {"AAA": 1}]  # the late fill of AAA shows on the second read
    calls: list[int] = []

    def positions() -> Book:
        calls.append(1)
        return reads[len(calls) - 1]

    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert ledger.stats().expired == 1
    assert len(calls) == 2


@pytest.mark.parametrize("expiry_due", [False, True], ids=["nothing-due", "expiry-due"])
@pytest.mark.parametrize("timeout", [None, 0.0], ids=["wait", "timeout=0"])
def test_positions_callable_runs_with_the_ledger_lock_free(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    clock: ManualClock,
    expiry_due: bool,
    timeout: float | None,
) -> None:
    """The callable is caller code: it runs before the lock is taken, so the lock is free inside
    it and another thread can take it at once."""
    if expiry_due:
        gate.try_enter("OLD", 1, NO_POSITIONS)
        clock.advance(ledger.ttl)
    seen: list[tuple[bool, BaseException | None]] = []

    def positions() -> Book:
        seen.append((ledger.locked(), call_in_thread(lambda: _enter_and_leave(ledger))))
        return {}

    assert gate.try_enter("AAA", 1, positions, timeout=timeout)
    assert seen and all(entry == (False, None) for entry in seen)


def test_positions_callable_that_raises_changes_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, unchanged: Unchanged
) -> None:
    """An exception from the callable propagates with nothing reserved or counted."""
    gate.limits = limits(positions=5)
    gate.try_enter("AAA", 1, NO_POSITIONS)

    def positions() -> Book:
        raise ConnectionError("position cache unavailable")

    with unchanged(ledger, gate), pytest.raises(ConnectionError):
        gate.try_enter("BBB", 1, positions)


class _Book(Mapping[str, Number]):
    """A read-only Mapping that is not a dict."""

    def __init__(self, data: Book) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Number:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    "wrap",
    [dict, MappingProxyType, _Book, lambda d: lambda: d, lambda d: lambda: _Book(d)],
    ids=["dict", "mappingproxy", "Mapping", "callable->dict", "callable->Mapping"],
)
def test_positions_any_mapping_or_callable(
    gate: PortfolioGate, wrap: Callable[[Book], object]
) -> None:
    """Any Mapping, or a callable returning one, is read the same way."""
    gate.limits = limits(positions=2, gross=1000, symbol=500)
    positions = wrap({"AAA": 400, "BBB": Decimal(-350)})
    assert gate.try_enter("CCC", 1, positions).reason is (DenyReason.MAX_CONCURRENT_POSITIONS)
    assert gate.try_enter("AAA", 251, positions).reason is (DenyReason.MAX_GROSS_EXPOSURE)
    assert gate.try_enter("AAA", 101, positions).reason is (DenyReason.MAX_SYMBOL_EXPOSURE)
    assert gate.try_enter("AAA", 100, positions)


def test_positions_are_read_for_each_decision(gate: PortfolioGate) -> None:
    """A mapping is read afresh by every decision (it is the caller's live cache)."""
    gate.limits = limits(positions=1)
    cache: Book = {}
    assert gate.try_enter("AAA", 1, cache)
    cache["AAA"] = 1  # the fill lands in the cache...
    gate.ledger.release("AAA")  # ...then the reservation is released
    assert gate.try_enter("BBB", 1, cache).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    del cache["AAA"]  # position closed
    assert gate.try_enter("BBB", 1, cache)


# What ends (or shrinks) the reservation between the read and the commit, and what the fill puts
# in the cache first (the fill router's order): the limits are such that the first, stale read
# admits and the second denies.
STALE_CASES: dict[str, tuple[PortfolioLimits, Callable[[Reservation], object], Book, DenyReason]]
STALE_CASES = {
    "released": (
        limits(positions=1),
        Reservation.release,
        {"AAA": 10},
        (DenyReason.MAX_CONCURRENT_POSITIONS),
    ),
    "partly filled": (
        limits(gross=10),
        lambda res: res.reduce(4),
        {"AAA": 4},
        DenyReason.MAX_GROSS_EXPOSURE,
    ),
}


@pytest.mark.parametrize("where", ["in the callable", "on another thread"])
@pytest.mark.parametrize("case", list(STALE_CASES))
def test_a_read_gone_stale_is_read_again_and_the_second_read_decides(
    gate: PortfolioGate, ledger: PendingEntryLedger, case: str, where: str
) -> None:
    """The race the epoch check closes: a fill lands in the cache and its reservation ends (or
    shrinks) after the positions were read but before the commit. The first read saw neither;
    the gate reads again and decides on what the second read shows."""
    lim, end, filled, reason = STALE_CASES[case]
    gate.limits = lim
    held = reservation_of(gate.try_enter("AAA", 10, NO_POSITIONS))
    cache: Book = {}
    reads: list[Book] = []

    def fill() -> None:
        cache.update(filled)  # the fill router: the cache first...
        end(held)  # ...then the reservation

    def positions() -> Book:
        reads.append(dict(cache))
        if len(reads) == 1:
            if where == "in the callable":
                fill()  # allowed: the callable runs outside the lock
            else:
                assert call_in_thread(fill) is None
        return reads[-1]

    assert gate.try_enter("BBB", 1, positions) is denied(reason)
    assert reads == [{}, filled]
    assert "BBB" not in set(_reserved_symbols(ledger))
    # The one-read decision this test rules out: deciding on the first read now admits.
    assert gate.try_enter("BBB", 1, reads[0])


@pytest.mark.parametrize("where", ["in the callable", "on another thread"])
def test_a_position_closed_after_the_read_lends_no_slot(
    gate: PortfolioGate, ledger: PendingEntryLedger, where: str
) -> None:
    """The race the epoch check cannot see (found by the stress suite): the read shows XXX open,
    four symbols in all at a limit of four. Before the commit the router closes XXX (no
    reservation ends, so the epoch stays) and another entry takes the slot XXX left. Taking the
    read's word that XXX is open, the gate would add to it without a slot: a fifth symbol."""
    gate.limits = limits(positions=4)
    cache: Book = {"AAA": 1, "BBB": 1, "CCC": 1, "XXX": 1}
    others: list[Decision] = []

    def close_and_take_the_slot() -> None:
        del cache["XXX"]  # the router closes XXX...
        others.append(gate.try_enter("DDD", 1, cache))  # ...and DDD takes its slot

    def positions() -> Book:
        read = dict(cache)
        if not others:
            if where == "in the callable":
                close_and_take_the_slot()
            else:
                assert call_in_thread(close_and_take_the_slot) is None
        return read

    assert gate.try_enter("XXX", 1, positions) is denied(DenyReason.MAX_CONCURRENT_POSITIONS)
    assert others[0].admitted
    assert _reserved_symbols(ledger) == ["DDD"]
    # The truth at the commit: three open and DDD reserved. XXX would be a fifth symbol.
    assert len(set(cache) | {"DDD", "XXX"}) == 5
    assert gate.try_enter("XXX", 1, cache) is denied(DenyReason.MAX_CONCURRENT_POSITIONS)
    # What this test rules out: the read taken at its word (XXX open, five symbols counted).
    unit = rules.unit_limits(gate.limits)
    five = 5 * SCALE
    figures = (5, True, five, SCALE, 2 * SCALE, five, five + SCALE, SCALE, 1, 0)
    window = (rules.NO_WINDOW, 0.0)
    assert rules.first_failing_rule(unit, rules.ACTIVE, *figures, *window) == rules.ADMIT


def test_adding_to_an_open_position_at_the_limit_is_admitted(gate: PortfolioGate) -> None:
    """The other side of the rule above: a read showing the symbol open and the open symbols
    within the limit admits an addition to it, reserved or not (nothing can take a slot the
    symbol holds by a reservation)."""
    gate.limits = limits(positions=2)
    assert gate.try_enter("AAA", 1, {"AAA": 1, "BBB": 1})
    assert gate.try_enter("BBB", 1, {"AAA": 1, "BBB": 1})  # AAA reserved now: still 2 symbols
    assert gate.try_enter("AAA", 1, {"AAA": 1, "BBB": 1, "CCC": 1})  # over, but AAA reserved


def test_a_callers_book_over_the_position_limit_denies_adding_to_an_open_one(
    gate: PortfolioGate,
) -> None:
    """With more symbols open than the limit (say the limit was lowered), a caller's read cannot
    tell an open symbol from one closed since the read, so an addition to it is denied (fail
    closed). The owned book, read under the lock, knows: there the addition is admitted."""
    gate.limits = limits(positions=2)
    over: Book = {"AAA": 1, "BBB": 1, "CCC": 1}
    assert gate.try_enter("AAA", 1, over) is denied(DenyReason.MAX_CONCURRENT_POSITIONS)
    for symbol, exposure in over.items():
        gate.set_position(symbol, exposure)
    assert gate.try_enter("AAA", 1)


def _reserved_symbols(ledger: PendingEntryLedger) -> list[str]:
    with ledger.lock() as pending:
        return list(pending)


def test_reads_that_always_go_stale_end_in_lock_timeout(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """A callable during whose every call a reservation ends makes every read stale: after
    ``MAX_READS`` reads the decision is denied with LOCK_TIMEOUT (fail closed), counted, and
    nothing is reserved."""
    held = [reservation_of(gate.try_enter(f"S{i}", 1)) for i in range(MAX_READS + 1)]
    calls: list[int] = []

    def positions() -> Book:
        calls.append(1)
        held[len(calls) - 1].release()
        return {}

    assert gate.try_enter("BBB", 1, positions) is denied(DenyReason.LOCK_TIMEOUT)
    assert len(calls) == MAX_READS
    stats = gate.stats()
    assert stats.denied[DenyReason.LOCK_TIMEOUT] == 1 and stats.decisions == MAX_READS + 2
    assert _reserved_symbols(ledger) == [f"S{MAX_READS}"]
    assert ledger.stats().outstanding == 1 and ledger.audit() == []


def test_the_last_allowed_read_may_still_commit(gate: PortfolioGate) -> None:
    """Reads go stale ``MAX_READS - 1`` times, then one stays fresh: the decision commits on it."""
    held = [reservation_of(gate.try_enter(f"S{i}", 1)) for i in range(MAX_READS - 1)]
    calls: list[int] = []

    def positions() -> Book:
        calls.append(1)
        if len(calls) < MAX_READS:
            held[len(calls) - 1].release()
        return {}

    assert gate.try_enter("BBB", 1, positions)
    assert len(calls) == MAX_READS
    assert gate.stats().denied[DenyReason.LOCK_TIMEOUT] == 0


# ---------------------------------------------------------------------------- lock timeout


@pytest.mark.parametrize("source", range(len(SOURCES)), ids=["own book", "mapping", "callable"])
@pytest.mark.parametrize("timeout", [0, 0.01], ids=repr)
def test_try_enter_times_out_while_another_thread_holds_the_lock(
    gate: PortfolioGate, ledger: PendingEntryLedger, source: int, timeout: float
) -> None:
    """With the lock held elsewhere, ``try_enter(timeout=...)`` is denied with LOCK_TIMEOUT: the
    shared denied decision, nothing reserved, counted in the gate's stats."""
    positions = SOURCES[source]
    gate.try_enter("AAA", 1)
    before = ledger.stats()
    with lock_held_elsewhere(ledger):
        decision = gate.try_enter("BBB", 1, positions, order_id="b-1", timeout=timeout)
        again = gate.try_enter("AAA", 1, positions, timeout=timeout)  # a top-up is no different
    assert decision is denied(DenyReason.LOCK_TIMEOUT) and again is decision
    assert decision.reason is DenyReason.LOCK_TIMEOUT and decision.reservation is None
    assert ledger.stats() == before
    assert _reserved_symbols(ledger) == ["AAA"] and ledger.audit() == []
    stats = gate.stats()
    assert (stats.admitted, stats.denied[DenyReason.LOCK_TIMEOUT], stats.decisions) == (1, 2, 3)
    assert gate.try_enter("BBB", 1, positions, order_id="b-1", timeout=timeout)  # the id is free


def test_try_enter_with_a_timeout_decides_when_the_lock_is_free(gate: PortfolioGate) -> None:
    """A timeout only matters when the lock is busy: with it free, ``timeout=0`` decides."""
    gate.limits = limits(positions=1)
    assert gate.try_enter("AAA", 1, timeout=0)
    assert gate.try_enter("BBB", 1, timeout=0).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("AAA", 1, {"AAA": 1}, timeout=5)
    assert gate.stats().denied[DenyReason.LOCK_TIMEOUT] == 0


# ---------------------------------------------------------------------------- limits


def test_limits_can_be_replaced(gate: PortfolioGate) -> None:
    """Assigning ``gate.limits`` takes effect for the next decision."""
    strict = limits(positions=1)
    gate.limits = strict
    assert gate.limits is strict
    assert gate.try_enter("AAA", 1, NO_POSITIONS)
    assert gate.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    gate.limits = limits(positions=2, gross=Decimal("1.5"))
    assert gate.try_enter("BBB", Decimal("0.5"), NO_POSITIONS)
    assert gate.try_enter("CCC", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    gate.limits = PortfolioLimits()
    assert gate.try_enter("CCC", 10**9, NO_POSITIONS)


def test_limits_are_frozen_and_default_to_no_limit() -> None:
    """PortfolioLimits is a frozen value; every limit defaults to None."""
    lim = PortfolioLimits()
    assert (lim.max_concurrent_positions, lim.max_gross_exposure, lim.max_symbol_exposure) == (
        None,
        None,
        None,
    )
    with pytest.raises(AttributeError):
        lim.max_gross_exposure = 5  # type: ignore[misc]
    assert PortfolioLimits(3, 100, 10) == PortfolioLimits(3, 100, 10)


def test_limits_given_as_decimal_or_fraction(gate: PortfolioGate) -> None:
    """Decimal and Fraction limits are exact to the unit (a Fraction limit rounds down)."""
    gate.limits = limits(gross=Decimal("100.10"), symbol=Fraction(201, 2))
    positions: Book = {"AAA": Decimal("50.05")}
    assert gate.try_enter("AAA", Decimal("50.05"), positions)  # exactly 100.10 gross
    assert gate.try_enter("BBB", Decimal("0.01"), positions).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )
    gate.limits = limits(symbol=Fraction(201, 2))
    assert gate.try_enter("AAA", Decimal("0.40"), positions)  # 100.5 == 201/2
    assert gate.try_enter("AAA", Fraction(1, 3), positions).reason is (
        DenyReason.MAX_SYMBOL_EXPOSURE
    )


def test_limits_setter_refuses_anything_but_portfolio_limits(gate: PortfolioGate) -> None:
    """Limits and ledger are type-checked; a refused assignment keeps the old limits."""
    before = gate.limits
    with pytest.raises(TypeError, match=r"limits.*\{'max_concurrent_positions': 1\}"):
        gate.limits = {"max_concurrent_positions": 1}
    assert gate.limits is before
    with pytest.raises(TypeError, match=r"limits.*None"):
        PortfolioGate(gate.ledger, None)
    with pytest.raises(TypeError, match="ledger"):
        PortfolioGate(object(), PortfolioLimits())


def test_gate_exposes_its_ledger(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    """``gate.ledger`` is the ledger it was built on."""
    assert gate.ledger is ledger


# ---------------------------------------------------------------------------- stats


def test_gate_stats_counts_admitted_and_denied_per_reason(gate: PortfolioGate) -> None:
    """Every decision is counted once: admitted, or denied under its reason."""
    stats = gate.stats()
    assert stats.admitted == 0
    assert set(stats.denied) == set(DenyReason)
    assert all(count == 0 for count in stats.denied.values())
    gate.limits = limits(positions=2, gross=100, symbol=60)
    assert gate.try_enter("AAA", 50, NO_POSITIONS)
    assert not gate.try_enter("AAA", 11, NO_POSITIONS)  # symbol
    assert gate.try_enter("BBB", 50, NO_POSITIONS)
    assert not gate.try_enter("CCC", 1, NO_POSITIONS)  # positions
    assert not gate.try_enter("CCC", 1, NO_POSITIONS)  # positions
    assert not gate.try_enter("AAA", 1, NO_POSITIONS)  # gross
    gate.halt()
    assert not gate.try_enter("AAA", 1, NO_POSITIONS)  # halted
    stats = gate.stats()
    assert stats.admitted == 2
    assert dict(stats.denied) == {
        DenyReason.HALTED: 1,
        DenyReason.REDUCING_ONLY: 0,
        DenyReason.MAX_CONCURRENT_POSITIONS: 2,
        DenyReason.MAX_GROSS_EXPOSURE: 1,
        DenyReason.MAX_SYMBOL_EXPOSURE: 1,
        DenyReason.MAX_NET_EXPOSURE: 0,
        DenyReason.MAX_ORDER_NOTIONAL: 0,
        DenyReason.MAX_OPEN_ORDERS: 0,
        DenyReason.MAX_OPEN_ORDERS_PER_SYMBOL: 0,
        DenyReason.MAX_ORDERS_PER_INTERVAL: 0,
        DenyReason.BACKEND_UNAVAILABLE: 0,
        DenyReason.BOOK_NOT_RESTORED: 0,
        DenyReason.LOCK_TIMEOUT: 0,
    }
    assert stats.decisions == 7


def test_gate_stats_is_a_snapshot(gate: PortfolioGate) -> None:
    """Stats do not move after they are taken, and cannot be changed by the caller."""
    stats = gate.stats()
    gate.try_enter("AAA", 1, NO_POSITIONS)
    assert stats.admitted == 0
    with pytest.raises(TypeError):
        stats.denied[DenyReason.HALTED] = 5  # type: ignore[index]


@pytest.mark.parametrize("source", range(len(SOURCES)), ids=["own book", "mapping", "callable"])
def test_duplicate_order_id_is_refused_and_not_counted(
    gate: PortfolioGate, ledger: PendingEntryLedger, unchanged: Unchanged, source: int
) -> None:
    """An outstanding order id is a ValueError, changes nothing and is free again once it ends."""
    positions = SOURCES[source]
    first = gate.try_enter("AAA", 100, positions, order_id="o-1").reservation
    with unchanged(ledger, gate), pytest.raises(ValueError, match="order_id 'o-1'"):
        gate.try_enter("BBB", 1, positions, order_id="o-1")
    assert first is not None
    assert ledger.release_order("o-1")
    again = gate.try_enter("BBB", 1, positions, order_id="o-1").reservation
    assert again is not None and again.order_id == "o-1" and again is not first


# ---------------------------------------------------------------------------- re-entrancy

GATE_CALLS: dict[str, Callable[[PortfolioGate], object]] = {
    "try_enter": lambda gate: gate.try_enter("BBB", 1),
    "try_enter(positions)": lambda gate: gate.try_enter("BBB", 1, NO_POSITIONS),
    "halt": PortfolioGate.halt,
    "resume": PortfolioGate.resume,
    "set_position": lambda gate: gate.set_position("BBB", 1),
    "close_position": lambda gate: gate.close_position("AAA"),
    "confirm_fill": lambda gate: gate.confirm_fill("a-1", 1),
    "positions": PortfolioGate.positions,
}


@pytest.mark.parametrize("call", list(GATE_CALLS))
def test_gate_calls_inside_this_threads_block_raise_and_change_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, call: str
) -> None:
    """Gate methods that take the ledger lock raise ReentrantLockError at once inside this
    thread's own ``lock()`` block (instead of deadlocking), and change nothing."""
    gate.try_enter("AAA", 1, NO_POSITIONS, order_id="a-1")
    gate.set_position("AAA", 2)
    before = gate.stats(), gate.positions(), gate.halted
    with ledger.lock() as pending:
        with pytest.raises(ReentrantLockError):
            GATE_CALLS[call](gate)
        assert list(pending) == ["AAA"] and len(pending) == 1
    assert (gate.stats(), gate.positions(), gate.halted) == before
    assert ledger.stats().outstanding == 1


@pytest.mark.timeout(10)
def test_gate_stats_inside_a_block_does_not_deadlock(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """Re-entry either works or raises ReentrantLockError; gate.stats() works, read in place."""
    gate.try_enter("AAA", 1, NO_POSITIONS)
    seen: list[GateStats] = []

    def stats_in_block() -> None:
        with ledger.lock(), suppress(ReentrantLockError):
            seen.append(gate.stats())

    assert call_in_thread(stats_in_block) is None
    assert all(stats.admitted == 1 for stats in seen)
    with ledger.lock(timeout=0):
        pass


def _enter_and_leave(ledger: PendingEntryLedger) -> None:
    with ledger.lock(timeout=0):
        pass


def _halt_and_resume(gate: PortfolioGate) -> None:
    gate.halt()
    gate.resume()


CallbackUse = Callable[[PendingEntryLedger, PortfolioGate, ReservationHandle], object]

CALLBACK_USES: dict[str, CallbackUse] = {
    "ledger.stats": lambda ledger, gate, res: ledger.stats(),
    "ledger.lock": lambda ledger, gate, res: _enter_and_leave(ledger),
    "ledger.release": lambda ledger, gate, res: ledger.release("NONE"),
    "ledger.release_order": lambda ledger, gate, res: ledger.release_order("none"),
    "reservation.notional": lambda ledger, gate, res: res.notional,
    "reservation.release": lambda ledger, gate, res: res.release(),
    "reservation.reduce": lambda ledger, gate, res: res.reduce(1),
    "gate.try_enter": lambda ledger, gate, res: gate.try_enter("IN", 1, {}),
    "gate.stats": lambda ledger, gate, res: gate.stats(),
    "gate.positions": lambda ledger, gate, res: gate.positions(),
    "gate.set_position": lambda ledger, gate, res: gate.set_position("P", 1),
    "gate.close_position": lambda ledger, gate, res: gate.close_position("P"),
    "gate.confirm_fill": lambda ledger, gate, res: gate.confirm_fill(res.order_id, 5),
    "gate.release_order": lambda ledger, gate, res: gate.release_order(res.order_id),
    "gate.halt+resume": lambda ledger, gate, res: _halt_and_resume(gate),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("expiry_due", [False, True], ids=["nothing-due", "expiry-due"])
@pytest.mark.parametrize("use", list(CALLBACK_USES))
def test_ledger_calls_from_a_positions_callable_work(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    clock: ManualClock,
    use: str,
    expiry_due: bool,
) -> None:
    """The callable runs outside the lock, so it may call the gate and the ledger: every call
    works (none is refused as re-entrant, none hangs), the decision is made, the books agree."""
    if expiry_due:
        gate.try_enter("OLD", 1, NO_POSITIONS)
        clock.advance(ledger.ttl - 1)
    held = gate.try_enter("HELD", 5, NO_POSITIONS).reservation
    assert held is not None
    if expiry_due:
        clock.advance(1)  # OLD is due now, HELD is not
    outcomes: list[str] = []

    def positions() -> Book:
        try:
            CALLBACK_USES[use](ledger, gate, held)
            outcomes.append("worked")
        except ReentrantLockError:
            outcomes.append("reentrant")
        return {}

    decisions: list[Decision] = []
    assert call_in_thread(lambda: decisions.append(gate.try_enter("AAA", 1, positions))) is None
    assert outcomes and set(outcomes) == {"worked"}
    assert len(decisions) == 1 and decisions[0]
    assert ledger.audit() == []
    with ledger.lock(timeout=0) as pending:
        assert "AAA" in pending


# ---------------------------------------------------------------------------- a reference model


def model_units(value: Number, up: bool) -> int:
    """``value`` in units of 1e-9, the obvious way: a float as the decimal it prints as, rounded
    away from zero (what counts against a limit, ``up``) or down (a limit)."""
    exact = Fraction(Decimal(repr(value))) if isinstance(value, float) else Fraction(value)
    scaled = exact * SCALE
    if not up:
        return math.floor(scaled)
    return math.ceil(scaled) if scaled >= 0 else math.floor(scaled)


def model_limits(lim: PortfolioLimits) -> tuple[int, int, int, int]:
    """The limits in units, ``rules.NO_LIMIT`` where none is set."""

    def amount(value: Number | None) -> int:
        return rules.NO_LIMIT if value is None else model_units(value, False)

    count = lim.max_concurrent_positions
    return (
        rules.NO_LIMIT if count is None else count,
        amount(lim.max_gross_exposure),
        amount(lim.max_symbol_exposure),
        amount(lim.max_order_notional),
    )


class Model:
    """The contract written as naively as possible: a dict of order id -> (symbol, units,
    stamp), each order's side, its own trading state and limits, and counts per outcome. It
    decides by calling ``rules.first_failing_rule`` (the one copy of the rules) on figures
    summed afresh from that state."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.orders: dict[str, tuple[str, int, float]] = {}
        self.sides: dict[str, int] = {}  # order id -> rules side code (kept after it ends)
        self.limits = PortfolioLimits()
        self.state = rules.ACTIVE
        self.reserved = self.released = self.expired = 0
        self.counts = [0] * (rules.LOCK_TIMEOUT + 1)
        self.admitted_at: list[float] = []  # the gate's admissions' stamps, oldest first

    def window_start(self) -> float:
        """The stamp of the ``rate_count``-th most recent admission (``NO_WINDOW``: fewer, or
        no rate limit): what the gate keeps of its history, the last ``rate_count`` stamps."""
        rate = self.limits.max_orders_per_interval
        if rate is None or len(self.admitted_at) < rate[0]:
            return rules.NO_WINDOW
        return self.admitted_at[-rate[0]]

    def expire(self, now: float) -> None:
        for oid, (_, _, at) in list(self.orders.items()):
            if now >= at + self.ttl:
                del self.orders[oid]
                self.expired += 1

    def reserved_symbols(self) -> set[str]:
        return {s for s, _, _ in self.orders.values()}

    def gross(self) -> int:
        return sum(n for _, n, _ in self.orders.values())

    def symbol_gross(self, symbol: str) -> int:
        return sum(n for s, n, _ in self.orders.values() if s == symbol)

    def pending(self, symbol: str | None, side: int) -> int:
        """Units pending on ``symbol`` (None: on every symbol) with ``side``."""
        return sum(
            n
            for oid, (s, n, _) in self.orders.items()
            if (symbol is None or s == symbol) and self.sides.get(oid, 0) == side
        )

    def worst(self, position: int, symbol: str | None, add: tuple[int, int, int]) -> int:
        """The worst case of ``symbol`` (None: the book's net) with ``add`` more (buys, sells,
        unknown) pending."""
        buys, sells, unknown = (
            self.pending(symbol, code) + more
            for code, more in ((rules.BUY, add[0]), (rules.SELL, add[1]), (0, add[2]))
        )
        return rules.worst_case(position, buys, sells, unknown)

    def decide(
        self,
        symbol: str,
        notional: Number,
        positions: Mapping[str, Number],
        *,
        owned: bool,
        side: int = 0,
        now: float,
    ) -> int:
        """``owned``: ``positions`` is the gate's own book, read under the lock. A caller's read
        cannot vouch that a symbol in it is still open, so there only a reservation does."""
        signed = {s: model_units(v, True) for s, v in positions.items()}
        exposures = {s: abs(v) for s, v in signed.items()}
        reserved = self.reserved_symbols()
        unit_limits = rules.unit_limits(self.limits)
        got = (unit_limits.max_positions, unit_limits.max_gross, unit_limits.max_symbol)
        assert (*got, unit_limits.max_order) == model_limits(self.limits)
        # With a side the read is taken as it is (sides rest on a cache that changes only by
        # fills handed over in one step); without, only a reservation vouches for a symbol.
        vouched = (set(exposures) if owned or side else set()) | reserved
        others = (set(exposures) | reserved) - ({symbol} - vouched)
        units = model_units(notional, True)
        add = (units if side == rules.BUY else 0, units if side == rules.SELL else 0)
        add3 = (*add, units if side == 0 else 0)
        none = (0, 0, 0)
        net = sum(signed.values())
        code = rules.first_failing_rule(
            unit_limits,
            self.state,
            len(others),
            symbol in vouched,
            sum(self.worst(signed.get(s, 0), s, none) for s in set(signed) | reserved),
            self.worst(signed.get(symbol, 0), symbol, none),
            self.worst(signed.get(symbol, 0), symbol, add3),
            self.worst(net, None, none),
            self.worst(net, None, add3),
            units,
            len(self.orders),
            sum(1 for s, _, _ in self.orders.values() if s == symbol),
            self.window_start(),
            now,
        )
        self.counts[code] += 1
        if code == rules.ADMIT:
            self.admitted_at.append(now)
        return code


def random_amount(rng: random.Random) -> Number:
    """A positive amount of a random kind, sometimes finer than a unit."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randint(1, 500)
    if kind == 1:
        return rng.uniform(0.01, 500.0)
    if kind == 2:
        return round(rng.uniform(0.01, 500.0), rng.randrange(10)) or 0.5
    if kind == 3:
        return Decimal(rng.randint(1, 50000)) / 100
    return Fraction(rng.randint(1, 5000), rng.randint(1, 12))


def same_value(got: Number, units: int) -> bool:
    """``got`` is ``units`` read back: exactly, or its correctly rounded float."""
    exact = Fraction(units, SCALE)
    if isinstance(got, float):
        return got == float(exact)
    return Fraction(got) == exact


@pytest.mark.parametrize("seed", range(12))
def test_gate_and_ledger_match_the_reference_model(seed: int) -> None:
    """Random operations on a gate and its ledger (decisions on the own book, a mapping, a
    callable, one that ends a reservation as it is read; lock() blocks that commit or roll
    back; releases, partial fills, fills, positions, limits with the order caps, halts, time)
    against ``Model``: every decision, count, total and state must agree after every step."""
    rng = random.Random(seed)
    clock = ManualClock()
    expired_seen: list[Reservation] = []
    ledger = PendingEntryLedger(20, clock=clock, on_expire=expired_seen.append)
    # One rate limit per seed, in force from the start: the gate keeps only the last count's
    # stamps, so a count raised later would count a history the model does not keep.
    rates: list[tuple[int, Number] | None] = [None, (3, 2), (5, Fraction(21, 2)), (1, 0.5)]
    rate = rates[seed % 4]
    gate = PortfolioGate(ledger, PortfolioLimits(max_orders_per_interval=rate))
    model = Model(20)
    model.limits = gate.limits
    symbols = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
    made: dict[str, Reservation] = {}
    initial: dict[str, Number] = {}  # as given, for the reservations never reduced
    owned_book: dict[str, Number] = {}

    for step in range(400):
        op = rng.random()
        model.expire(clock())
        if op < 0.05:
            model.limits = gate.limits = PortfolioLimits(
                max_concurrent_positions=rng.choice([None, 0, 1, 2, 3, 5]),
                max_gross_exposure=rng.choice([None, 300, 1000.5, Decimal("2500.25")]),
                max_symbol_exposure=rng.choice([None, Fraction(1201, 3), 800]),
                max_net_exposure=rng.choice([None, 200, Decimal("900.5")]),
                max_order_notional=rng.choice([None, None, 250, Decimal("400.5")]),
                max_open_orders=rng.choice([None, None, 3, 8]),
                max_open_orders_per_symbol=rng.choice([None, None, 1, 2]),
                max_orders_per_interval=rate,
            )
        elif op < 0.08:
            model.state = rng.choice(
                [rules.ACTIVE, rules.ACTIVE, rules.REDUCING, rules.HALTED_STATE]
            )
            {rules.ACTIVE: gate.resume, rules.REDUCING: gate.reduce_only}.get(
                model.state, gate.halt
            )()
        elif op < 0.45:
            symbol = rng.choice(symbols)
            notional = random_amount(rng)
            order_id = f"g{step}" if rng.random() < 0.7 else None  # None: the ledger names it
            side = rng.choice([None, None, Side.BUY, Side.SELL, "buy", "sell"])
            code = {None: 0, "buy": rules.BUY, "sell": rules.SELL}[side]
            how = rng.randrange(4)
            if how == 0:  # the gate's own position book
                expected = model.decide(
                    symbol, notional, owned_book, owned=True, side=code, now=clock()
                )
                decision = gate.try_enter(symbol, notional, order_id=order_id, side=side)
            else:  # positions passed in: a mapping, a callable, one that ends a reservation
                positions: Book = {
                    s: rng.choice([random_amount(rng), -random_amount(rng), 0])
                    for s in rng.sample(symbols, rng.randrange(4))
                }
                victim = rng.choice(sorted(made)) if made and how == 3 else None
                ends = victim is not None and victim in model.orders
                if victim is not None and ends:
                    del model.orders[victim]  # it ends before the read that decides
                    model.released += 1
                expected = model.decide(
                    symbol, notional, positions, owned=False, side=code, now=clock()
                )
                calls: list[int] = []

                def source(
                    victim: str | None = victim,
                    positions: Book = positions,
                    calls: list[int] = calls,
                ) -> Book:
                    calls.append(1)
                    if victim is not None and len(calls) == 1:
                        made[victim].release()  # allowed: the callable runs outside the lock
                    return positions

                given: Positions = positions if how == 1 else source
                decision = gate.try_enter(symbol, notional, given, order_id=order_id, side=side)
                if how > 1:  # read once, or again when the first read went stale (unless
                    # halted: a halted gate denies whatever it read)
                    halted = model.state == rules.HALTED_STATE
                    assert len(calls) == (2 if ends and not halted else 1), step
            assert decision.reason is REASONS[expected], (step, symbol, notional, gate.limits)
            if decision:
                res = reservation_of(decision)
                made[res.order_id] = res
                initial[res.order_id] = notional
                model.orders[res.order_id] = (symbol, model_units(notional, True), clock())
                model.sides[res.order_id] = code
                assert res.side is (None if side is None else Side(side))
                model.reserved += 1
            else:
                assert decision is DENIED[expected - 1]
        elif op < 0.55:
            # a lock() block that reserves, releases and reduces; sometimes it raises
            rollback = rng.random() < 0.4
            trial = dict(model.orders)
            trial_reserved = trial_released = 0
            new: list[Reservation] = []
            given_amounts: dict[str, Number] = {}
            try:
                with ledger.lock() as pending:
                    for j in range(rng.randint(1, 4)):
                        symbol, amount = rng.choice(symbols), random_amount(rng)
                        oid = f"b{step}.{j}"
                        block_side = rng.choice([None, Side.BUY, Side.SELL])
                        new.append(pending.reserve(symbol, amount, order_id=oid, side=block_side))
                        model.sides[oid] = {None: 0, Side.BUY: rules.BUY, Side.SELL: rules.SELL}[
                            block_side
                        ]
                        given_amounts[oid] = amount
                        trial[oid] = (symbol, model_units(amount, True), clock())
                        trial_reserved += 1
                    if trial and rng.random() < 0.5:
                        oid = rng.choice(sorted(trial))
                        assert pending.release_order(oid)
                        del trial[oid]
                        trial_released += 1
                    if rollback:
                        raise RuntimeError("roll back")
            except RuntimeError:
                for res in new:
                    assert res.state is ReservationState.ROLLED_BACK
            else:
                for res in new:
                    made[res.order_id] = res
                initial.update(given_amounts)
                model.orders = trial
                model.reserved += trial_reserved
                model.released += trial_released
        elif op < 0.65 and made:
            oid = rng.choice(sorted(made))
            was_live = oid in model.orders
            assert made[oid].release() is was_live
            if was_live:
                del model.orders[oid]
                model.released += 1
        elif op < 0.72 and made:
            oid = rng.choice(sorted(made))
            amount = random_amount(rng)
            was_live = oid in model.orders
            assert made[oid].reduce(amount) is was_live
            if was_live:
                symbol, left, at = model.orders[oid]
                initial.pop(oid, None)
                if model_units(amount, True) >= left:
                    del model.orders[oid]
                    model.released += 1
                    assert made[oid].state is ReservationState.FILLED
                else:  # a partial fill rounds down (_units.after_fill)
                    left -= model_units(amount, False)
                    model.orders[oid] = (symbol, left, at)
                    assert same_value(made[oid].notional, left)
        elif op < 0.78:
            symbol = rng.choice(symbols)
            gone = [oid for oid, (s, _, _) in model.orders.items() if s == symbol]
            assert ledger.release(symbol) is bool(gone)
            for oid in gone:
                del model.orders[oid]
            model.released += len(gone)
        elif op < 0.82 and made:
            oid = rng.choice(sorted(made))
            was_live = oid in model.orders
            assert ledger.release_order(oid) is was_live
            if was_live:
                del model.orders[oid]
                model.released += 1
        elif op < 0.86:
            symbol, exposure = rng.choice(symbols), rng.choice([random_amount(rng), 0])
            exposure = -exposure if rng.random() < 0.3 else exposure
            gate.set_position(symbol, exposure)
            owned_book[symbol] = exposure
        elif op < 0.89:
            symbol = rng.choice(symbols)
            assert gate.close_position(symbol) is (owned_book.pop(symbol, None) is not None)
        elif op < 0.93 and made:
            oid = rng.choice(sorted(made))
            exposure = random_amount(rng)
            was_live = oid in model.orders
            own_symbol = made[oid].symbol
            named = rng.choice([None, own_symbol, own_symbol, "AAA"])
            if was_live and named is not None and named != own_symbol:
                with pytest.raises(ValueError, match="order_id"):
                    gate.confirm_fill(oid, exposure, symbol=named)
            else:
                assert gate.confirm_fill(oid, exposure, symbol=named) is was_live
                if was_live:
                    del model.orders[oid]
                    model.released += 1
                    owned_book[own_symbol] = exposure
                    assert made[oid].state is ReservationState.FILLED
                elif named is not None:
                    owned_book[named] = exposure
        else:
            clock.advance(rng.choice([0, 0.5, 1, 3, 7]))

        # compare everything observable
        model.expire(clock())
        with ledger.lock() as pending:
            assert len(pending) == len(model.orders), step
            assert same_value(pending.gross_notional(), model.gross()), step
            reserved_symbols = model.reserved_symbols()
            assert set(pending) == reserved_symbols
            for symbol in symbols:
                assert (symbol in pending) is (symbol in reserved_symbols)
                assert same_value(pending.symbol_notional(symbol), model.symbol_gross(symbol))
            assert pending.new_slots(lambda s: s in ("AAA", "BBB")) == len(
                reserved_symbols - {"AAA", "BBB"}
            )
        stats = ledger.stats()
        assert (stats.outstanding, stats.reserved, stats.released, stats.expired) == (
            len(model.orders),
            model.reserved,
            model.released,
            model.expired,
        ), step
        assert len(expired_seen) == model.expired
        assert gate.positions() == owned_book
        assert ledger.audit() == [], step
        for oid, res in made.items():
            assert res.active is (oid in model.orders)
            if oid in model.orders and oid in initial:  # never reduced: read back as given
                assert type(res.notional) is type(initial[oid])
                assert res.notional == initial[oid]

    gate_stats = gate.stats()
    assert gate_stats.admitted == model.counts[rules.ADMIT]
    assert dict(gate_stats.denied) == {
        reason: model.counts[code] for code, reason in enumerate(REASONS) if reason is not None
    }
    # release everything: the gross is exactly zero again
    for res in made.values():
        res.release()
    stats = ledger.stats()
    assert stats.outstanding == 0
    assert stats.gross_notional == 0
    assert stats.reserved == stats.released + stats.expired


# ---------------------------------------------------------------------------- typing of the API
# What a user writes with plain ``str`` symbols and order ids must pass ``mypy --strict``
# without casts.

TYPING_PRELUDE = """
import enum
from decimal import Decimal
from pendingledger import (
    Admitted, Decision, DenyReason, PendingEntryLedger, PortfolioGate, PortfolioLimits,
    Reservation, ReservationHandle,
)
ledger = PendingEntryLedger(30)
gate = PortfolioGate(ledger, PortfolioLimits(max_concurrent_positions=3))
positions: dict[str, float] = {"BTCUSDT": 1500.0}
"""

TYPING_OK = """
def on_expire(res: Reservation) -> None: ...
other = PendingEntryLedger(30, on_expire=on_expire)
decision: Decision = gate.try_enter("ETHUSDT", Decimal("250"), {"BTCUSDT": 1500.0})
with ledger.lock() as pending:
    n: int = pending.new_slots(lambda s: s in positions)
    res: Reservation = pending.reserve("ETHUSDT", 250.0, order_id="c-1")
"""

TYPING_CASES = {
    "baseline": TYPING_OK,
    "positions-dict-str-float": 'gate.try_enter("ETHUSDT", 250.0, positions)\n',
    "positions-callable": (
        "def read() -> dict[str, float]:\n    return positions\n"
        'gate.try_enter("ETHUSDT", 250.0, read)\n'
    ),
    "positions-lambda": 'gate.try_enter("ETHUSDT", 250.0, lambda: {"BTCUSDT": 1500.0})\n',
    "new_slots-str-predicate": (
        "def is_open(symbol: str) -> bool:\n    return symbol in positions\n"
        "with ledger.lock() as pending:\n    pending.new_slots(is_open)\n"
    ),
    "order-id-is-str": (
        'held = gate.try_enter("ETHUSDT", 1, timeout=0.5).reservation\n'
        "if held is not None:\n"
        "    oid: str = held.order_id\n"
        "    gate.confirm_fill(oid, 1.0, symbol=held.symbol)\n"
        "    ledger.release_order(oid)\n"
    ),
    "narrows-on-admitted": (
        'decided = gate.try_enter("ETHUSDT", 1)\n'
        "if decided.admitted:\n"
        "    admitted_id: str = decided.reservation.order_id\n"
        "else:\n"
        "    why: DenyReason = decided.reason\n"
        "    whose: str | None = decided.scope\n"
    ),
    "narrows-on-truth": (
        'entered = gate.try_enter("ETHUSDT", 1)\nif entered:\n    entered.reservation.release()\n'
    ),
    "narrows-on-isinstance": (
        'made = gate.try_enter("ETHUSDT", 1)\n'
        "if isinstance(made, Admitted):\n    handle: ReservationHandle = made.reservation\n"
    ),
    "str-enum-symbols": (
        "class Venue(enum.StrEnum):\n    BTC = 'BTCUSDT'\n"
        "gate.try_enter(Venue.BTC, 1, {Venue.BTC: 2.0}, order_id=Venue.BTC)\n"
        "gate.set_position(Venue.BTC, 1)\n"
    ),
}

TYPING_ERRORS = {
    "reservation-before-narrowing": (
        'gate.try_enter("ETHUSDT", 1).reservation.release()\n',
        'Item "None" of "ReservationHandle | None" has no attribute "release"',
    ),
    "reason-before-narrowing": (
        'reason: DenyReason = gate.try_enter("ETHUSDT", 1).reason\n',
        "Incompatible types in assignment",
    ),
}


@pytest.fixture(scope="module")
def mypy_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return typecheck.mypy_args(tmp_path_factory.mktemp("mypy"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(TYPING_CASES))
def test_public_api_typing_with_str_symbols(
    case: str, mypy_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """User-style code with str symbols and ids passes ``mypy --strict`` with no casts."""
    status, output = typecheck.run_mypy(TYPING_PRELUDE + TYPING_CASES[case], mypy_args, monkeypatch)
    assert status == 0, output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(TYPING_ERRORS))
def test_public_api_typing_refuses_an_unnarrowed_decision(
    case: str, mypy_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the narrowing is for: a decision not yet known to be admitted has no reservation
    to a type checker, and a denied one's reason is not optional only once it is known."""
    program, expected = TYPING_ERRORS[case]
    status, output = typecheck.run_mypy(TYPING_PRELUDE + program, mypy_args, monkeypatch)
    assert status == 1 and expected in output, output


def test_a_symbol_sided_after_the_read_began_is_read_again() -> None:
    """A caller's positions are turned into units before the lock only for the symbols that had
    pending buys or sells then. A symbol that gains one meanwhile (here: in the callable itself)
    makes the decision read again, so its worst case is taken with its real position: the
    reducing sell on AAA adds nothing to gross, and BBB fits. Taking AAA's position as 0
    instead would count the sell in full (14,000) and deny."""
    gate = PortfolioGate(PendingEntryLedger(60, clock=ManualClock()), limits(gross=11_000))
    cache = {"AAA": 10_000}
    calls: list[int] = []

    def positions() -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:  # another order, decided while this one reads
            assert gate.try_enter("AAA", 4_000, cache, side=Side.SELL)
        return cache

    assert gate.try_enter("BBB", 1_000, positions)
    assert len(calls) == 2
    assert gate.try_enter("BBB", 1, cache).reason is DenyReason.MAX_GROSS_EXPOSURE


def test_a_loss_recorded_while_the_wall_clock_fails_still_latches() -> None:
    """Fail closed: the amount counts and may latch; the clock's error is raised after."""
    readings: list[float] = []

    def wall() -> float:
        if not readings:
            raise OSError("no time")
        return readings[-1]

    gate = PortfolioGate(
        PendingEntryLedger(60, clock=ManualClock()),
        PortfolioLimits(max_daily_loss=100),
        wall_clock=wall,
    )
    with pytest.raises(OSError, match="no time"):
        gate.record_pnl(-100)
    with pytest.raises(OSError, match="no time"):
        gate.try_enter("AAA", 1)  # latched, and no time to see whether a new day began
    readings.append(1_000.0)
    latch = gate.latch
    assert latch is not None and latch.at == -math.inf and latch.until == math.inf
    assert gate.try_enter("AAA", 1).reason is DenyReason.REDUCING_ONLY
    gate.resume()
    assert gate.try_enter("AAA", 1)


def test_the_state_and_stats_read_inside_a_lock_block() -> None:
    """As ``halted`` always could: no re-entry error, and no wall clock read under the lock."""

    def wall() -> float:
        assert not ledger.core.locked(), "the wall clock ran under the ledger lock"
        return 0.0

    ledger = PendingEntryLedger(60, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits(max_daily_loss=1), wall_clock=wall)
    gate.record_pnl(-1)
    with ledger.lock():
        assert gate.state is TradingState.REDUCING and not gate.halted
        assert gate.latch is not None
        assert gate.stats().state is TradingState.REDUCING


class FailingWallClock(ManualWallClock):
    """A wall clock that raises while ``broken``."""

    broken = False

    def __call__(self) -> float:
        if self.broken:
            raise OSError("no time")
        return super().__call__()


def test_a_loss_of_unknown_day_is_not_forgotten_at_the_next_reset() -> None:
    """The day ended and nothing has read the clock since; the loss recorded while the clock
    fails may be the new day's, so the reset that comes next keeps it (and its latch)."""
    wall = FailingWallClock()
    gate = PortfolioGate(
        PendingEntryLedger(60, clock=ManualClock()),
        PortfolioLimits(max_daily_loss=100),
        wall_clock=wall,
    )
    gate.record_pnl(-1)
    wall.advance(86_400 + 5)
    wall.broken = True
    with pytest.raises(OSError):
        gate.record_pnl(-150)
    wall.broken = False
    latch = gate.latch  # read with a working clock: the old day rolls over here
    assert latch is not None and latch.until == math.inf
    assert gate.state is TradingState.REDUCING
    gate.resume()
    gate.record_pnl(-99)
    assert gate.latch is None  # resume started afresh: the carried loss went with it


def test_a_latch_fired_with_no_wall_time_holds_through_resets_until_resume() -> None:
    wall = FailingWallClock()
    gate = PortfolioGate(
        PendingEntryLedger(60, clock=ManualClock()),
        PortfolioLimits(max_daily_loss=100),
        wall_clock=wall,
    )
    wall.broken = True
    with pytest.raises(OSError):
        gate.record_pnl(-100)
    wall.broken = False
    gate.record_pnl(1)
    wall.advance(3 * 86_400)
    gate.record_pnl(1)  # days have passed
    latch = gate.latch
    assert latch is not None and latch.at == -math.inf and latch.until == math.inf
    gate.resume()
    assert gate.latch is None and gate.state is TradingState.ACTIVE


def test_a_sided_reducing_order_on_a_callers_positions_needs_no_slot() -> None:
    """Found by review: with a caller's positions a reducing sell was denied REDUCING_ONLY (and
    MAX_CONCURRENT_POSITIONS when the slots were full) because only a reservation vouched for
    the symbol being open. With a side the read is taken as it is."""
    gate = PortfolioGate(PendingEntryLedger(60, clock=ManualClock()), limits(positions=1))
    cache = {"AAA": 10_000, "BBB": -500}  # more open than the limit: it was lowered
    gate.reduce_only()
    assert gate.try_enter("AAA", 4_000, cache, side=Side.SELL)
    assert gate.try_enter("CCC", 1, cache, side=Side.SELL).reason is DenyReason.REDUCING_ONLY
    gate.resume()
    assert gate.try_enter("AAA", 4_000, cache, side=Side.SELL)
    # Without a side only a reservation vouches: AAA is reserved now, BBB is not.
    assert gate.try_enter("AAA", 1, cache)
    assert gate.try_enter("BBB", 1, cache).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_worst_cases_is_worst_case_before_and_after_the_order() -> None:
    """The pair the decision uses, against the one definition, exhaustively on small figures."""
    for position, buys, sells, unknown, side, units in itertools.product(
        range(-4, 5), range(3), range(3), range(3), (0, rules.BUY, rules.SELL), (1, 2, 5)
    ):
        added = [units if side == code else 0 for code in (rules.BUY, rules.SELL, 0)]
        after = rules.worst_case(position, buys + added[0], sells + added[1], unknown + added[2])
        assert rules.worst_cases(position, buys, sells, unknown, side, units) == (
            rules.worst_case(position, buys, sells, unknown),
            after,
        )
