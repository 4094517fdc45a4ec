"""The amount model: exact integer units of 1e-9, int/float/Decimal/Fraction mixed in one ledger.

What counts against a limit rounds up (away from zero), limits round down, a float counts as
the decimal it prints as (``repr``), amounts of 1e15 or more are refused, and sums come back in
the kind of the amounts given. ``ref_units`` below is the exact reference the model is held to.
"""

from __future__ import annotations

import decimal
import math
import numbers
import random
from decimal import Decimal
from fractions import Fraction
from typing import cast

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pendingledger import (
    DenyReason,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Reservation,
    ReservationState,
    _units,
)

Number = int | float | Decimal | Fraction
Book = dict[str, Number]

SCALE = 10**9
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(PROPERTY, max_examples=2000)


def exact(value: Number) -> Fraction:
    """The exact value an amount stands for: a float is the decimal its repr prints."""
    if isinstance(value, float):
        return Fraction(Decimal(repr(value)))
    return Fraction(value)


def ref_units(value: Number, up: bool) -> int:
    """The reference: ``value`` in units, away from zero (``up``) or floored, computed exactly."""
    scaled = exact(value) * SCALE
    if up and scaled >= 0:
        return math.ceil(scaled)
    if up:
        return -math.ceil(-scaled)
    return math.floor(scaled)


def too_large(value: Number) -> bool:
    """Whether the model must refuse ``value`` (|value| >= 1e15)."""
    return abs(exact(value)) >= 10**15


def reserve_all(
    ledger: PendingEntryLedger, amounts: list[Number], symbols: int = 7
) -> list[Reservation]:
    """Reserve every amount in one block, spread over ``symbols`` symbols."""
    with ledger.lock() as pending:
        return [pending.reserve(f"S{i % symbols}", a) for i, a in enumerate(amounts)]


def gross(ledger: PendingEntryLedger) -> Number:
    """The ledger's reserved total as the PendingMap reports it."""
    with ledger.lock() as pending:
        return pending.gross_notional()


class Real32:
    """A ``numbers.Real`` that is not a float subclass (as ``numpy.float32`` is not)."""

    def __init__(self, value: float) -> None:
        self._value = value

    def __float__(self) -> float:
        return self._value

    def __repr__(self) -> str:
        return f"Real32({self._value!r})"


numbers.Real.register(Real32)


def real32(value: float) -> float:
    """A ``Real32`` typed as the float it stands for, so the typed API accepts it."""
    return cast(float, Real32(value))


# ---------------------------------------------------------------------------- the unit, exactly


@pytest.mark.parametrize(
    ("value", "up", "expected"),
    [
        (0.1, True, 100_000_000),
        (0.1, False, 100_000_000),
        (-0.1, True, -100_000_000),
        (Fraction(1, 3), True, 333_333_334),
        (Fraction(1, 3), False, 333_333_333),
        (Fraction(-1, 3), True, -333_333_334),
        (Fraction(-1, 3), False, -333_333_334),
        (Decimal("0.0000000015"), True, 2),
        (Decimal("0.0000000015"), False, 1),
        (Decimal("1E-400"), True, 1),
        (Decimal("1E-400"), False, 0),
        (Decimal("-1E-400"), True, -1),
        (Decimal("-1E-400"), False, -1),
        (5e-324, True, 1),
        (5e-324, False, 0),
        (1e-10, True, 1),
        (4194304.1, True, 4_194_304_100_000_000),  # past the float fast path
        (123456789.123456789, True, 123_456_789_123_456_790),  # repr: 123456789.12345679
        (999999999999999.9, True, 999_999_999_999_999_900_000_000),
        (-0.0, True, 0),
        (7, False, 7 * SCALE),
    ],
)
def test_known_amounts_in_units(value: Number, up: bool, expected: int) -> None:
    """Worked examples of the rounding rules, each checked against the exact reference too."""
    assert _units.units("amount", value, up) == expected
    assert ref_units(value, up) == expected


