"""Fills by order id: ``PortfolioGate.reduce_order`` and ``confirm_fill(..., filled=)``.

A fill router often keeps order ids, not ``Reservation`` objects: ``reduce_order`` is
``Reservation.reduce`` by id, and ``confirm_fill(filled=)`` books the position and the partial
fill in one critical section, so no decision (and no ``audit()``) sees one without the other.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from test_gate import call_in_thread
from test_lock_discipline import Name, Witness, make_setup, real, traced

import pendingledger
from pendingledger import (
    Gate,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    ReentrantLockError,
    Reservation,
    ReservationState,
)
from pendingledger.testing import ManualClock

pytestmark = pytest.mark.timeout(30)

Number = int | float | Decimal | Fraction
Unchanged = Callable[..., AbstractContextManager[None]]
TTL = 10.0


class Boom(Exception):
    """Raised by tests to make a lock() block fail."""


def admit(gate: PortfolioGate, symbol: str, notional: Number, order_id: str | None) -> Reservation:
    """An admitted entry's in-process reservation."""
    res = gate.try_enter(symbol, notional, order_id=order_id).reservation
    assert isinstance(res, Reservation)
    return res


def raises(
    exc: type[Exception], name: str, value: object
) -> AbstractContextManager[pytest.ExceptionInfo[Exception]]:
    """``pytest.raises`` that also wants the argument's name and the value's repr."""
    return pytest.raises(exc, match=rf"{re.escape(name)}.*{re.escape(repr(value))}")


def view(ledger: PendingEntryLedger, res: Reservation) -> object:
    """What the ledger and the reservation show, types of the sums included."""
    stats = ledger.stats()
    with ledger.lock(timeout=0) as pending:
        symbol = pending.symbol_notional("AAA")
    return (
        res.state,
        res.notional,
        type(res.notional),
        stats,
        type(stats.gross_notional),
        symbol,
        type(symbol),
    )


@pytest.fixture
def book(gate: PortfolioGate) -> Reservation:
    """Some state to leave untouched: two reservations on AAA (``o`` is returned), one on BBB,
    an open position, a denied decision counted."""
    gate.limits = PortfolioLimits(max_gross_exposure=10_000)
    res = admit(gate, "AAA", 100, "o")
    admit(gate, "AAA", 7, "keep")
    admit(gate, "BBB", Decimal("2.5"), "b")
    gate.set_position("OPEN", -3)
    assert not gate.try_enter("CCC", 20_000)
    return res


# ---------------------------------------------------------------------------- reduce_order

# What stays of the notional after the fill (what a person expects, not the unit arithmetic):
# a fill of a third of one unit-less amount takes exactly a third off, rounded down to a unit.
FILLS: list[tuple[Number, Number]] = [
    (100, 30),
    (100, 0.1),
    (100, Decimal("99.999999999")),
    (100, Fraction(1, 3)),
    (100, 1e-12),  # less than a unit: takes nothing off
    (Fraction(1, 3), Fraction(1, 3)),  # rounds differently each way, yet fills it whole
    (100, 100),
    (100, 250),
]


def twin(
    notional: Number, fill: Callable[[PortfolioGate, Reservation], bool]
) -> tuple[bool, object, dict[str, Number]]:
    """A fresh gate with ``notional`` reserved on AAA (beside another reservation there), the
    fill applied by ``fill``; what it returned, and what the ledger shows after."""
    ledger = PendingEntryLedger(TTL, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits())
    res = admit(gate, "AAA", notional, "o")
    admit(gate, "AAA", 5, "other")
    done = fill(gate, res)
    assert ledger.audit() == []
    return done, view(ledger, res), gate.positions()


@pytest.mark.parametrize(("notional", "amount"), FILLS, ids=repr)
def test_reduce_order_is_reservation_reduce_by_id(notional: Number, amount: Number) -> None:
    """Same answer, same units left, same kind of sums read back, same end (FILLED at zero)
    as ``Reservation.reduce``: one rounding rule (``_units.after_fill``), whichever is called."""
    by_handle = twin(notional, lambda gate, res: res.reduce(amount))
    by_id = twin(notional, lambda gate, res: gate.reduce_order("o", amount))
    assert by_id == by_handle


