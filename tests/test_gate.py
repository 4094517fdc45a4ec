"""PortfolioGate: every rule, the check order, halt/resume, positions, limits, stats, a model."""

from __future__ import annotations

import copy
import gc
import pickle
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager, suppress
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType

import pytest

from pendingledger import (
    Decision,
    DenyReason,
    GateStats,
    LedgerError,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    ReentrantLockError,
    Reservation,
    ReservationHandle,
    ReservationState,
)
from pendingledger.testing import ManualClock

Number = int | float | Decimal | Fraction
# Annotated as dict[Hashable, Number]: Positions is Mapping[Hashable, Number] and Mapping is
# invariant in its key, so mypy refuses a plain dict[str, int] (see the report on issue 2).
Book = dict[Hashable, Number]
NO_POSITIONS: Book = {}
Unchanged = Callable[..., AbstractContextManager[None]]


def call_in_thread(fn: Callable[[], object], timeout: float = 3.0) -> BaseException | None:
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


def is_halted(gate: PortfolioGate) -> bool:
    return gate.halted  # a call, so mypy does not narrow the property across halt()/resume()


def limits(
    positions: int | None = None, gross: Number | None = None, symbol: Number | None = None
) -> PortfolioLimits:
    return PortfolioLimits(
        max_concurrent_positions=positions, max_gross_exposure=gross, max_symbol_exposure=symbol
    )


# ---------------------------------------------------------------------------- decisions