def test_a_float_counts_as_the_decimal_it_prints_as() -> None:
    """0.1 is 100000000 units exactly, though the binary float is a little more than 0.1."""
    assert Fraction(0.1) > Fraction(1, 10)
    assert _units.notional_units("notional", 0.1) == 100_000_000
    assert _units.limit_units("limit", 0.1) == 100_000_000
    assert _units.units("x", 0.1, True) + _units.units("x", 0.2, True) == _units.units(
        "x", 0.3, False
    )


@pytest.mark.parametrize(
    "value",
    [10**15, -(10**15), 1e15, -1e15, 1e308, Decimal("1E+15"), Fraction(10**15), 2**64],
    ids=repr,
)
def test_amounts_of_1e15_or_more_are_refused(value: Number) -> None:
    """|x| >= 1e15 is refused with a ValueError naming the argument, whatever its kind."""
    for up in (True, False):
        with pytest.raises(ValueError, match=r"amount must be below 1e15"):
            _units.units("amount", value, up)


@pytest.mark.parametrize(
    "value",
    [
        10**15 - 1,
        999999999999999.9,
        Decimal("999999999999999.999999999"),
        Fraction(10**24 - 1, 10**9),
    ],
    ids=repr,
)
def test_amounts_just_below_1e15_are_accepted(value: Number) -> None:
    """The bound is strict: anything below 1e15 is an amount."""
    assert _units.units("amount", value, True) == ref_units(value, True)
    assert _units.units("amount", value, False) == ref_units(value, False)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (Decimal("NaN"), ValueError),
        (Decimal("sNaN"), ValueError),
        (Decimal("-Infinity"), ValueError),
        (True, TypeError),
        ("1", TypeError),
        (None, TypeError),
        (1j, TypeError),
    ],
    ids=repr,
)
def test_what_is_not_a_finite_real_is_refused(value: object, error: type[Exception]) -> None:
    """NaN, infinities, bools, strings, None and complex numbers are not amounts."""
    with pytest.raises(error, match="amount"):
        _units.units("amount", value, True)


def test_notionals_are_positive_and_limits_non_negative() -> None:
    """A notional must be > 0 and at least one unit after rounding up; a limit must be >= 0."""
    assert _units.notional_units("notional", Decimal("1E-400")) == 1
    for bad in (0, -1, 0.0, Decimal("-1E-400")):
        with pytest.raises(ValueError, match=r"notional must be > 0"):
            _units.notional_units("notional", bad)
    assert _units.limit_units("limit", 0) == 0
    assert _units.limit_units("limit", Decimal("1E-400")) == 0  # rounds down to no room at all
    with pytest.raises(ValueError, match=r"limit must be >= 0"):
        _units.limit_units("limit", -0.5)


def test_sums_come_back_in_the_kind_of_the_amounts_given() -> None:
    """to_number: any Fraction wins, then Decimal, then float; ints stay ints when whole."""
    k = _units
    n = 2_500_000_000  # 2.5
    assert to_pair(k.to_number(n, k.KIND_FRACTION | k.KIND_FLOAT)) == (Fraction, Fraction(5, 2))
    assert to_pair(k.to_number(n, k.KIND_DECIMAL | k.KIND_FLOAT)) == (Decimal, Decimal("2.5"))
    assert to_pair(k.to_number(n, k.KIND_FLOAT | k.KIND_INT)) == (float, 2.5)
    assert to_pair(k.to_number(3 * SCALE, k.KIND_INT)) == (int, 3)
    assert to_pair(k.to_number(n, k.KIND_INT)) == (Decimal, Decimal("2.5"))  # a reduced int
    assert to_pair(k.to_number(1, k.KIND_FLOAT)) == (float, 1e-9)


def to_pair(value: object) -> tuple[type, object]:
    """A value with its exact type, so ``2.5 == Decimal('2.5')`` cannot pass for a type check."""
    return type(value), value


# ---------------------------------------------------------------------------- property tests


