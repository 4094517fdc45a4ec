"""Exact amounts: int, float, Decimal and Fraction mixed in one ledger, sums that never drift."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from decimal import Decimal
from fractions import Fraction

import pytest

from pendingledger import (
    DenyReason,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Reservation,
)

Number = int | float | Decimal | Fraction
Book = dict[Hashable, Number]


def reserve_all(
    ledger: PendingEntryLedger, amounts: list[Number], symbols: int = 7
) -> list[Reservation]:
    with ledger.lock() as pending:
        return [pending.reserve(f"S{i % symbols}", a) for i, a in enumerate(amounts)]


def gross(ledger: PendingEntryLedger) -> Number:
    with ledger.lock() as pending:
        return pending.gross_notional()


def test_mixed_types_in_one_ledger_sum_exactly(ledger: PendingEntryLedger) -> None:
    amounts: list[Number] = [100, 0.1, Decimal("0.2"), Fraction(1, 3), 2.5, Decimal("1e-20")]
    made = reserve_all(ledger, amounts)
    exact = sum((Fraction(a) for a in amounts), Fraction(0))
    assert Fraction(gross(ledger)) == exact
    assert Fraction(ledger.stats().gross_notional) == exact
    for res, amount in zip(made, amounts, strict=True):
        assert res.notional == amount
        assert type(res.notional) is type(amount)  # each reservation keeps its caller's type
    for res in made:
        assert res.release()
    assert gross(ledger) == 0
    assert ledger.stats().gross_notional == 0


def test_gross_is_exactly_zero_after_everything_is_released(ledger: PendingEntryLedger) -> None:
    rng = random.Random(7)
    for _ in range(5):
        amounts: list[Number] = [rng.uniform(0.001, 1e6) for _ in range(200)]
        amounts += [Decimal(rng.randint(1, 10**9)) / 10**6 for _ in range(50)]
        amounts += [Fraction(rng.randint(1, 999), rng.randint(1, 999)) for _ in range(50)]
        made = reserve_all(ledger, amounts)
        rng.shuffle(made)
        for res in made:
            res.release()
        stats = ledger.stats()
        assert stats.outstanding == 0
        assert stats.gross_notional == 0


def test_the_classic_float_drift_does_not_happen(ledger: PendingEntryLedger) -> None:
    with ledger.lock() as pending:
        a = pending.reserve("A", 0.1)
        pending.reserve("B", 0.2)
    assert a.release()
    assert gross(ledger) == 0.2  # naive float bookkeeping gives 0.20000000000000004
    for _ in range(1000):
        with ledger.lock() as pending:
            res = pending.reserve("C", 0.1)
        res.release()
    assert gross(ledger) == 0.2


def test_many_float_reservations_sum_to_math_fsum(ledger: PendingEntryLedger) -> None:
    rng = random.Random(2024)
    amounts = [rng.uniform(0.01, 1e7) * rng.choice([1, 1e-6, 1e6]) for _ in range(10_000)]
    made = reserve_all(ledger, list(amounts), symbols=50)
    total = gross(ledger)
    assert isinstance(total, float)
    assert total == math.fsum(amounts)
    # release a random half: the rest still sums to its fsum
    keep = set(rng.sample(range(len(made)), len(made) // 2))
    for i, res in enumerate(made):
        if i not in keep:
            res.release()
    assert gross(ledger) == math.fsum(amounts[i] for i in keep)
    with ledger.lock() as pending:
        for s in range(50):
            assert pending.symbol_notional(f"S{s}") == math.fsum(
                amounts[i] for i in keep if i % 50 == s
            )
    for i in keep:
        made[i].release()
    assert gross(ledger) == 0


def test_extreme_floats_are_exact(ledger: PendingEntryLedger) -> None:
    amounts: list[float] = [1e300, 5e-324, 1e-300, 1.0, 2.0**-1074, 1e16, 3.0]
    made = reserve_all(ledger, list(amounts))
    assert gross(ledger) == math.fsum(amounts)
    made[0].release()
    assert gross(ledger) == math.fsum(amounts[1:])  # 1e300 gone without a trace
    for res in made[1:5]:
        res.release()
    assert gross(ledger) == 1e16 + 3.0


def test_decimal_sums_come_back_as_decimal(ledger: PendingEntryLedger) -> None:
    reserve_all(ledger, [Decimal("0.1"), Decimal("0.1"), Decimal("0.1")])
    total = gross(ledger)
    assert isinstance(total, Decimal)
    assert total == Decimal("0.3")  # binary floats would give 0.30000000000000004
    stats = ledger.stats()
    assert isinstance(stats.gross_notional, Decimal)
    assert stats.gross_notional == Decimal("0.3")


def test_decimal_with_ints_is_decimal_and_keeps_many_digits(ledger: PendingEntryLedger) -> None:
    reserve_all(ledger, [Decimal("12345678901234567890.123456789"), 10, Decimal("0.000000001")])
    total = gross(ledger)
    assert isinstance(total, Decimal)
    assert total == Decimal("12345678901234567900.12345679")


def test_decimal_reduce_stays_decimal(ledger: PendingEntryLedger) -> None:
    (res,) = reserve_all(ledger, [Decimal("100.50")])
    assert res.reduce(Decimal("0.25"))
    assert isinstance(res.notional, Decimal)
    assert res.notional == Decimal("100.25")
    assert gross(ledger) == Decimal("100.25")


def test_ints_sum_to_an_int(ledger: PendingEntryLedger) -> None:
    reserve_all(ledger, [1, 2, 3, 10**30])
    total = gross(ledger)
    assert type(total) is int
    assert total == 10**30 + 6


def test_floats_sum_to_a_float(ledger: PendingEntryLedger) -> None:
    reserve_all(ledger, [0.5, 0.25, 1])
    total = gross(ledger)
    assert isinstance(total, float)
    assert total == 1.75


def test_fraction_thirds_sum_to_one(ledger: PendingEntryLedger) -> None:
    made = reserve_all(ledger, [Fraction(1, 3)] * 3, symbols=1)
    assert gross(ledger) == 1
    with ledger.lock() as pending:
        assert pending.symbol_notional("S0") == 1
    made[0].release()
    assert gross(ledger) == Fraction(2, 3)


def test_many_denominators_then_back_to_whole_numbers(ledger: PendingEntryLedger) -> None:
    primes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
    made = reserve_all(ledger, [Fraction(1, p) for p in primes])
    assert gross(ledger) == sum(Fraction(1, p) for p in primes)
    for res in made:
        res.release()
    assert gross(ledger) == 0
    made = reserve_all(ledger, [5, 7])
    total = gross(ledger)
    assert total == 12
    # the kinds a ledger has seen are sticky: its sums keep one type (Fraction here)
    assert type(total) is Fraction
    assert type(ledger.stats().gross_notional) is Fraction
    assert made[0].notional == 5 and type(made[0].notional) is int  # each keeps its own type


def test_sum_type_is_stable_as_reservations_come_and_go(ledger: PendingEntryLedger) -> None:
    (f,) = reserve_all(ledger, [0.5])
    (i,) = reserve_all(ledger, [2])
    assert gross(ledger) == 2.5 and isinstance(gross(ledger), float)
    f.release()
    assert gross(ledger) == 2 and isinstance(gross(ledger), float)  # still a float ledger
    i.release()
    assert gross(ledger) == 0


def test_reduce_by_other_types_is_exact(ledger: PendingEntryLedger) -> None:
    (res,) = reserve_all(ledger, [1000])
    assert res.reduce(0.5)
    assert res.reduce(Decimal("0.25"))
    assert res.reduce(Fraction(1, 4))
    assert res.notional == 999
    assert gross(ledger) == 999
    assert res.reduce(Fraction(1, 3))
    assert Fraction(res.notional) == Fraction(2996, 3)
    assert res.reduce(Fraction(2996, 3))
    assert not res.active
    assert gross(ledger) == 0


def test_limits_and_positions_as_decimal_and_fraction(ledger: PendingEntryLedger) -> None:
    gate = PortfolioGate(
        ledger,
        PortfolioLimits(max_gross_exposure=Decimal("1000.01"), max_symbol_exposure=Fraction(1, 1)),
    )
    positions: Book = {"AAA": Decimal("-999.00"), "BBB": Fraction(1, 100)}
    # 999 + 0.01 + 1 == 1000.01 exactly: admitted
    assert gate.try_enter("CCC", Decimal(1), positions)
    assert gate.try_enter("DDD", Decimal("1e-18"), positions).reason is (
        DenyReason.MAX_GROSS_EXPOSURE
    )


def test_gate_gross_check_is_exact_with_mixed_types(ledger: PendingEntryLedger) -> None:
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=1))
    positions: Book = {"P": 0.5}
    assert gate.try_enter("A", Fraction(1, 3), positions)
    assert gate.try_enter("B", Fraction(1, 6), positions)  # exactly 1
    assert gate.try_enter("C", 5e-324, positions).reason is DenyReason.MAX_GROSS_EXPOSURE


def test_float_limit_compares_exactly(ledger: PendingEntryLedger) -> None:
    # 0.1 and 0.2 as floats add up to a little more than the float 0.3: exactness means denied
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=0.3))
    assert gate.try_enter("A", 0.1, {})
    assert gate.try_enter("B", 0.2, {}).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert Fraction(0.1) + Fraction(0.2) > Fraction(0.3)
    assert gate.try_enter("B", 0.19999999999999998, {})


@pytest.mark.parametrize(
    "amount",
    [1, 2.5, Decimal("3.75"), Fraction(7, 8)],
    ids=["int", "float", "Decimal", "Fraction"],
)
def test_every_numeric_type_is_accepted_by_the_gate(
    ledger: PendingEntryLedger, amount: Number
) -> None:
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=10))
    decision = gate.try_enter("A", amount, {"B": amount})
    assert decision
    assert decision.reservation is not None
    assert decision.reservation.notional == amount
