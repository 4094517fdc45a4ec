"""Amounts as exact integers of units for the Redis store.

Redis' Lua numbers are doubles, so amounts never travel or add up as floats there. Each amount is
turned here, client-side, into an integer number of *units*: one unit is ``10**-9`` of the account
currency (``SCALE_DIGITS = 9``). The rules, chosen so rounding never admits more than the exact
amounts would:

* What counts *against* a limit rounds **up**: a notional, a position exposure (its absolute
  value), a restored order. A reservation is never smaller than the order it stands for.
* A limit rounds **down**.
* A partial fill passed to ``reduce`` leaves the reservation at ``ceil(remaining)``, where
  ``remaining`` is the exact initial notional minus the exact sum of the reductions, so what stays
  reserved is never less than what is still unfilled, and an exact full fill reaches zero.
* A ``float`` is taken as the decimal it prints as (``repr``: ``0.1`` is ``0.1``, not
  ``0.1000000000000000055...``). That is the number a person typed or an exchange sent; amounts
  with at most 9 decimals are therefore exact.
* Every amount and limit must be below ``10**15`` (``MAX_AMOUNT``) in absolute value, else
  ``ValueError``: the server keeps totals exact below ``2**53`` whole units (about ``9e15``) and
  refuses (fails closed) a total that would pass that.

Bad input is rejected here with the same messages the in-process gate uses, before anything is
sent to Redis.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal
from fractions import Fraction
from typing import Final

__all__ = ["MAX_AMOUNT", "SCALE", "SCALE_DIGITS"]

SCALE_DIGITS: Final = 9
SCALE: Final = 10**SCALE_DIGITS
MAX_AMOUNT: Final = 10**15
_MAX_UNITS: Final = MAX_AMOUNT * SCALE
_FLOAT_MAX: Final = float(MAX_AMOUNT)

Number = int | float | Decimal | Fraction


def exact(name: str, value: object) -> Fraction:
    """``value`` as an exact ``Fraction`` (floats by their ``repr``); raise for a non-number."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number (int, float, Decimal or Fraction), got {value!r}")
    if isinstance(value, int):
        result = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if abs(value) >= _FLOAT_MAX:
            raise ValueError(_too_large(name, value))
        result = Fraction(Decimal(repr(value)))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{name} must be finite, got {value!r}")
        if value and value.adjusted() >= 15:
            raise ValueError(_too_large(name, value))
        result = Fraction(value)
    elif isinstance(value, Fraction):
        result = value
    elif isinstance(value, numbers.Integral):
        result = Fraction(int(value))
    elif isinstance(value, numbers.Real):
        return exact(name, float(value))
    else:
        raise TypeError(f"{name} must be a number (int, float, Decimal or Fraction), got {value!r}")
    if abs(result) >= MAX_AMOUNT:
        raise ValueError(_too_large(name, value))
    return result


def _too_large(name: str, value: object) -> str:
    return f"{name} must be below 1e15 in absolute value for the Redis gate, got {value!r}"


def ceil_units(value: Fraction) -> int:
    """Units of ``value`` rounded up (toward +infinity)."""
    return -((-value.numerator * SCALE) // value.denominator)


def floor_units(value: Fraction) -> int:
    """Units of ``value`` rounded down (toward -infinity)."""
    return (value.numerator * SCALE) // value.denominator


def notional_units(name: str, value: object) -> tuple[Fraction, int]:
    """A notional-like amount (finite, > 0): its exact value and its units rounded up (>= 1)."""
    # Fast paths for the common types; the general path gives the same result.
    if type(value) is int and 0 < value < MAX_AMOUNT:
        return Fraction(value), value * SCALE
    amount = exact(name, value)
    if amount <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return amount, ceil_units(amount)


def exposure_units(name: str, value: object) -> int:
    """A signed position exposure: units of its absolute value rounded up, with its sign."""
    amount = exact(name, value)
    units = ceil_units(abs(amount))
    return -units if amount < 0 else units


def limit_units(name: str, value: object) -> int | None:
    """A limit (``None`` = no limit) in units rounded down."""
    if value is None:
        return None
    amount = exact(name, value)
    if amount < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return floor_units(amount)


def from_units(units: int) -> Decimal:
    """Units back to an exact ``Decimal`` amount."""
    return Decimal(units).scaleb(-SCALE_DIGITS)


def to_number_like(template: Number, value: Fraction) -> Number:
    """``value`` in the type of ``template`` where that is exact or, for floats, expected."""
    if isinstance(template, float):
        return float(value)
    if isinstance(template, Decimal):
        if value.denominator == 1:
            return Decimal(value.numerator)
        return Decimal(value.numerator) / Decimal(value.denominator)
    if isinstance(template, int) and value.denominator == 1:
        return value.numerator
    return value


assert _MAX_UNITS < 2**53 * SCALE  # every single amount fits the server's two-limb arithmetic