@MANY
@given(st.floats(allow_nan=False, allow_infinity=False), st.booleans())
@example(0.1, True)
@example(5e-324, True)
@example(-5e-324, False)
@example(4194303.999999999, True)
@example(4194304.000000001, True)
@example(1e15, True)
@example(math.nextafter(1e15, 0.0), False)
def test_float_units_match_the_exact_reference(value: float, up: bool) -> None:
    """Any float: the fast and the slow path give what exact arithmetic on its repr gives."""
    if too_large(value):
        with pytest.raises(ValueError, match="below 1e15"):
            _units.units("amount", value, up)
    else:
        assert _units.units("amount", value, up) == ref_units(value, up)


@st.composite
def near_unit_multiples(draw: st.DrawFn) -> float:
    """Floats at, or a few ulps either side of, k * 1e-9, up to 16 times past the fast path's
    bound (2**22), where floats are coarser than a unit and a wider fast path would go wrong."""
    whole = draw(st.integers(0, 2**26))
    nanos = draw(st.integers(0, SCALE - 1))
    value = draw(st.sampled_from([1, -1])) * (whole * SCALE + nanos) / SCALE
    for _ in range(draw(st.integers(0, 3))):
        value = math.nextafter(value, draw(st.sampled_from([math.inf, -math.inf])))
    return value


@MANY
@given(near_unit_multiples(), st.booleans())
def test_float_fast_path_is_exact_at_its_edges(value: float, up: bool) -> None:
    """At and next to multiples of a unit, inside and past the fast path, units are exact."""
    assert _units.units("amount", value, up) == ref_units(value, up)


@PROPERTY
@given(st.floats(min_value=-1e15, max_value=1e15, exclude_min=True, exclude_max=True))
@example(214945179.78125)  # 2.1e17 units: past 2**53, where float(n) / 1e9 rounds twice
@example(-987654321.123456789)
def test_an_exact_float_reads_back_as_itself(value: float) -> None:
    """A float whose repr needs at most 9 decimals is exact in units and reads back unchanged."""
    n = _units.units("amount", value, True)
    if (exact(value) * SCALE).denominator == 1:
        assert n == _units.units("amount", value, False)
        assert _units.to_number(n, _units.KIND_FLOAT) == value


@PROPERTY
@given(st.integers(-(10**24), 10**24))
@example(214945179781250000)
@example(2**53 + 1)
@example(10**24 - 1)
def test_float_read_back_is_correctly_rounded(n: int) -> None:
    """n units read back as a float are n / 1e9 rounded once, as exact arithmetic rounds it,
    also past 2**53 units (about 9e6), where converting n to a float first would round twice."""
    assert _units.to_number(n, _units.KIND_FLOAT) == float(Fraction(n, SCALE))


def test_float_sums_past_2_53_units_read_back_correctly_rounded(
    ledger: PendingEntryLedger,
) -> None:
    """A float sum of 2.1e17 units reads back as the float of the exact decimal sum, on both
    builds (correctly rounded, as CPython's int / int is)."""
    amounts = [214945179.78125, 12345678.9]
    reserve_all(ledger, list(amounts))
    expected = float(sum((exact(a) for a in amounts), Fraction(0)))
    assert to_pair(gross(ledger)) == (float, expected)
    assert to_pair(ledger.stats().gross_notional) == (float, expected)
    rng = random.Random(53)
    for _ in range(2000):
        n = rng.randrange(2**53, 10**24)
        assert _units.to_number(n, _units.KIND_FLOAT) == float(Fraction(n, SCALE)), n


@st.composite
def decimals(draw: st.DrawFn) -> Decimal:
    """Finite Decimals over a wide range of digits and exponents (not so wide they are slow)."""
    sign = draw(st.integers(0, 1))
    digits = draw(st.integers(0, 10**40))
    exponent = draw(st.integers(-60, 20))
    return Decimal((sign, tuple(int(d) for d in str(digits)), exponent))