def test_reduce_order_partial_fills_then_to_zero(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """Each partial fill takes its amount off; the last ends the reservation as filled, counted
    once as released; after that the id names nothing."""
    res = admit(gate, "AAA", 100, "o")
    assert gate.reduce_order("o", 30) is True
    assert (res.notional, res.state) == (70, ReservationState.ACTIVE)
    assert ledger.stats().gross_notional == 70
    assert gate.reduce_order("o", Decimal("69.5")) is True
    assert res.notional == Decimal("0.5")
    assert gate.reduce_order("o", 1) is True
    assert res.state is ReservationState.FILLED
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.released) == (0, 0, 1)
    assert gate.reduce_order("o", 1) is False
    assert ledger.stats() == stats


def test_reduce_order_finds_a_generated_id(gate: PortfolioGate) -> None:
    """An order the ledger named is found by the id it was given, outside a block and in one."""
    res = admit(gate, "AAA", 10, None)
    assert gate.reduce_order(res.order_id, 4) is True
    with gate.ledger.lock():
        assert gate.reduce_order(res.order_id, 4) is True
    assert res.notional == 2


def _released(gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock) -> str:
    assert gate.release_order("o")
    return "o"


def _filled(gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock) -> str:
    assert gate.confirm_fill("o", 100)
    return "o"


def _expired(gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock) -> str:
    clock.advance(ledger.ttl)
    assert ledger.stats().outstanding == 0  # swept
    return "o"


def _elsewhere(gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock) -> str:
    other = PendingEntryLedger(TTL, clock=clock)
    return admit(PortfolioGate(other, PortfolioLimits()), "AAA", 1, None).order_id


ENDED: dict[str, Callable[[PortfolioGate, PendingEntryLedger, ManualClock], str]] = {
    "released": _released,
    "filled": _filled,
    "expired": _expired,
    "never made": lambda gate, ledger, clock: "nobody",
    "another ledger's generated id": _elsewhere,
}


@pytest.mark.parametrize("how", list(ENDED))
def test_reduce_order_with_nothing_outstanding_is_false_and_changes_nothing(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    clock: ManualClock,
    unchanged: Unchanged,
    how: str,
) -> None:
    admit(gate, "AAA", 100, "o")
    admit(gate, "BBB", 5, "b")
    oid = ENDED[how](gate, ledger, clock)
    with unchanged(ledger, gate):
        assert gate.reduce_order(oid, 1) is False
    with unchanged(ledger, gate), ledger.lock():
        assert gate.reduce_order(oid, 1) is False


