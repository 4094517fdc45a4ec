"""The one amount model of both backends: exact integers of units of ``10**-9``.

Every amount (a notional, a position's exposure, a limit, a partial fill) is turned into an
integer number of *units* before any lock is taken, and every sum is an integer sum, so totals
never drift and the gross is exactly 0 once everything is released. The Redis gate counts the
same units, so the two backends decide alike at every edge. The rules, chosen so rounding never
admits more than the exact amounts would:

* What counts *against* a limit rounds **up** (away from zero): a notional, a position's
  exposure. A reservation is never smaller than the order it stands for.
* A limit rounds **down**, and so does a partial fill (``Reservation.reduce``): what stays
  reserved is never less than what is still open.
* A ``float`` counts as the decimal it prints as (``repr``: ``0.1`` is ``0.1``, not
  ``0.1000000000000000055...``): the number a person typed or an exchange sent. So amounts with
  at most 9 decimals are exact, and ``0.1 + 0.2`` fits a limit of ``0.3``.
* Every amount and limit is below ``10**15`` (``MAX_AMOUNT``) in absolute value.

Accepted: ``int``, ``float``, ``Decimal``, ``Fraction`` and any other ``numbers.Real`` (numpy
scalars included; one that is not a float subclass counts as ``float(value)``). Refused with a
``ValueError`` or ``TypeError`` naming the argument and its value: NaN, infinities, ``bool``,
strings, ``None``, and amounts of ``10**15`` or more.

Read back (a reservation's notional, a sum), an amount comes in the kind the caller gave: see
``to_number``.
"""

from __future__ import annotations

import math
import numbers
import operator
from decimal import Decimal
from fractions import Fraction
from typing import Final

__all__ = ["MAX_AMOUNT", "SCALE", "SCALE_DIGITS"]

Number = int | float | Decimal | Fraction

SCALE_DIGITS: Final = 9
SCALE: Final = 10**SCALE_DIGITS
MAX_AMOUNT: Final = 10**15
_FLOAT_MAX: Final = 1e15
# Below this magnitude the spacing of floats is finer than one unit, so at most one multiple of
# a unit can round to a given float: if the nearest one does, it is the decimal repr() prints.
_FAST_FLOAT: Final = 4194304.0  # 2**22
_SCALE_F: Final = 1e9
_EXACT_FLOAT: Final = 2**53
# Ints this small times SCALE fit a machine word, so compiled code multiplies them inline (see
# _times).
_WORD_SAFE: Final = 4_000_000_000
# A Decimal this far below one unit is not expanded into a huge exact ratio.
_TINY_EXPONENT: Final = -(SCALE_DIGITS + 3)

# Kind bits: which kinds of amount a ledger has seen, OR-ed together (see to_number).
KIND_INT: Final = 0
KIND_FLOAT: Final = 1
KIND_DECIMAL: Final = 2
KIND_FRACTION: Final = 4


def check_symbol(symbol: object) -> str:
    """``symbol`` as an exact, non-empty ``str``."""
    if type(symbol) is str and symbol:
        return symbol
    return _exact_str("symbol", "'BTCUSDT'", symbol)


def check_order_id(order_id: object) -> str:
    """``order_id`` as an exact, non-empty ``str``."""
    if type(order_id) is str and order_id:
        return order_id
    return _exact_str("order_id", "'cl-42'", order_id)


def check_strategy(strategy: object) -> str:
    """``strategy`` as an exact, non-empty ``str``, or ``""`` for None (the account's own)."""
    if strategy is None:
        return ""
    if type(strategy) is str and strategy:
        return strategy
    return _exact_str("strategy", "'momentum'", strategy)