@PROPERTY
@given(decimals(), st.booleans())
@example(Decimal("1E-400"), True)
@example(Decimal("-1E-13"), False)
@example(Decimal("1E-12"), True)
@example(Decimal("-0"), True)
def test_decimal_units_match_the_exact_reference(value: Decimal, up: bool) -> None:
    """Decimals of any exponent round exactly as the rules say (including the tiny shortcut)."""
    if too_large(value):
        with pytest.raises(ValueError, match="below 1e15"):
            _units.units("amount", value, up)
    else:
        assert _units.units("amount", value, up) == ref_units(value, up)


@PROPERTY
@given(st.fractions(), st.booleans())
@example(Fraction(1, 3**630), True)
def test_fraction_units_match_the_exact_reference(value: Fraction, up: bool) -> None:
    """Fractions, denominators of any size: no cap, rounded as the rules say."""
    if too_large(value):
        with pytest.raises(ValueError, match="below 1e15"):
            _units.units("amount", value, up)
    else:
        assert _units.units("amount", value, up) == ref_units(value, up)


@PROPERTY
@given(st.integers(), st.booleans())
@example(10**15 - 1, True)
@example(-(10**15), True)
def test_int_units_match_the_exact_reference(value: int, up: bool) -> None:
    """Ints are exact below 1e15 and refused from there on."""
    if too_large(value):
        with pytest.raises(ValueError, match="below 1e15"):
            _units.units("amount", value, up)
    else:
        assert _units.units("amount", value, up) == value * SCALE


@PROPERTY
@given(st.one_of(st.floats(-1e14, 1e14), decimals(), st.fractions(-(10**14), 10**14)))
def test_limits_round_down_and_notionals_round_up(value: Number) -> None:
    """floor(x) <= x <= away-from-zero(x), in units, and they differ by at most one unit."""
    if too_large(value):
        return
    down = _units.units("amount", value, False)
    up = _units.units("amount", value, True)
    scaled = exact(value) * SCALE
    assert down <= scaled
    assert abs(up) >= abs(scaled)
    assert abs(up - down) <= 1


# ---------------------------------------------------------------------------- through the ledger


def test_mixed_types_in_one_ledger_sum_exactly(ledger: PendingEntryLedger) -> None:
    """Mixed kinds add up exactly in units (each rounded up); any Fraction makes a Fraction sum."""
    amounts: list[Number] = [100, 0.1, Decimal("0.2"), Fraction(1, 3), 2.5, Decimal("1e-20")]
    made = reserve_all(ledger, amounts)
    expected = Fraction(sum(ref_units(a, True) for a in amounts), SCALE)
    assert expected == Fraction("102.800000000") + Fraction(333333334 + 1, SCALE)
    assert to_pair(gross(ledger)) == (Fraction, expected)
    assert to_pair(ledger.stats().gross_notional) == (Fraction, expected)
    for res, amount in zip(made, amounts, strict=True):
        assert to_pair(res.notional) == to_pair(amount)  # each keeps its caller's value and type
    for res in made:
        assert res.release()
    assert gross(ledger) == 0
    assert ledger.stats().gross_notional == 0


def test_gross_is_exactly_zero_after_everything_is_released(ledger: PendingEntryLedger) -> None:
    """Whatever is reserved and released in any order, nothing is left over."""
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
    """0.1 + 0.2 - 0.1 is 0.2 here, not 0.20000000000000004, however often it is repeated."""
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