def test_reduce_order_inside_the_own_block_acts_through_it(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """Inside this thread's ``lock()`` block it is neither refused nor left waiting for the
    lock the block holds: the block sees the reduction at once, and keeps it."""
    res = admit(gate, "AAA", 100, "o")

    def in_block() -> None:
        with ledger.lock() as pending:
            assert gate.reduce_order("o", 40) is True
            assert pending.gross_notional() == 60
            assert gate.reduce_order("o", 60) is True
            assert "AAA" not in pending

    assert call_in_thread(in_block, timeout=10) is None
    assert res.state is ReservationState.FILLED
    assert ledger.stats().released == 1
    assert ledger.audit() == []


@pytest.mark.parametrize("amount", [40, 100], ids=["partial", "to zero"])
def test_reduce_order_in_a_block_that_raises_is_undone(
    gate: PortfolioGate, ledger: PendingEntryLedger, amount: int
) -> None:
    """Journaled like the block's own changes: a partial fill is put back, a fill to zero
    makes the reservation active again, and the sums' kind is as it was."""
    res = admit(gate, "AAA", 100, "o")
    before = view(ledger, res)
    with pytest.raises(Boom), ledger.lock():
        assert gate.reduce_order("o", Decimal(amount))
        raise Boom
    assert view(ledger, res) == before
    assert ledger.audit() == []


# ---------------------------------------------------------------------------- confirm_fill(filled=)


@pytest.mark.parametrize(("notional", "amount"), FILLS, ids=repr)
def test_confirm_fill_filled_books_the_position_and_the_reduction(
    notional: Number, amount: Number
) -> None:
    """The same as setting the position and reducing the reservation by the fill; True, as
    the reservation was outstanding."""

    def apart(gate: PortfolioGate, res: Reservation) -> bool:
        gate.set_position("AAA", 42)
        return res.reduce(amount)

    together = twin(notional, lambda gate, res: gate.confirm_fill("o", 42, filled=amount))
    assert together == twin(notional, apart)
    assert together[0] is True


def test_confirm_fill_filled_partial_then_the_rest(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """Partial fills keep the reservation for what is still open; the last one ends it as
    filled; the position is what each fill said."""
    res = admit(gate, "AAA", 100, "o")
    assert gate.confirm_fill("o", 40, filled=40) is True
    assert (res.state, res.notional, gate.positions()) == (ReservationState.ACTIVE, 60, {"AAA": 40})
    assert ledger.stats().gross_notional == 60
    assert gate.confirm_fill("o", 100, symbol="AAA", filled=60) is True
    assert (res.state, gate.positions()) == (ReservationState.FILLED, {"AAA": 100})
    stats = ledger.stats()
    assert (stats.outstanding, stats.released, stats.expired) == (0, 1, 0)


def test_confirm_fill_filled_after_the_reservation_ended(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock, unchanged: Unchanged
) -> None:
    """As without ``filled``: False; the position is booked if ``symbol`` says where, else
    nothing changes; the fill takes nothing off any other reservation."""
    admit(gate, "AAA", 100, "o")
    other = admit(gate, "AAA", 5, "other")
    assert gate.release_order("o")
    with unchanged(ledger, gate):
        assert gate.confirm_fill("o", 40, filled=40) is False
    assert gate.confirm_fill("o", 40, symbol="AAA", filled=40) is False
    assert gate.positions() == {"AAA": 40}
    assert other.notional == 5
    assert ledger.audit() == []


def test_confirm_fill_filled_on_another_symbol_changes_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, book: Reservation, unchanged: Unchanged
) -> None:
    """Refused whole, as without ``filled``: neither the position nor the reduction."""
    with unchanged(ledger, gate), pytest.raises(ValueError, match=r"order_id 'o'.*'AAA'.*'BBB'"):
        gate.confirm_fill("o", 40, symbol="BBB", filled=40)
    assert book.notional == 100


def test_confirm_fill_filled_at_the_deadline_counts_and_the_rest_expires(
    clock: ManualClock,
) -> None:
    """The order is found before the sweep, as for a whole fill: the position and the partial
    fill are booked; what is still reserved then expires in the same step, its TTL being up."""
    expired: list[Reservation] = []
    ledger = PendingEntryLedger(TTL, clock=clock, on_expire=expired.append)
    gate = PortfolioGate(ledger, PortfolioLimits())
    res = admit(gate, "AAA", 100, "o")
    clock.advance(TTL)
    assert gate.confirm_fill("o", 40, filled=40) is True
    assert gate.positions() == {"AAA": 40}
    assert (res.state, res.notional, expired) == (ReservationState.EXPIRED, 60, [res])
    stats = ledger.stats()
    assert (stats.outstanding, stats.released, stats.expired) == (0, 0, 1)


class HandOff:
    """A gate whose ledger calls back into the test (its clock, ``on_expire``), each time
    recording the fill's progress: the position booked on AAA and what ``o`` still reserves.

    Those are the moments other code runs during a ``confirm_fill``; a fill done in two
    acquisitions of the lock reads the clock (or fires ``on_expire``) between them.
    """

    def __init__(self) -> None:
        self.manual = ManualClock()
        self.ledger = PendingEntryLedger(TTL, clock=self.clock, on_expire=self.on_expire)
        self.gate = PortfolioGate(self.ledger, PortfolioLimits())
        self.seen: list[tuple[str, object, object]] = []
        self.res: Reservation | None = None

    def clock(self) -> float:
        self.look("clock")
        return self.manual()

    def on_expire(self, res: Reservation) -> None:
        self.look("on_expire")

    def look(self, who: str) -> None:
        if self.res is not None:  # watching: the lock is free here (caller code never runs
            # under it), so this reads the state as a decision would find it
            self.seen.append((who, self.gate.positions().get("AAA"), self.res.notional))


def test_the_position_and_the_partial_fill_are_booked_in_one_step() -> None:
    """Whenever other code can run during ``confirm_fill(filled=)``, it finds the fill either
    not booked at all or booked whole: never the position without the reduction, nor the
    reduction without the position. (Something is due, so the fill's sweep fires
    ``on_expire``: the test sees both sides of the critical section.)"""
    h = HandOff()
    admit(h.gate, "DUE", 1, "due")
    h.manual.advance(TTL / 2)
    res = admit(h.gate, "AAA", 100, "o")
    h.manual.advance(TTL / 2)  # "due" is due, "o" is not
    h.res = res
    assert h.gate.confirm_fill("o", 40, filled=40) is True
    h.res = None
    before, after = (None, 100), (40, 60)
    assert {who for who, *_ in h.seen} == {"clock", "on_expire"}
    assert [(pos, left) for _, pos, left in h.seen if (pos, left) not in (before, after)] == []
    assert ("clock", *before) in h.seen and ("on_expire", *after) in h.seen
    assert h.ledger.audit() == []


# ---------------------------------------------------------------------------- bad input

BAD_AMOUNTS: list[tuple[object, type[Exception]]] = [
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-math.inf, ValueError),
    (0, ValueError),
    (0.0, ValueError),
    (-1, ValueError),
    (Decimal("NaN"), ValueError),
    (Decimal("Infinity"), ValueError),
    (Fraction(-1, 3), ValueError),
    (10**15, ValueError),
    (True, TypeError),
    ("10", TypeError),
    (b"10", TypeError),
    ([10], TypeError),
    (1 + 0j, TypeError),
]
AMOUNT_IDS = [repr(v) for v, _ in BAD_AMOUNTS]
BAD_ORDER_IDS: list[tuple[object, type[Exception]]] = [
    (None, TypeError),
    ("", ValueError),
    (1, TypeError),
    (b"o", TypeError),
    (("o",), TypeError),
    ([1], TypeError),
]


