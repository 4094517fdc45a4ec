"""Exact amounts: validation of notionals, exposures and limits, and their integer form.

The ledger never adds floats. Every amount is turned, outside the ledger lock, into an exact
ratio of integers (``as_integer_ratio`` exists on int, float, Decimal and Fraction), and the
ledger keeps all sums as integers over one common denominator. Integer arithmetic inside the
lock is exact and makes no function call, so sums never drift, the gross is exactly 0 once every
reservation is gone, and a float gross equals ``math.fsum`` of the float reservations.

A ledger records every kind of amount it has seen, so it can hand a sum back in the type a
caller would expect: floats give a float (correctly rounded), Decimals a Decimal, ints an int;
mixtures with no exact common type (Decimal with float, anything with Fraction) give a Fraction.
The record is sticky, so a ledger's sums keep one type however reservations come and go.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Final

__all__: list[str] = []

INF: Final = math.inf
# Every finite float fits (2**-1074 is the smallest); so does a Decimal down to about 1E-330.
# Past that, one amount would make every later sum in its ledger slower: refused instead.
MAX_DENOMINATOR_BITS: Final = 1100

# Kind bits, OR-ed into a ledger's record of every kind it has seen.
KIND_INT: Final = 0
KIND_FLOAT: Final = 1
KIND_DECIMAL: Final = 2
KIND_FRACTION: Final = 4

Ratio = tuple[int, int]


def check_symbol(symbol: object) -> None:
    """Raise unless ``symbol`` can key a reservation: hashable, not None, not an empty string."""
    if symbol is None:
        raise TypeError("symbol must be a hashable value such as 'BTCUSDT', got None")
    if isinstance(symbol, (str, bytes)) and not symbol:
        raise ValueError(f"symbol must not be empty, got {symbol!r}")
    try:
        hash(symbol)
    except TypeError:
        raise TypeError(f"symbol must be hashable, got {symbol!r}") from None


def check_order_id(order_id: object) -> None:
    """Raise unless ``order_id`` is hashable and not None (callers that generate an id for None
    handle it before calling this)."""
    if order_id is None:
        raise TypeError("order_id must be a hashable value such as 'cl-42', got None")
    try:
        hash(order_id)
    except TypeError:
        raise TypeError(f"order_id must be hashable, got {order_id!r}") from None


def kind_of(value: object) -> int:
    if isinstance(value, float):
        return KIND_FLOAT
    if isinstance(value, Decimal):
        return KIND_DECIMAL
    if isinstance(value, Fraction):
        return KIND_FRACTION
    return KIND_INT


def exact_ratio(name: str, value: object) -> Ratio:
    """``value`` as ``(numerator, denominator)``, exact; raise for anything not a finite number."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number (int, float, Decimal or Fraction), got {value!r}")
    if isinstance(value, (int, float, Decimal, Fraction)):
        number: int | float | Decimal | Fraction = value
    elif isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a number (int, float, Decimal or Fraction), got {value!r}")
    try:
        num, den = number.as_integer_ratio()
    except (ValueError, OverflowError):
        raise ValueError(f"{name} must be finite, got {value!r}") from None
    if den.bit_length() > MAX_DENOMINATOR_BITS:
        raise ValueError(
            f"{name} has more precision than pendingledger keeps (a denominator of "
            f"{den.bit_length()} bits, at most {MAX_DENOMINATOR_BITS}), got {value!r}"
        )
    return num, den


def positive_ratio(name: str, value: object) -> tuple[int, int, int]:
    """``(numerator, denominator, kind)`` of a notional-like amount that must be finite and > 0."""
    num, den = exact_ratio(name, value)
    if num <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return num, den, kind_of(value)


def limit_ratio(name: str, value: object) -> Ratio | None:
    """Exact ratio of an exposure limit (already validated by PortfolioLimits); None stays None."""
    if value is None:
        return None
    return exact_ratio(name, value)


def abs_sum(items: Iterable[tuple[object, object]], owner: str) -> Ratio:
    """Exact sum of the absolute values in ``items`` (``(key, number)`` pairs).

    Runs on every decision that is given a positions mapping, so finite floats and ints take a
    short path and an argument name is only built for the error message.
    """
    num, den = 0, 1
    for key, value in items:
        if type(value) is float and -INF < value < INF:
            a, b = value.as_integer_ratio()
        elif type(value) is int:
            a, b = value, 1
        else:
            a, b = exact_ratio(f"{owner}[{key!r}]", value)
        if a < 0:
            a = -a
        if b == den:
            num += a
        elif den % b == 0:
            num += a * (den // b)
        else:
            common = math.lcm(den, b)
            num = num * (common // den) + a * (common // b)
            den = common
    return num, den


def scale_to(ratio: Ratio, den: int) -> int | None:
    """Numerator of ``ratio`` over ``den``; None if ``den`` is not a multiple of its denominator."""
    num, q = ratio
    if q == 1:
        return num * den
    if den % q:
        return None
    return num * (den // q)


def to_number(num: int, den: int, kinds: int) -> int | float | Decimal | Fraction:
    """``num/den`` in the type the kinds seen call for (see the module docstring)."""
    floats = kinds & KIND_FLOAT
    decimals = kinds & KIND_DECIMAL
    fractions = kinds & KIND_FRACTION
    if fractions or (floats and decimals):
        return Fraction(num, den)
    if floats:
        return num / den  # int true division is correctly rounded
    if decimals:
        return _exact_decimal(num, den)
    if num % den == 0:
        return num // den
    return Fraction(num, den)


def _exact_decimal(num: int, den: int) -> Decimal | Fraction:
    fraction = Fraction(num, den)
    q = fraction.denominator
    twos = fives = 0
    while q % 2 == 0:
        q //= 2
        twos += 1
    while q % 5 == 0:
        q //= 5
        fives += 1
    if q != 1:
        return fraction
    places = max(twos, fives)
    with localcontext() as ctx:
        ctx.prec = len(str(abs(fraction.numerator))) + places + 2
        return Decimal(fraction.numerator) / Decimal(fraction.denominator)