def test_many_float_reservations_sum_to_their_decimal_sum(ledger: PendingEntryLedger) -> None:
    """Floats with at most 9 decimals are exact units: their sum is the float of the exact
    decimal sum (not a drifting running float), over any subset left outstanding."""
    rng = random.Random(2024)
    amounts = [rng.randint(1, 10**12) / 10 ** rng.randint(0, 9) for _ in range(10_000)]

    def decimal_sum(values: list[float]) -> float:
        return float(sum((exact(v) for v in values), Fraction(0)))

    made = reserve_all(ledger, list(amounts), symbols=50)
    total = gross(ledger)
    assert isinstance(total, float)
    assert total == decimal_sum(amounts)
    keep = set(rng.sample(range(len(made)), len(made) // 2))
    for i, res in enumerate(made):
        if i not in keep:
            res.release()
    assert gross(ledger) == decimal_sum([amounts[i] for i in keep])
    with ledger.lock() as pending:
        for s in range(50):
            assert pending.symbol_notional(f"S{s}") == decimal_sum(
                [amounts[i] for i in keep if i % 50 == s]
            )
    for i in keep:
        made[i].release()
    assert gross(ledger) == 0


def test_extreme_floats_round_up_or_are_refused(ledger: PendingEntryLedger) -> None:
    """Tiny floats count one unit each (never zero); 1e15 and beyond are refused outright."""
    tiny: list[Number] = [5e-324, 1e-300, 2.0**-1074, 1e-10]
    made = reserve_all(ledger, tiny)
    assert gross(ledger) == 4e-9
    assert [res.notional for res in made] == tiny  # read back as given
    big = 999999999999999.9
    reserve_all(ledger, [big])
    assert gross(ledger) == (999999999999999900000000 + 4) / SCALE
    before = ledger.stats()
    for value in (1e15, 1e16, 1e300, -1e300):
        with pytest.raises(ValueError, match=r"notional must be below 1e15"), ledger.lock() as p:
            p.reserve("X", value)
    assert ledger.stats() == before


def test_two_1e308_floats_are_refused_instead_of_overflowing(ledger: PendingEntryLedger) -> None:
    """1e308 + 1e308 would overflow a float sum to inf; each is refused before it is added."""
    gate = PortfolioGate(ledger, PortfolioLimits())
    with pytest.raises(ValueError, match="below 1e15"):
        gate.try_enter("A", 1e308)
    with pytest.raises(ValueError, match="below 1e15"), ledger.lock() as pending:
        pending.reserve("B", 1e308)
    with pytest.raises(ValueError, match="below 1e15"):
        gate.try_enter("C", 1, {"P": 1e308, "Q": 1e308})
    with pytest.raises(ValueError, match="below 1e15"):
        gate.set_position("P", 1e308)
    with pytest.raises(ValueError, match="below 1e15"):
        PortfolioLimits(max_gross_exposure=1e308)
    stats = ledger.stats()
    assert (stats.outstanding, stats.gross_notional, stats.reserved) == (0, 0, 0)


def test_a_1000_bit_fraction_is_accepted_and_rounded(ledger: PendingEntryLedger) -> None:
    """No cap on denominators: a ~1000-bit Fraction reserves its value rounded up to a unit."""
    big = 3**630
    amount = Fraction(big + 1, big)  # 1 + a hair
    assert amount.denominator.bit_length() > 998
    (res,) = reserve_all(ledger, [amount])
    assert res.notional == amount  # read back unchanged
    assert to_pair(gross(ledger)) == (Fraction, Fraction(SCALE + 1, SCALE))
    # A limit of 2 - 1/big rounds down to 1999999999 units: room for 999999998 more.
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=Fraction(2 * big - 1, big)))
    assert gate.try_enter("B", Fraction(999_999_998, SCALE))
    assert gate.try_enter("C", Fraction(1, big)).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert res.release()
    assert to_pair(gross(ledger)) == (Fraction, Fraction(999_999_998, SCALE))


def test_many_tiny_fractions_with_unrelated_denominators_are_accepted(
    ledger: PendingEntryLedger,
) -> None:
    """v1 refused a common denominator past 4096 bits; units have no denominator to grow."""
    primes = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    made = reserve_all(ledger, [Fraction(1, p**150) for p in primes])
    assert gross(ledger) == Fraction(len(primes), SCALE)  # one unit each
    for res in made:
        assert res.release()
    assert gross(ledger) == 0