def test_admitted_decision(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    decision = gate.try_enter("AAA", 1000, NO_POSITIONS, order_id="c-1")
    assert decision
    assert decision.admitted is True
    assert decision.reason is None
    res = decision.reservation
    assert isinstance(res, Reservation)
    assert (res.symbol, res.order_id, res.notional, res.active) == ("AAA", "c-1", 1000, True)
    assert "admitted" in repr(decision)
    with ledger.lock() as pending:
        assert pending.symbol_notional("AAA") == 1000


def test_denied_decision(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    gate.limits = limits(positions=0)
    decision = gate.try_enter("AAA", 1000, NO_POSITIONS)
    assert not decision
    assert decision.admitted is False
    assert decision.reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert decision.reservation is None
    assert "MAX_CONCURRENT_POSITIONS" in repr(decision)
    assert ledger.stats().outstanding == 0


def test_decision_needs_exactly_one_of_reason_and_reservation() -> None:
    with pytest.raises(ValueError):
        Decision()
    assert Decision(DenyReason.HALTED).reason is DenyReason.HALTED


def test_deny_reason_str() -> None:
    assert str(DenyReason.MAX_GROSS_EXPOSURE) == "max_gross_exposure"


def test_generated_order_id_when_none_given(gate: PortfolioGate) -> None:
    first = gate.try_enter("AAA", 1, NO_POSITIONS).reservation
    second = gate.try_enter("AAA", 1, NO_POSITIONS).reservation
    assert first is not None and second is not None
    assert first.order_id is not None
    assert first.order_id != second.order_id


def test_generated_order_id_finds_its_reservation(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    """A generated id is made when read; every reading names the same reservation."""
    res = gate.try_enter("AAA", 1).reservation
    other = gate.try_enter("BBB", 1).reservation
    assert isinstance(res, Reservation) and isinstance(other, Reservation)
    assert res.order_id == res.order_id and hash(res.order_id) == hash(res.order_id)
    assert {res.order_id: 1}[res.order_id] == 1
    assert res.order_id != other.order_id and res.order_id != repr(res.order_id)
    assert gate.confirm_fill(res.order_id, 1) is True  # found by its generated id
    assert res.state is ReservationState.FILLED and gate.positions() == {"AAA": 1}
    assert ledger.release_order(res.order_id) is False  # ended: nothing to release
    assert ledger.release_order(other.order_id) is True
    assert other.state is ReservationState.RELEASED


class _LikeNone:
    """A caller's order id that hashes and compares like None (odd, but hashable)."""

    def __hash__(self) -> int:
        return hash(None)

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, _LikeNone)


def test_a_callers_id_that_equals_none_does_not_block_generated_ids(gate: PortfolioGate) -> None:
    assert gate.try_enter("AAA", 1, order_id=_LikeNone())
    assert gate.try_enter("BBB", 1)  # generated: never looked up as None
    assert gate.try_enter("CCC", 1)


def test_generated_order_id_holds_nothing_and_pickles(gate: PortfolioGate) -> None:
    """An id kept in a caller's records keeps no reservation or ledger alive, and travels."""
    res = gate.try_enter("AAA", 1).reservation
    assert res is not None
    order_id = res.order_id
    held = [r for r in gc.get_referents(order_id) if r is not type(order_id)]  # (its class)
    assert held and all(type(r) is int for r in held)
    assert pickle.loads(pickle.dumps(order_id)) == order_id
    assert copy.deepcopy(order_id) == order_id and hash(copy.copy(order_id)) == hash(order_id)
    assert gate.release_order(pickle.loads(pickle.dumps(order_id))) is True


def test_generated_order_id_of_another_ledger_finds_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    """Not even the reservation with the same sequence number in the other ledger."""
    res = gate.try_enter("AAA", 1).reservation
    assert res is not None
    elsewhere = PendingEntryLedger(10.0, clock=clock)
    theirs = PortfolioGate(elsewhere, PortfolioLimits()).try_enter("AAA", 1).reservation
    assert isinstance(res, Reservation) and isinstance(theirs, Reservation)
    assert theirs._seq == res._seq  # what a lookup by seq alone would match
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

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _FIRST_GENERATED_ID, *args],
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
    res = gate.try_enter("AAA", 1).reservation
    assert res is not None
    with unchanged(ledger, gate), pytest.raises(ValueError, match="generated"):
        gate.try_enter("BBB", 1, order_id=res.order_id)
    with ledger.lock() as pending, pytest.raises(ValueError, match="generated"):
        pending.reserve("BBB", 1, order_id=res.order_id)


# ---------------------------------------------------------------------------- the rules


def test_halted_until_resume(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
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
    gate.limits = limits(positions=3)
    positions: Book = {"AAA": 100}
    assert gate.try_enter("BBB", 1, positions)
    assert gate.try_enter("CCC", 1, positions)
    assert gate.try_enter("DDD", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_symbol_already_reserved_takes_no_new_slot(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=1)
    assert gate.try_enter("AAA", 1, NO_POSITIONS)
    assert gate.try_enter("AAA", 1, NO_POSITIONS)  # top-up: same slot
    assert gate.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_symbol_already_open_takes_no_new_slot(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=1)
    positions: Book = {"AAA": 500}
    assert gate.try_enter("AAA", 1, positions)  # adds to the open position
    assert gate.try_enter("AAA", 1, positions)
    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_reserved_symbol_that_is_open_is_counted_once(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=2)
    assert gate.try_enter("AAA", 1, NO_POSITIONS)
    # the fill is in the cache but the reservation is not released yet: AAA still one slot
    positions: Book = {"AAA": 1}
    assert gate.try_enter("BBB", 1, positions)
    assert gate.try_enter("CCC", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_zero_positions_limit_allows_no_new_position(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    with ledger.lock() as pending:
        pending.reserve("RRR", 1)  # reserved before the limit went to zero
    gate.limits = limits(positions=0)
    assert gate.try_enter("NEW", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("NEW", 1, {"OPEN": 1}).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("OPEN", 1, {"OPEN": 1})  # already open
    assert gate.try_enter("RRR", 1, NO_POSITIONS)  # already reserved


def test_a_position_with_zero_exposure_is_open(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=1)
    positions: Book = {"AAA": 0}
    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("AAA", 1, positions)


def test_positions_limit_frees_up_when_a_reservation_ends(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=1)
    decision = gate.try_enter("AAA", 1, NO_POSITIONS)
    assert gate.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert decision.reservation is not None
    decision.reservation.release()  # exchange reject
    assert gate.try_enter("BBB", 1, NO_POSITIONS)


def test_gross_exactly_at_limit_is_admitted_above_is_denied(gate: PortfolioGate) -> None:
    gate.limits = limits(gross=1000)
    positions: Book = {"OPEN": 300}
    assert gate.try_enter("AAA", 400, positions)
    assert gate.try_enter("BBB", 301, positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("BBB", 300, positions)  # 300 + 400 + 300 == 1000: admitted
    assert gate.try_enter("CCC", Fraction(1, 10**9), positions).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )


def test_gross_boundary_is_exact_with_decimals_and_fractions(gate: PortfolioGate) -> None:
    gate.limits = limits(gross=Decimal("0.3"))
    assert gate.try_enter("A", Decimal("0.1"), NO_POSITIONS)
    assert gate.try_enter("B", Decimal("0.2"), NO_POSITIONS)  # exactly 0.3
    assert gate.try_enter("C", Decimal("1e-30"), NO_POSITIONS).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )


def test_fraction_limit_boundary(gate: PortfolioGate) -> None:
    gate.limits = limits(gross=Fraction(1))
    for symbol in "ABC":
        assert gate.try_enter(symbol, Fraction(1, 3), NO_POSITIONS)
    assert gate.try_enter("D", Fraction(1, 10**12), NO_POSITIONS).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )


def test_short_positions_count_by_absolute_value(gate: PortfolioGate) -> None:
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
    gate.limits = limits(symbol=1000)
    positions: Book = {"AAA": 200, "BBB": 900}
    assert gate.try_enter("AAA", 500, positions)
    assert gate.try_enter("AAA", 301, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE
    assert gate.try_enter("AAA", 300, positions)  # 200 + 800 == 1000
    assert gate.try_enter("CCC", 1000, positions)  # other symbols don't count
    assert gate.try_enter("BBB", 100, positions)
    assert gate.try_enter("BBB", 1, positions).reason is DenyReason.MAX_SYMBOL_EXPOSURE


def test_check_order_first_failure_wins(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
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
    positions: Book = {f"P{i}": 10**12 for i in range(100)}
    for i in range(50):
        assert gate.try_enter(f"S{i}", 10**15, positions)


def test_decisions_see_reservations_made_in_lock_blocks(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
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
    strict = PortfolioGate(ledger, limits(positions=1))
    loose = PortfolioGate(ledger, limits(positions=3))
    assert loose.try_enter("AAA", 1, NO_POSITIONS)
    assert strict.try_enter("BBB", 1, NO_POSITIONS).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert loose.try_enter("BBB", 1, NO_POSITIONS)
    assert loose.stats().admitted == 2
    assert strict.stats().admitted == 0


# ---------------------------------------------------------------------------- positions


def test_positions_callable_is_called_and_its_result_used(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=2, gross=1000)
    calls: list[int] = []

    def positions() -> Mapping[Hashable, Number]:
        calls.append(1)
        return {"AAA": 600, "BBB": -100}

    assert gate.try_enter("CCC", 1, positions).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("AAA", 301, positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("AAA", 300, positions)
    assert len(calls) == 3  # once per decision when nothing interferes


def test_positions_callable_called_once_when_an_expiry_is_due(
    gate: PortfolioGate, ledger: PendingEntryLedger, clock: ManualClock
) -> None:
    gate.try_enter("AAA", 1, NO_POSITIONS)
    clock.advance(ledger.ttl)
    calls: list[int] = []

    def positions() -> Mapping[Hashable, Number]:
        calls.append(1)
        return {}

    assert gate.try_enter("BBB", 1, positions)
    assert ledger.stats().expired == 1
    assert len(calls) == 1


def test_positions_callable_runs_under_the_ledger_lock(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    lock_was_free: list[bool] = []

    def positions() -> Mapping[Hashable, Number]:
        try:
            with ledger.lock(timeout=0):
                lock_was_free.append(True)
        except LedgerError:
            lock_was_free.append(False)
        return {}

    assert gate.try_enter("AAA", 1, positions)
    assert lock_was_free == [False]


def test_positions_callable_that_raises_changes_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger, unchanged: Unchanged
) -> None:
    gate.limits = limits(positions=5)
    gate.try_enter("AAA", 1, NO_POSITIONS)

    def positions() -> Mapping[Hashable, Number]:
        raise ConnectionError("position cache unavailable")

    with unchanged(ledger, gate), pytest.raises(ConnectionError):
        gate.try_enter("BBB", 1, positions)


class _Book(Mapping[Hashable, Number]):
    """A read-only Mapping that is not a dict."""

    def __init__(self, data: dict[Hashable, Number]) -> None:
        self._data = data

    def __getitem__(self, key: Hashable) -> Number:
        return self._data[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize(
    "wrap",
    [dict, MappingProxyType, _Book, lambda d: lambda: d, lambda d: lambda: _Book(d)],
    ids=["dict", "mappingproxy", "Mapping", "callable->dict", "callable->Mapping"],
)
def test_positions_any_mapping_or_callable(
    gate: PortfolioGate, wrap: Callable[[dict[Hashable, Number]], object]
) -> None:
    gate.limits = limits(positions=2, gross=1000, symbol=500)
    positions = wrap({"AAA": 400, "BBB": Decimal(-350)})
    assert gate.try_enter("CCC", 1, positions).reason is (  # type: ignore[arg-type]
        DenyReason.MAX_CONCURRENT_POSITIONS
    )
    assert gate.try_enter("AAA", 251, positions).reason is (  # type: ignore[arg-type]
        DenyReason.MAX_GROSS_EXPOSURE
    )
    assert gate.try_enter("AAA", 101, positions).reason is (  # type: ignore[arg-type]
        DenyReason.MAX_SYMBOL_EXPOSURE
    )
    assert gate.try_enter("AAA", 100, positions)  # type: ignore[arg-type]


def test_positions_are_read_for_each_decision(gate: PortfolioGate) -> None:
    gate.limits = limits(positions=1)
    cache: dict[Hashable, Number] = {}
    assert gate.try_enter("AAA", 1, cache)
    cache["AAA"] = 1  # the fill lands in the cache...
    gate.ledger.release("AAA")  # ...then the reservation is released
    assert gate.try_enter("BBB", 1, cache).reason is DenyReason.MAX_CONCURRENT_POSITIONS
    del cache["AAA"]  # position closed
    assert gate.try_enter("BBB", 1, cache)


# ---------------------------------------------------------------------------- limits


def test_limits_can_be_replaced(gate: PortfolioGate) -> None:
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
    before = gate.limits
    with pytest.raises(TypeError, match=r"limits.*\{'max_concurrent_positions': 1\}"):
        gate.limits = {"max_concurrent_positions": 1}  # type: ignore[assignment]
    assert gate.limits is before
    with pytest.raises(TypeError, match=r"limits.*None"):
        PortfolioGate(gate.ledger, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ledger"):
        PortfolioGate(object(), PortfolioLimits())  # type: ignore[arg-type]


def test_gate_exposes_its_ledger(gate: PortfolioGate, ledger: PendingEntryLedger) -> None:
    assert gate.ledger is ledger


# ---------------------------------------------------------------------------- stats


def test_gate_stats_counts_admitted_and_denied_per_reason(gate: PortfolioGate) -> None:
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
        DenyReason.MAX_CONCURRENT_POSITIONS: 2,
        DenyReason.MAX_GROSS_EXPOSURE: 1,
        DenyReason.MAX_SYMBOL_EXPOSURE: 1,
        DenyReason.BACKEND_UNAVAILABLE: 0,
        DenyReason.BOOK_NOT_RESTORED: 0,
    }
    assert stats.decisions == 7


def test_gate_stats_is_a_snapshot(gate: PortfolioGate) -> None:
    stats = gate.stats()
    gate.try_enter("AAA", 1, NO_POSITIONS)
    assert stats.admitted == 0
    with pytest.raises(TypeError):
        stats.denied[DenyReason.HALTED] = 5  # type: ignore[index]


def test_duplicate_order_id_is_refused_and_not_counted(
    gate: PortfolioGate, ledger: PendingEntryLedger, unchanged: Unchanged
) -> None:
    first = gate.try_enter("AAA", 100, NO_POSITIONS, order_id="o-1").reservation
    with unchanged(ledger, gate), pytest.raises(ValueError, match="order_id 'o-1'"):
        gate.try_enter("BBB", 1, NO_POSITIONS, order_id="o-1")
    assert first is not None
    assert ledger.release_order("o-1")
    again = gate.try_enter("BBB", 1, NO_POSITIONS, order_id="o-1").reservation
    assert again is not None and again.order_id == "o-1" and again is not first


# ---------------------------------------------------------------------------- re-entrancy


def test_try_enter_inside_a_block_raises_and_changes_nothing(
    gate: PortfolioGate, ledger: PendingEntryLedger
) -> None:
    gate.try_enter("AAA", 1, NO_POSITIONS)
    before = gate.stats()
    with ledger.lock() as pending:
        with pytest.raises(ReentrantLockError):
            gate.try_enter("BBB", 1, NO_POSITIONS)
        assert "BBB" not in pending and len(pending) == 1
    assert gate.stats() == before
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
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("expiry_due", [False, True], ids=["nothing-due", "expiry-due"])
@pytest.mark.parametrize("use", list(CALLBACK_USES))
def test_ledger_calls_from_a_positions_callable_do_not_deadlock(
    gate: PortfolioGate,
    ledger: PendingEntryLedger,
    clock: ManualClock,
    use: str,
    expiry_due: bool,
) -> None:
    """Wherever the gate calls ``positions``, calling back into the ledger either works or
    raises ReentrantLockError; it never hangs the thread."""
    if expiry_due:
        gate.try_enter("OLD", 1, NO_POSITIONS)
        clock.advance(ledger.ttl - 1)
    held = gate.try_enter("HELD", 5, NO_POSITIONS).reservation
    assert held is not None
    if expiry_due:
        clock.advance(1)  # OLD is due now, HELD is not
    outcomes: list[str] = []

    def positions() -> Mapping[Hashable, Number]:
        try:
            CALLBACK_USES[use](ledger, gate, held)
            outcomes.append("worked")
        except ReentrantLockError:
            outcomes.append("reentrant")
        return {}

    assert call_in_thread(lambda: gate.try_enter("AAA", 1, positions)) is None
    assert outcomes
    with ledger.lock(timeout=0):
        pass


# ---------------------------------------------------------------------------- a reference model


class Model:
    """The contract written as naively as possible: exact Fractions, a dict per order."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.orders: dict[Hashable, tuple[Hashable, Fraction, float]] = {}
        self.reserved = self.released = self.expired = 0

    def expire(self, now: float) -> None:
        for oid, (_, _, at) in list(self.orders.items()):
            if now >= at + self.ttl:
                del self.orders[oid]
                self.expired += 1

    def gross(self) -> Fraction:
        return sum((n for _, n, _ in self.orders.values()), Fraction(0))

    def symbol_gross(self, symbol: Hashable) -> Fraction:
        return sum((n for s, n, _ in self.orders.values() if s == symbol), Fraction(0))

    def decide(
        self,
        symbol: Hashable,
        notional: Number,
        positions: Mapping[Hashable, Number],
        lim: PortfolioLimits,
        halted: bool,
    ) -> DenyReason | None:
        reserved = {s for s, _, _ in self.orders.values()}
        n = Fraction(notional)
        if halted:
            return DenyReason.HALTED
        max_pos = lim.max_concurrent_positions
        if (
            max_pos is not None
            and symbol not in positions
            and symbol not in reserved
            and len(positions) + len(reserved - set(positions)) >= max_pos
        ):
            return DenyReason.MAX_CONCURRENT_POSITIONS
        open_gross = sum((abs(Fraction(v)) for v in positions.values()), Fraction(0))
        if lim.max_gross_exposure is not None and open_gross + self.gross() + n > Fraction(
            lim.max_gross_exposure
        ):
            return DenyReason.MAX_GROSS_EXPOSURE
        sym = abs(Fraction(positions.get(symbol, 0))) + self.symbol_gross(symbol) + n
        if lim.max_symbol_exposure is not None and sym > Fraction(lim.max_symbol_exposure):
            return DenyReason.MAX_SYMBOL_EXPOSURE
        return None


def returning(book: Book) -> Callable[[], Book]:
    return lambda: book


def random_amount(rng: random.Random) -> Number:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randint(1, 500)
    if kind == 1:
        return rng.uniform(0.01, 500.0)
    if kind == 2:
        return Decimal(rng.randint(1, 50000)) / 100
    return Fraction(rng.randint(1, 5000), rng.randint(1, 12))


def same_value(got: Number, exact: Fraction) -> bool:
    """``got`` is ``exact``, or its correctly rounded float when the ledger answers a float."""
    if isinstance(got, float):
        return got == float(exact)
    return Fraction(got) == exact


@pytest.mark.parametrize("seed", range(12))
def test_gate_and_ledger_match_the_reference_model(seed: int) -> None:
    rng = random.Random(seed)
    clock = ManualClock()
    expired_seen: list[Reservation] = []
    ledger = PendingEntryLedger(20, clock=clock, on_expire=expired_seen.append)
    gate = PortfolioGate(ledger, PortfolioLimits())
    model = Model(20)
    symbols: list[Hashable] = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
    made: dict[Hashable, Reservation] = {}
    owned_book: dict[Hashable, Number] = {}
    admitted = 0
    denied = dict.fromkeys(DenyReason, 0)

    for step in range(400):
        op = rng.random()
        if op < 0.05:
            gate.limits = PortfolioLimits(
                max_concurrent_positions=rng.choice([None, 0, 1, 2, 3, 5]),
                max_gross_exposure=rng.choice([None, 300, 1000.5, Decimal("2500.25")]),
                max_symbol_exposure=rng.choice([None, Fraction(1201, 3), 800]),
            )
        elif op < 0.08:
            if rng.random() < 0.5:
                gate.halt()
            else:
                gate.resume()
        elif op < 0.45:
            symbol = rng.choice(symbols)
            notional = random_amount(rng)
            order_id: Hashable = f"g{step}"
            model.expire(clock())
            if rng.random() < 0.5:  # the gate's own position book
                expected = model.decide(symbol, notional, owned_book, gate.limits, gate.halted)
                decision = gate.try_enter(symbol, notional, order_id=order_id)
            else:  # positions passed in, as a mapping or a callable
                positions: dict[Hashable, Number] = {
                    s: rng.choice([random_amount(rng), -random_amount(rng), 0])
                    for s in rng.sample(symbols, rng.randrange(4))
                }
                expected = model.decide(symbol, notional, positions, gate.limits, gate.halted)
                source = positions if rng.random() < 0.5 else returning(positions)
                decision = gate.try_enter(symbol, notional, source, order_id=order_id)
            assert decision.reason is expected, (step, symbol, notional, gate.limits)
            if decision:
                assert isinstance(decision.reservation, Reservation)
                made[order_id] = decision.reservation
                model.orders[order_id] = (symbol, Fraction(notional), clock())
                model.reserved += 1
                admitted += 1
            else:
                assert expected is not None
                denied[expected] += 1
        elif op < 0.55:
            # a lock() block that reserves, releases and reduces; sometimes it raises
            model.expire(clock())
            rollback = rng.random() < 0.4
            trial = Model(model.ttl)
            trial.orders = dict(model.orders)
            new: list[Reservation] = []
            try:
                with ledger.lock() as pending:
                    for j in range(rng.randint(1, 4)):
                        symbol, amount = rng.choice(symbols), random_amount(rng)
                        oid: Hashable = f"b{step}.{j}"
                        new.append(pending.reserve(symbol, amount, order_id=oid))
                        trial.orders[oid] = (symbol, Fraction(amount), clock())
                        trial.reserved += 1
                    if trial.orders and rng.random() < 0.5:
                        oid = rng.choice(sorted(trial.orders, key=str))
                        assert pending.release_order(oid)
                        del trial.orders[oid]
                        trial.released += 1
                    if rollback:
                        raise RuntimeError("roll back")
            except RuntimeError:
                for res in new:
                    assert res.state is ReservationState.ROLLED_BACK
            else:
                for res in new:
                    made[res.order_id] = res
                model.orders = trial.orders
                model.reserved += trial.reserved
                model.released += trial.released
        elif op < 0.65 and made:
            oid = rng.choice(sorted(made, key=str))
            model.expire(clock())
            was_live = oid in model.orders
            assert made[oid].release() is was_live
            if was_live:
                del model.orders[oid]
                model.released += 1
        elif op < 0.72 and made:
            oid = rng.choice(sorted(made, key=str))
            amount = random_amount(rng)
            model.expire(clock())
            was_live = oid in model.orders
            assert made[oid].reduce(amount) is was_live
            if was_live:
                symbol, left, at = model.orders[oid]
                if Fraction(amount) >= left:
                    del model.orders[oid]
                    model.released += 1
                    assert made[oid].state is ReservationState.FILLED
                else:
                    model.orders[oid] = (symbol, left - Fraction(amount), at)
                    assert same_value(made[oid].notional, left - Fraction(amount))
        elif op < 0.78:
            symbol = rng.choice(symbols)
            model.expire(clock())
            gone = [oid for oid, (s, _, _) in model.orders.items() if s == symbol]
            assert ledger.release(symbol) is bool(gone)
            for oid in gone:
                del model.orders[oid]
            model.released += len(gone)
        elif op < 0.82 and made:
            oid = rng.choice(sorted(made, key=str))
            model.expire(clock())
            was_live = oid in model.orders
            assert ledger.release_order(oid) is was_live
            if was_live:
                del model.orders[oid]
                model.released += 1
        elif op < 0.86:
            symbol, exposure = rng.choice(symbols), rng.choice([random_amount(rng), 0])
            exposure = -exposure if rng.random() < 0.3 else exposure
            model.expire(clock())
            gate.set_position(symbol, exposure)
            owned_book[symbol] = exposure
        elif op < 0.89:
            symbol = rng.choice(symbols)
            model.expire(clock())
            assert gate.close_position(symbol) is (owned_book.pop(symbol, None) is not None)
        elif op < 0.93 and made:
            oid = rng.choice(sorted(made, key=str))
            exposure = random_amount(rng)
            model.expire(clock())
            was_live = oid in model.orders
            own_symbol = made[oid].symbol
            named: Hashable | None = rng.choice([None, own_symbol, own_symbol, "AAA"])
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
            reserved_symbols = {s for s, _, _ in model.orders.values()}
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
        for oid, res in made.items():
            assert res.active is (oid in model.orders)

    gate_stats = gate.stats()
    assert gate_stats.admitted == admitted
    assert dict(gate_stats.denied) == denied
    # release everything: the gross is exactly zero again
    for res in made.values():
        res.release()
    stats = ledger.stats()
    assert stats.outstanding == 0
    assert stats.gross_notional == 0
    assert stats.reserved == stats.released + stats.expired


# ---------------------------------------------------------------------------- typing of the API
# What a user writes with plain ``str`` symbols must pass ``mypy --strict`` without casts.

TYPING_PRELUDE = """
from decimal import Decimal
from pendingledger import (
    Decision, PendingEntryLedger, PortfolioGate, PortfolioLimits, Reservation
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
}


@pytest.fixture(scope="module")
def mypy_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A shared cache, and an empty config so the project's own mypy settings don't apply."""
    where = tmp_path_factory.mktemp("mypy")
    config = where / "mypy.ini"
    config.write_text("[mypy]\n")
    return ["--config-file", str(config), "--cache-dir", str(where / "cache")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case",
    [
        "baseline",
        "positions-dict-str-float",
        "positions-callable",
        "positions-lambda",
        "new_slots-str-predicate",
    ],
)
def test_public_api_typing_with_str_symbols(
    case: str, mypy_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = pytest.importorskip("mypy.api")
    import pendingledger

    root = Path(pendingledger.__file__).resolve().parent.parent
    where: list[str] = []
    if root.name in ("site-packages", "dist-packages"):  # installed: found as a PEP 561 package
        where = ["--python-executable", sys.executable]
    else:  # a source tree (an editable install's import hook is invisible to mypy)
        monkeypatch.setenv("MYPYPATH", str(root))
    program = TYPING_PRELUDE + TYPING_CASES[case]
    stdout, stderr, status = api.run(
        [*mypy_args, *where, "--strict", "--no-error-summary", "-c", program]
    )
    if status not in (0, 1):  # not a type error: mypy itself did not run (xfail won't hide it)
        raise RuntimeError(f"mypy exited {status}: {stdout}{stderr}")
    assert status == 0, stdout + stderr