@pytest.mark.parametrize(("value", "exc"), BAD_AMOUNTS, ids=AMOUNT_IDS)
def test_reduce_order_bad_amount(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """Checked like ``Reservation.reduce``'s, inside a block or not, for a known id or not."""
    for oid in ("o", "nobody"):
        with unchanged(ledger, gate), raises(exc, "amount", value):
            gate.reduce_order(oid, value)
        with unchanged(ledger, gate), ledger.lock(), raises(exc, "amount", value):
            gate.reduce_order(oid, value)
    assert book.notional == 100


@pytest.mark.parametrize(("value", "exc"), BAD_ORDER_IDS, ids=repr)
def test_reduce_order_bad_order_id(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    with unchanged(ledger, gate), raises(exc, "order_id", value):
        gate.reduce_order(value, 1)
    with unchanged(ledger, gate), ledger.lock(), raises(exc, "order_id", value):
        gate.reduce_order(value, 1)


@pytest.mark.parametrize(("value", "exc"), BAD_AMOUNTS, ids=AMOUNT_IDS)
def test_confirm_fill_bad_filled(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """Refused before anything changes: neither the position (even for an order that ended,
    with ``symbol`` given) nor the reservation. ``filled=None`` is the whole fill, not bad."""
    with unchanged(ledger, gate), raises(exc, "filled", value):
        gate.confirm_fill("o", 40, filled=value)
    with unchanged(ledger, gate), raises(exc, "filled", value):
        gate.confirm_fill("gone", 40, symbol="NEW", filled=value)
    assert book.active


def test_confirm_fill_filled_none_is_the_whole_fill(gate: PortfolioGate) -> None:
    """``filled=None`` passed explicitly is the default: the reservation ends as filled."""
    res = admit(gate, "AAA", 100, "o")
    assert gate.confirm_fill("o", 30, filled=None) is True
    assert res.state is ReservationState.FILLED


def test_confirm_fill_filled_inside_the_own_block_raises_and_changes_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, book: Reservation
) -> None:
    """A write to the owned book: refused at once in this thread's ``lock()`` block, as
    without ``filled`` (instead of waiting for ever on the lock the block holds)."""
    before = gate.positions(), ledger.stats()

    def in_block() -> None:
        with ledger.lock(), pytest.raises(ReentrantLockError):
            gate.confirm_fill("o", 40, filled=40)

    assert call_in_thread(in_block, timeout=10) is None
    assert (gate.positions(), ledger.stats()) == before
    assert book.notional == 100


# ---------------------------------------------------------------------------- the lock discipline


def fill_by_id(witness: Witness) -> PendingEntryLedger:
    """``reduce_order`` and ``confirm_fill(filled=)`` fed caller objects: ``str``-subclass ids
    and symbols, ``numbers.Real`` amounts (whose every attribute read reports itself)."""
    s = make_setup(witness)
    w, gate = s.witness, s.gate
    assert gate.try_enter("AAA", 10, order_id="o-1")
    w.doing = "reduce_order"
    assert gate.reduce_order(Name("o-1"), real(w, 0.25))
    w.doing = "confirm_fill(filled=)"
    assert gate.confirm_fill(Name("o-1"), real(w, 4), symbol=Name("AAA"), filled=real(w, 1.5))
    w.doing = "confirm_fill(filled=, late)"
    assert not gate.confirm_fill("gone", real(w, 1), symbol=Name("CCC"), filled=real(w, 1))
    w.doing = ""
    return s.ledger


def test_caller_objects_never_run_under_the_lock_in_fills_by_id() -> None:
    """Converting the amounts and telling their kind (an ``isinstance`` that reads the
    object's ``__class__``) all happen before the lock."""
    witness = Witness()
    Name.witness = witness
    try:
        ledger = fill_by_id(witness)
    finally:
        Name.witness = None
    assert {"clock", "Real"} <= witness.ran()
    assert witness.under_lock() == []
    assert ledger.audit() == []


@pytest.mark.skipif(not pendingledger.COMPILED, reason="the compiled build's property")
def test_compiled_no_python_bytecode_runs_under_the_lock_in_fills_by_id() -> None:
    witness = Witness()
    with traced(witness) as trace:
        for _ in range(20):
            fill_by_id(witness)
    assert trace.events > 1000
    assert trace.under_lock == {}


@pytest.mark.skipif(pendingledger.COMPILED, reason="the interpreted build's property")
def test_interpreted_the_tracer_sees_the_fills_by_id_run_under_the_lock() -> None:
    """The control for the compiled test above: the same harness sees the core's reduction
    run under the lock when it is Python bytecode."""
    witness = Witness()
    with traced(witness) as trace:
        fill_by_id(witness)
    assert "_core.py:_reduce_locked in reduce_order" in trace.under_lock
    assert "_core.py:_reduce_locked in confirm_fill(filled=)" in trace.under_lock


# ---------------------------------------------------------------------------- the protocol


def parameters(method: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Each parameter after ``self`` (positional-only in a compiled method): name, kind, default."""
    listed = list(inspect.signature(method).parameters.values())[1:]
    return [(p.name, p.kind, p.default) for p in listed]


@pytest.mark.parametrize("method", ["reduce_order", "confirm_fill"])
def test_the_gate_protocol_has_both_with_the_gates_parameters(method: str) -> None:
    """``Gate`` names both, with the parameters, kinds and defaults ``PortfolioGate`` has, so
    code written against the protocol calls every backend alike."""
    assert parameters(getattr(Gate, method)) == parameters(getattr(PortfolioGate, method))
    assert isinstance(PortfolioGate(PendingEntryLedger(TTL), PortfolioLimits()), Gate)