def test_decimal_1e_minus_400_limit_is_accepted_and_leaves_no_room(
    ledger: PendingEntryLedger,
) -> None:
    """A limit finer than a unit rounds down to 0: accepted, and nothing (>= 1 unit) fits."""
    limits = PortfolioLimits(
        max_gross_exposure=Decimal("1E-400"), max_symbol_exposure=Decimal("1E-400")
    )
    gate = PortfolioGate(ledger, limits)
    assert gate.limits.max_gross_exposure == Decimal("1E-400")
    assert gate.try_enter("A", Decimal("1E-400")).reason is DenyReason.MAX_GROSS_EXPOSURE
    gate.limits = PortfolioLimits(max_symbol_exposure=Decimal("1E-400"))
    assert gate.try_enter("A", 1e-9).reason is DenyReason.MAX_SYMBOL_EXPOSURE
    gate.limits = PortfolioLimits(max_gross_exposure=Decimal("1E-9"))
    decision = gate.try_enter("A", Decimal("1E-400"))  # one unit: exactly the limit
    assert decision.reservation is not None
    assert decision.reservation.notional == Decimal("1E-400")
    assert to_pair(gross(ledger)) == (Decimal, Decimal("1E-9"))


def test_decimal_sums_come_back_as_decimal(ledger: PendingEntryLedger) -> None:
    """Decimal amounts sum to a Decimal, exactly."""
    reserve_all(ledger, [Decimal("0.1"), Decimal("0.1"), Decimal("0.1")])
    total = gross(ledger)
    assert isinstance(total, Decimal)
    assert total == Decimal("0.3")  # binary floats would give 0.30000000000000004
    stats = ledger.stats()
    assert isinstance(stats.gross_notional, Decimal)
    assert stats.gross_notional == Decimal("0.3")


def test_decimal_with_ints_is_decimal_and_keeps_every_digit(ledger: PendingEntryLedger) -> None:
    """Fifteen integer digits and nine decimals survive a sum with ints."""
    reserve_all(ledger, [Decimal("123456789012345.123456789"), 10, Decimal("0.000000001")])
    assert to_pair(gross(ledger)) == (Decimal, Decimal("123456789012355.12345679"))


def test_reading_back_a_decimal_ignores_the_callers_decimal_context(
    ledger: PendingEntryLedger,
) -> None:
    """A sum read back is the exact one, whatever precision the caller's decimal context has:
    amounts are exact units, so reading them must not round."""
    with decimal.localcontext() as ctx:
        ctx.prec = 6
        (res,) = reserve_all(ledger, [Decimal("1234.56789")])
        assert gross(ledger) == Decimal("1234.56789")
        assert ledger.stats().gross_notional == Decimal("1234.56789")
        assert res.reduce(Decimal("0.00001"))
        assert res.notional == Decimal("1234.56788")


def test_decimal_reduce_stays_decimal(ledger: PendingEntryLedger) -> None:
    """A Decimal reservation reduced by a Decimal reads back as the exact Decimal remainder."""
    (res,) = reserve_all(ledger, [Decimal("100.50")])
    assert res.reduce(Decimal("0.25"))
    assert isinstance(res.notional, Decimal)
    assert res.notional == Decimal("100.25")
    assert gross(ledger) == Decimal("100.25")


def test_ints_sum_to_an_int(ledger: PendingEntryLedger) -> None:
    """Int amounts sum to an int, up to just below 1e15 each."""
    reserve_all(ledger, [1, 2, 3, 10**15 - 1])
    assert to_pair(gross(ledger)) == (int, 10**15 + 5)


def test_floats_sum_to_a_float(ledger: PendingEntryLedger) -> None:
    """Floats (with ints) sum to a float."""
    reserve_all(ledger, [0.5, 0.25, 1])
    assert to_pair(gross(ledger)) == (float, 1.75)