def _exact_str(name: str, example: str, value: object) -> str:
    """A str subclass copied to a plain str (so no caller ``__hash__`` runs), or the error."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty str such as {example}, got {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return str.__str__(value)


def kind_of(value: object) -> int:
    """The kind bit of an amount the caller gave (it picks the type amounts are read back in)."""
    if isinstance(value, float):
        return KIND_FLOAT
    if isinstance(value, Decimal):
        return KIND_DECIMAL
    if isinstance(value, Fraction):
        return KIND_FRACTION
    if isinstance(value, numbers.Integral):
        return KIND_INT
    return KIND_FLOAT


def units(name: str, value: object, up: bool) -> int:
    """``value`` in whole units, rounded away from zero (``up``) or toward -infinity."""
    if type(value) is float:
        return _float_units(name, value, up)
    if type(value) is int:
        if -_WORD_SAFE < value < _WORD_SAFE:
            return value * SCALE
        if -MAX_AMOUNT < value < MAX_AMOUNT:
            return _times(value, SCALE)
        raise ValueError(_too_large(name, value))
    return _other_units(name, value, up)


def notional_units(name: str, value: object) -> int:
    """A notional-like amount (finite, > 0) in units, rounded up: at least 1."""
    n = units(name, value, True)
    if n <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return n


def reduction_units(name: str, value: object) -> tuple[int, int]:
    """A partial fill (finite, > 0) in units, rounded down and rounded up (see ``after_fill``)."""
    up = notional_units(name, value)
    # min(): an odd Real may convert differently twice; down > up would leave a negative remainder.
    return min(units(name, value, False), up), up


def after_fill(reserved: int, down: int, up: int) -> int:
    """What stays reserved of ``reserved`` units after a fill of ``down`` to ``up`` units.

    Nothing once the fill rounded up covers what is reserved (a fill of the whole notional ends
    the reservation, whatever its rounding); else the fill rounded down is taken off, so what
    stays is never less than what is still open (fills of a third each may leave one unit).
    """
    return 0 if up >= reserved else reserved - down


def limit_units(name: str, value: object) -> int:
    """A limit (finite, >= 0) in units, rounded down."""
    n = units(name, value, False)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return n


def to_number(n: int, kinds: int) -> Number:
    """``n`` units in the kind of amount the caller gave.

    ``kinds`` is one kind bit, or several OR-ed (a sum over amounts of several kinds): any
    ``Fraction`` gives a ``Fraction``; else any ``Decimal`` a ``Decimal``; else any ``float`` a
    float (``n / 10**9``, correctly rounded: the decimal it prints as); else an ``int`` when the
    amount is whole, a ``Decimal`` when a fraction of a unit was involved.
    """
    if kinds & KIND_FRACTION:
        return Fraction(n, SCALE)
    if kinds & KIND_DECIMAL:
        return _decimal(n)
    if kinds & KIND_FLOAT:
        # float(n) is exact below 2**53; past it, a Decimal's float() is correctly rounded.
        return float(n) / _SCALE_F if -_EXACT_FLOAT < n < _EXACT_FLOAT else float(_decimal(n))
    if n % SCALE == 0:
        return n // SCALE
    return _decimal(n)


def _decimal(n: int) -> Decimal:
    """``n`` units as a Decimal without trailing zeros, exact whatever the caller's context."""
    exponent = -SCALE_DIGITS
    while exponent < 0 and n % 10 == 0:
        n //= 10
        exponent += 1
    return Decimal(f"{n}e{exponent}") if exponent else Decimal(n)


def _float_units(name: str, value: float, up: bool) -> int:
    if -_FAST_FLOAT < value < _FAST_FLOAT:
        # The nearest whole number of units, checked by converting back (all exact below 2**53;
        # int() and float() compile to C, where round() would be a call into Python).
        scaled = value * _SCALE_F
        n = int(scaled + 0.5) if scaled >= 0 else -int(0.5 - scaled)
        if float(n) / _SCALE_F == value:
            return n
    elif not -_FLOAT_MAX < value < _FLOAT_MAX:
        if math.isfinite(value):
            raise ValueError(_too_large(name, value))
        raise ValueError(f"{name} must be finite, got {value!r}")
    elif value == math.floor(value):
        return _times(int(value), SCALE)
    return _ratio_units(Decimal(repr(value)).as_integer_ratio(), up)


def _other_units(name: str, value: object, up: bool) -> int:
    if isinstance(value, bool):
        raise TypeError(_not_a_number(name, value))
    if isinstance(value, float):  # a subclass, such as numpy.float64
        return _float_units(name, float(value), up)
    if isinstance(value, Decimal):
        return _decimal_units(name, value, up)
    if isinstance(value, Fraction):
        if abs(value) >= MAX_AMOUNT:
            raise ValueError(_too_large(name, value))
        return _ratio_units((value.numerator, value.denominator), up)
    if isinstance(value, numbers.Integral):
        return units(name, int(value), up)
    if isinstance(value, numbers.Real):
        return _float_units(name, float(value), up)
    raise TypeError(_not_a_number(name, value))


def _not_a_number(name: str, value: object) -> str:
    return f"{name} must be a real number (int, float, Decimal or Fraction), got {value!r}"


def _decimal_units(name: str, value: Decimal, up: bool) -> int:
    if not value.is_finite():
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not value:
        return 0
    if value.adjusted() >= 15:
        raise ValueError(_too_large(name, value))
    if value.adjusted() < _TINY_EXPONENT:  # less than a unit: one unit, or none
        if value > 0:
            return 1 if up else 0
        return -1
    return _ratio_units(value.as_integer_ratio(), up)


def _ratio_units(ratio: tuple[int, int], up: bool) -> int:
    num, den = ratio
    scaled = _times(num, SCALE)
    if up and num >= 0:
        return -_floor_divide(-scaled, den)
    return _floor_divide(scaled, den)


def _times(a: int, b: int) -> int:
    """``a * b`` for ints that may not fit a machine word.

    Compiled, ``a * b`` on such ints goes to CPython's long multiplication, which runs pending
    signal handlers; mypyc takes the NULL it then returns for an out-of-memory error and aborts
    the process (a Ctrl-C during a conversion would kill the bot). ``operator.mul`` is an
    ordinary call, whose exception propagates. Only ``_units`` multiplies or divides amounts.
    """
    product: int = operator.mul(a, b)
    return product


def _floor_divide(a: int, b: int) -> int:
    """``a // b`` as an ordinary call, for the same reason as ``_times``."""
    quotient: int = operator.floordiv(a, b)
    return quotient


def _too_large(name: str, value: object) -> str:
    return f"{name} must be below 1e15 in absolute value, got {value!r}"