def test_fraction_thirds_round_up_never_below_the_exact_sum(ledger: PendingEntryLedger) -> None:
    """Each third reserves ceil(1e9/3) units: three of them hold 2 units more than 1, never less."""
    made = reserve_all(ledger, [Fraction(1, 3)] * 3, symbols=1)
    assert gross(ledger) == Fraction(3 * 333_333_334, SCALE)
    assert gross(ledger) > 1
    with ledger.lock() as pending:
        assert pending.symbol_notional("S0") == Fraction(1_000_000_002, SCALE)
    made[0].release()
    assert gross(ledger) == Fraction(666_666_668, SCALE)
    assert gross(ledger) >= Fraction(2, 3)


def test_many_denominators_then_back_to_whole_numbers(ledger: PendingEntryLedger) -> None:
    """1/p for many primes each round up; once released, whole amounts sum exactly, and the
    kinds a ledger has seen are sticky: its sums stay Fractions."""
    primes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
    made = reserve_all(ledger, [Fraction(1, p) for p in primes])
    assert gross(ledger) == Fraction(sum(-(-SCALE // p) for p in primes), SCALE)
    for res in made:
        res.release()
    assert gross(ledger) == 0
    made = reserve_all(ledger, [5, 7])
    assert to_pair(gross(ledger)) == (Fraction, Fraction(12))
    assert type(ledger.stats().gross_notional) is Fraction
    assert to_pair(made[0].notional) == (int, 5)  # each keeps its own type


def test_sum_type_is_stable_as_reservations_come_and_go(ledger: PendingEntryLedger) -> None:
    """Once a float was reserved, sums are floats even after it is gone."""
    (f,) = reserve_all(ledger, [0.5])
    (i,) = reserve_all(ledger, [2])
    assert to_pair(gross(ledger)) == (float, 2.5)
    f.release()
    assert to_pair(gross(ledger)) == (float, 2.0)  # still a float ledger
    i.release()
    assert gross(ledger) == 0


def test_reduce_by_other_types_is_exact_in_units(ledger: PendingEntryLedger) -> None:
    """Partial fills of any kind subtract their units rounded down; one that, rounded up,
    covers what remains fills it. An int reservation left with a fraction of a unit reads back
    as a Decimal."""
    (res,) = reserve_all(ledger, [1000])
    assert res.reduce(0.5)
    assert res.reduce(Decimal("0.25"))
    assert res.reduce(Fraction(1, 4))
    assert to_pair(res.notional) == (int, 999)
    assert to_pair(gross(ledger)) == (Fraction, Fraction(999))
    assert res.reduce(Fraction(1, 3))  # 333333333 units: a partial fill rounds down
    assert to_pair(res.notional) == (Decimal, Decimal("998.666666667"))
    assert res.reduce(Fraction(2996, 3))  # rounded up, it covers what remains: filled
    assert res.state is ReservationState.FILLED
    assert to_pair(res.notional) == (Decimal, Decimal("998.666666667"))  # what it held
    assert gross(ledger) == 0


def test_partial_fills_never_leave_less_reserved_than_the_order_still_open(
    ledger: PendingEntryLedger,
) -> None:
    """What stays reserved after partial fills is at least what the order still has open: a
    reservation is never smaller than the order it stands for (the side rounding must err on)."""
    (res,) = reserve_all(ledger, [1])
    assert res.reduce(Fraction(1, 3))
    assert res.reduce(Fraction(1, 3))
    assert res.active
    assert gross(ledger) == Fraction(333_333_334, SCALE)  # not 333333332: fills round down
    assert res.reduce(Fraction(1, 3))  # the last third, rounded up, covers what remains
    assert res.state is ReservationState.FILLED
    assert gross(ledger) == 0


@pytest.mark.parametrize(
    "notional",
    [Fraction(1, 3), Decimal("0.1234567891"), 1e-10],
    ids=repr,
)
def test_a_fill_of_the_whole_notional_ends_the_reservation(
    ledger: PendingEntryLedger, notional: Number
) -> None:
    """reduce(amount) with an amount at least what remains ends the reservation as filled, as
    its docstring says, also when the notional is finer than a unit: a fill of exactly the
    order's notional must not leave a unit reserved until the TTL."""
    (res,) = reserve_all(ledger, [notional])
    assert res.reduce(notional)
    assert res.state is ReservationState.FILLED
    assert ledger.stats().outstanding == 0


def test_limits_and_positions_as_decimal_and_fraction(ledger: PendingEntryLedger) -> None:
    """Decimal and Fraction limits and exposures decide exactly at the edge."""
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


def test_gate_gross_check_counts_in_units_with_mixed_types(ledger: PendingEntryLedger) -> None:
    """1/3 reserves 333333334 units; with 0.166666666 and a 0.5 position that is exactly 1."""
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=1))
    positions: Book = {"P": 0.5}
    assert gate.try_enter("A", Fraction(1, 3), positions)
    assert gate.try_enter("B", Fraction(1, 6), positions).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert gate.try_enter("B", Decimal("0.166666666"), positions)  # exactly 1
    assert gate.try_enter("C", 5e-324, positions).reason is DenyReason.MAX_GROSS_EXPOSURE


def test_point_one_plus_point_two_fits_a_limit_of_point_three(ledger: PendingEntryLedger) -> None:
    """Floats count as their repr: 0.1 + 0.2 == 0.3 in units, though not in binary floats."""
    assert 0.1 + 0.2 > 0.3
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=0.3))
    assert gate.try_enter("A", 0.1)
    assert gate.try_enter("B", 0.2)
    assert gate.try_enter("C", 1e-9).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert ledger.stats().gross_notional == 0.3


@pytest.mark.parametrize(
    "amount",
    [1, 2.5, Decimal("3.75"), Fraction(7, 8)],
    ids=["int", "float", "Decimal", "Fraction"],
)
def test_every_numeric_type_is_accepted_by_the_gate(
    ledger: PendingEntryLedger, amount: Number
) -> None:
    """Each kind works as a notional and as an exposure, and reads back as given."""
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=10))
    decision = gate.try_enter("A", amount, {"B": amount})
    assert decision
    assert decision.reservation is not None
    assert to_pair(decision.reservation.notional) == to_pair(amount)


def test_a_real_that_is_not_a_float_counts_as_its_float(ledger: PendingEntryLedger) -> None:
    """A numbers.Real outside int/float/Decimal/Fraction counts as float(value), by its repr."""
    amount = real32(0.10000000149011612)  # float(numpy.float32(0.1))
    assert _units.units("amount", amount, True) == 100_000_002
    assert _units.units("amount", amount, False) == 100_000_001
    (res,) = reserve_all(ledger, [amount])
    assert res.notional is amount  # read back as given
    assert to_pair(gross(ledger)) == (float, 0.100000002)
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=real32(0.3)))
    assert gate.try_enter("B", 0.199999998)
    assert gate.try_enter("C", 1e-9).reason is DenyReason.MAX_GROSS_EXPOSURE
    with pytest.raises(ValueError, match="below 1e15"):
        _units.units("amount", Real32(1e308), True)
    with pytest.raises(ValueError, match="finite"):
        _units.units("amount", Real32(math.nan), True)


def test_numpy_scalars_are_amounts(ledger: PendingEntryLedger) -> None:
    """numpy scalars, if numpy is installed: float64 is a float, float32 counts as its float,
    and integer scalars as ints."""
    np = pytest.importorskip("numpy")
    assert _units.units("amount", np.float64(0.1), True) == 100_000_000
    assert _units.units("amount", np.float32(0.1), True) == 100_000_002
    assert _units.units("amount", np.int64(7), True) == 7 * SCALE
    with pytest.raises(ValueError, match="below 1e15"):
        _units.units("amount", np.float64(1e308), True)
    reserve_all(ledger, [np.float64(0.1), np.float64(0.2)])
    gate = PortfolioGate(ledger, PortfolioLimits(max_gross_exposure=np.float64(0.3)))
    assert gate.try_enter("X", 1e-9).reason is DenyReason.MAX_GROSS_EXPOSURE
    assert to_pair(ledger.stats().gross_notional) == (float, 0.3)
