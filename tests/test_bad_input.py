"""Bad input: a ValueError/TypeError naming the argument and the value, and nothing changes.

"Nothing changes" means: ledger stats equal before and after, the outstanding reservations are
the same, the gate's counters and owned book did not move, and the lock is free afterwards
(``with ledger.lock(timeout=0): pass`` works): the ``unchanged`` fixture of ``conftest``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from pendingledger import (
    DenyReason,
    LedgerError,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Positions,
    Reservation,
)
from pendingledger.testing import ManualClock

Unchanged = Callable[..., AbstractContextManager[None]]
Number = int | float | Decimal | Fraction
Book = dict[str, Number]
NAN = math.nan
INF = math.inf
AAA_OPEN: Book = {"AAA": 1}
X_NAN: Book = {"X": NAN}


def in_units(amount: Number) -> int:
    """A small amount read back from the ledger in whole units of 1e-9 (a float to the nearest)."""
    return round(Fraction(amount) * 10**9)


def hashable(value: object) -> bool:
    """Whether ``value`` can be a dict key at all."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


def raises(
    exc: type[Exception], name: str, value: object
) -> AbstractContextManager[pytest.ExceptionInfo[Exception]]:
    """``pytest.raises`` that also wants the argument's name and the value's repr in the message."""
    return pytest.raises(exc, match=rf"{re.escape(name)}.*{re.escape(repr(value))}")


@pytest.fixture
def book(ledger: PendingEntryLedger, gate: PortfolioGate) -> Reservation:
    """Some state to leave untouched: reservations, counters, a limit. Returns one reservation."""
    gate.limits = PortfolioLimits(max_concurrent_positions=5, max_gross_exposure=10_000)
    decision = gate.try_enter("AAA", 100, {}, order_id="a")
    gate.try_enter("BBB", Decimal("2.5"), {}, order_id="b")
    gate.try_enter("CCC", 20_000, {})  # denied: counted
    assert isinstance(decision.reservation, Reservation)
    return decision.reservation


# ---------------------------------------------------------------------------- notional

BAD_NOTIONALS: list[tuple[object, type[Exception]]] = [
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    (0, ValueError),
    (0.0, ValueError),
    (-0.0, ValueError),
    (-1, ValueError),
    (-0.01, ValueError),
    (Decimal("NaN"), ValueError),
    (Decimal("sNaN"), ValueError),
    (Decimal("Infinity"), ValueError),
    (Decimal("-1.5"), ValueError),
    (Decimal(0), ValueError),
    (Fraction(-1, 3), ValueError),
    (10**15, ValueError),  # amounts are below 1e15
    (1e15, ValueError),
    (Decimal("1E+15"), ValueError),
    (Fraction(10**16, 7), ValueError),
    (True, TypeError),
    (False, TypeError),
    ("100", TypeError),
    (None, TypeError),
    (b"100", TypeError),
    ([100], TypeError),
    (1 + 0j, TypeError),
]
NOTIONAL_IDS = [repr(v) for v, _ in BAD_NOTIONALS]


@pytest.mark.parametrize(("value", "exc"), BAD_NOTIONALS, ids=NOTIONAL_IDS)
def test_try_enter_bad_notional(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """A bad notional is refused before anything is read or reserved, whatever the positions."""
    with unchanged(ledger, gate), raises(exc, "notional", value):
        gate.try_enter("DDD", value, {})
    with unchanged(ledger, gate), raises(exc, "notional", value):
        gate.try_enter("AAA", value, lambda: AAA_OPEN)
    with unchanged(ledger, gate), raises(exc, "notional", value):
        gate.try_enter("AAA", value)


@pytest.mark.parametrize(("value", "exc"), BAD_NOTIONALS, ids=NOTIONAL_IDS)
def test_reserve_bad_notional(
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """``PendingMap.reserve`` refuses it too; leaving the block with it undoes the block."""
    with unchanged(ledger):
        with ledger.lock() as pending:
            with raises(exc, "notional", value):
                pending.reserve("DDD", value)
            assert len(pending) == 2
            assert "DDD" not in pending
        # and when the error leaves the block, the block's own changes are undone as well
        with raises(exc, "notional", value), ledger.lock() as pending:
            pending.reserve("EEE", 1)
            pending.reserve("DDD", value)


@pytest.mark.parametrize(("value", "exc"), BAD_NOTIONALS, ids=NOTIONAL_IDS)
def test_reduce_bad_amount(
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """A partial fill's amount is checked like a notional, inside a block or not."""
    with unchanged(ledger), raises(exc, "amount", value):
        book.reduce(value)
    assert book.notional == 100
    with unchanged(ledger), ledger.lock(), raises(exc, "amount", value):
        book.reduce(value)


# ---------------------------------------------------------------------------- symbol and order_id

BAD_SYMBOLS: list[tuple[object, type[Exception]]] = [
    (None, TypeError),
    ("", ValueError),
    (b"", TypeError),  # only str: bytes are not symbols, even empty ones
    (b"AAA", TypeError),
    (1, TypeError),
    (1.5, TypeError),
    (("AAA",), TypeError),
    (["AAA"], TypeError),
    ({"AAA": 1}, TypeError),
    (("AAA", ["x"]), TypeError),
]
SYMBOL_IDS = [repr(v) for v, _ in BAD_SYMBOLS]


@pytest.mark.parametrize(("value", "exc"), BAD_SYMBOLS, ids=SYMBOL_IDS)
def test_try_enter_bad_symbol(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """Symbols are non-empty str: anything else is refused, on every way of reading positions."""
    with unchanged(ledger, gate), raises(exc, "symbol", value):
        gate.try_enter(value, 1, {})
    with unchanged(ledger, gate), raises(exc, "symbol", value):
        gate.try_enter(value, 1, lambda: AAA_OPEN)
    with unchanged(ledger, gate), raises(exc, "symbol", value):
        gate.try_enter(value, 1)


@pytest.mark.parametrize(("value", "exc"), BAD_SYMBOLS, ids=SYMBOL_IDS)
def test_reserve_bad_symbol(
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """``PendingMap`` refuses it in ``reserve``, ``release`` and ``symbol_notional``."""
    with unchanged(ledger), ledger.lock() as pending:
        with raises(exc, "symbol", value):
            pending.reserve(value, 1)
        with raises(exc, "symbol", value):
            pending.release(value)
        with raises(exc, "symbol", value):
            pending.symbol_notional(value)
        assert len(pending) == 2


@pytest.mark.parametrize(("value", "exc"), BAD_SYMBOLS, ids=SYMBOL_IDS)
def test_release_bad_symbol(
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """``ledger.release`` refuses it and releases nothing."""
    with unchanged(ledger), raises(exc, "symbol", value):
        ledger.release(value)


BAD_KEYS = [(value, exc) for value, exc in BAD_SYMBOLS if hashable(value)]


@pytest.mark.parametrize(("value", "exc"), BAD_KEYS, ids=[repr(v) for v, _ in BAD_KEYS])
@pytest.mark.parametrize("as_callable", [False, True], ids=["mapping", "callable"])
def test_bad_symbol_in_positions_fails_closed(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
    as_callable: bool,
) -> None:
    """A key of a caller's positions that is not a symbol refuses the decision (fail closed)."""
    positions: dict[Any, Number] = {"OK": 5, value: 1}
    arg: object = (lambda: positions) if as_callable else positions
    with unchanged(ledger, gate), raises(exc, "symbol", value):
        gate.try_enter("DDD", 1, arg)


BAD_ORDER_IDS: list[object] = [1, 1.5, b"o-1", ("o",), [1], {"id": 1}, {1, 2}, ("o", [1])]


class _LikeNone:
    """An order id that hashes and compares like None: not a str, so refused like any other."""

    def __hash__(self) -> int:
        return hash(None)

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, _LikeNone)

    def __repr__(self) -> str:
        return "_LikeNone()"


@pytest.mark.parametrize("value", [*BAD_ORDER_IDS, _LikeNone()], ids=repr)
def test_bad_order_id(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
) -> None:
    """Order ids are non-empty str: anything else is a TypeError wherever one is taken."""
    with unchanged(ledger, gate):
        with raises(TypeError, "order_id", value):
            gate.try_enter("DDD", 1, {}, order_id=value)
        with raises(TypeError, "order_id", value):
            gate.try_enter("DDD", 1, order_id=value)
        with raises(TypeError, "order_id", value):
            ledger.release_order(value)
        with raises(TypeError, "order_id", value):
            gate.release_order(value)
        with ledger.lock() as pending:
            with raises(TypeError, "order_id", value):
                pending.reserve("DDD", 1, order_id=value)
            with raises(TypeError, "order_id", value):
                pending.release_order(value)


def test_empty_order_id(
    ledger: PendingEntryLedger, gate: PortfolioGate, book: Reservation, unchanged: Unchanged
) -> None:
    """An empty order id is a ValueError (None, not "", asks the ledger to name the order)."""
    with unchanged(ledger, gate):
        with raises(ValueError, "order_id", ""):
            gate.try_enter("DDD", 1, {}, order_id="")
        with raises(ValueError, "order_id", ""):
            ledger.release_order("")
        with raises(ValueError, "order_id", ""):
            gate.confirm_fill("", 1, symbol="AAA")
        with ledger.lock() as pending, raises(ValueError, "order_id", ""):
            pending.reserve("DDD", 1, order_id="")


# ---------------------------------------------------------------------------- positions


BAD_EXPOSURES: list[tuple[object, type[Exception]]] = [
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    (Decimal("NaN"), ValueError),
    (Decimal("-Infinity"), ValueError),
    (-(10**15), ValueError),  # amounts are below 1e15 in absolute value
    (1e15, ValueError),
    ("100", TypeError),
    (None, TypeError),
    (True, TypeError),
]


@pytest.mark.parametrize("where", ["same symbol", "other symbol"])
@pytest.mark.parametrize(("value", "exc"), BAD_EXPOSURES, ids=[repr(v) for v, _ in BAD_EXPOSURES])
@pytest.mark.parametrize("as_callable", [False, True], ids=["mapping", "callable"])
def test_bad_position_exposure_fails_closed(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
    where: str,
    as_callable: bool,
) -> None:
    """A bad exposure anywhere in a caller's positions refuses the decision, even with no
    limit at all (fail closed), and names the position."""
    key = "DDD" if where == "same symbol" else "ZZZ"
    positions: dict[str, Any] = {"OK": 5, key: value}
    arg: object = (lambda: positions) if as_callable else positions
    with unchanged(ledger, gate), raises(exc, "positions", value):
        gate.try_enter("DDD", 1, arg)
    gate.limits = PortfolioLimits()  # with no limit at all, still nothing admitted
    with unchanged(ledger, gate), raises(exc, "positions", value):
        gate.try_enter("DDD", 1, arg)


BAD_POSITIONS: list[object] = [
    [("AAA", 1)],
    ("AAA", 1),
    {"AAA"},
    "AAA",
    5,
    lambda: [("AAA", 1)],
    lambda: None,
]


@pytest.mark.parametrize(
    "value",
    BAD_POSITIONS,
    ids=["list", "tuple", "set", "str", "int", "callable->list", "callable->None"],
)
def test_positions_not_a_mapping(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
) -> None:
    """Positions are a Mapping or a callable returning one; anything else is a TypeError."""
    shown = value() if callable(value) else value
    with unchanged(ledger, gate), raises(TypeError, "positions", shown):
        gate.try_enter("DDD", 1, value)


# ---------------------------------------------------------------------------- the owned book
# (positions=None: set_position / close_position / confirm_fill)


@pytest.fixture
def owned(gate: PortfolioGate) -> PortfolioGate:
    """The ``book`` fixture's gate with an owned position book holding one position."""
    gate.set_position("OPEN", Decimal("-7.5"))
    return gate


@pytest.mark.parametrize(("value", "exc"), BAD_EXPOSURES, ids=[repr(v) for v, _ in BAD_EXPOSURES])
def test_set_position_bad_exposure(
    ledger: PendingEntryLedger,
    book: Reservation,
    owned: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """A bad exposure neither updates an open position nor opens a new one."""
    with unchanged(ledger, owned), raises(exc, "exposure", value):
        owned.set_position("OPEN", value)
    with unchanged(ledger, owned), raises(exc, "exposure", value):
        owned.set_position("NEW", value)


@pytest.mark.parametrize(("value", "exc"), BAD_EXPOSURES, ids=[repr(v) for v, _ in BAD_EXPOSURES])
def test_confirm_fill_bad_exposure(
    ledger: PendingEntryLedger,
    book: Reservation,
    owned: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """A fill with a bad exposure leaves the reservation outstanding and the book as it was."""
    with unchanged(ledger, owned), raises(exc, "position_exposure", value):
        owned.confirm_fill(book.order_id, value)
    assert book.active


@pytest.mark.parametrize(("value", "exc"), BAD_SYMBOLS, ids=SYMBOL_IDS)
def test_owned_book_bad_symbol(
    ledger: PendingEntryLedger,
    book: Reservation,
    owned: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """Every owned-book method refuses a bad symbol and changes nothing."""
    with unchanged(ledger, owned):
        with raises(exc, "symbol", value):
            owned.set_position(value, 1)
        with raises(exc, "symbol", value):
            owned.close_position(value)
        if value is not None:  # symbol=None means "the reservation's symbol"
            with raises(exc, "symbol", value):
                owned.confirm_fill(book.order_id, 1, symbol=value)
        with raises(exc, "symbol", value):
            owned.release(value)


@pytest.mark.parametrize("value", BAD_ORDER_IDS, ids=repr)
def test_confirm_fill_bad_order_id(
    ledger: PendingEntryLedger,
    book: Reservation,
    owned: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
) -> None:
    """``confirm_fill`` with a non-str order id records no position, even with a symbol given."""
    with unchanged(ledger, owned), raises(TypeError, "order_id", value):
        owned.confirm_fill(value, 1, symbol="AAA")


def test_confirm_fill_on_another_symbol_changes_nothing(
    ledger: PendingEntryLedger, book: Reservation, owned: PortfolioGate, unchanged: Unchanged
) -> None:
    """A fill naming a symbol other than its reservation's is refused whole."""
    with unchanged(ledger, owned), pytest.raises(ValueError, match=r"order_id 'a'.*'AAA'.*'BBB'"):
        owned.confirm_fill("a", 100, symbol="BBB")
    assert book.active


@pytest.mark.timeout(10)
def test_bad_positions_while_an_expiry_is_due_leave_the_lock_free(
    ledger: PendingEntryLedger, gate: PortfolioGate, clock: ManualClock
) -> None:
    """Positions are read before the lock is taken, so a bad one leaves nothing taken, counted
    or swept; the due expiry happens at the next acquisition as usual."""
    gate.try_enter("AAA", 1, {})
    clock.advance(ledger.ttl)
    with raises(ValueError, "positions", NAN):
        gate.try_enter("BBB", 1, lambda: X_NAN)
    assert not ledger.locked()
    with ledger.lock(timeout=0) as pending:
        assert "BBB" not in pending
        assert len(pending) == 0
    stats = ledger.stats()
    assert (stats.reserved, stats.expired, stats.outstanding) == (1, 1, 0)
    assert gate.stats().admitted == 1
    assert sum(gate.stats().denied.values()) == 0


# ---------------------------------------------------------------------------- ttl, clock, on_expire

BAD_TTLS: list[tuple[object, type[Exception]]] = [
    (0, ValueError),
    (0.0, ValueError),
    (-1, ValueError),
    (-0.5, ValueError),
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    ("1", TypeError),
    (True, TypeError),
    (False, TypeError),
    (None, TypeError),
]


@pytest.mark.parametrize(("value", "exc"), BAD_TTLS, ids=[repr(v) for v, _ in BAD_TTLS])
def test_bad_ttl(value: Any, exc: type[Exception]) -> None:
    """The TTL is finite seconds > 0."""
    with raises(exc, "ttl", value):
        PendingEntryLedger(value)


def test_bad_clock_and_on_expire() -> None:
    """The clock and on_expire must be callable."""
    with raises(TypeError, "clock", 5):
        PendingEntryLedger(1, clock=5)  # type: ignore[arg-type]
    with raises(TypeError, "on_expire", "log"):
        PendingEntryLedger(1, on_expire="log")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- limits

BAD_AMOUNT_LIMITS: list[tuple[object, type[Exception]]] = [
    (-1, ValueError),
    (-0.01, ValueError),
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    (Decimal("NaN"), ValueError),
    (Decimal("Infinity"), ValueError),
    (Decimal("-5"), ValueError),
    (Fraction(-1, 2), ValueError),
    (10**15, ValueError),  # limits are below 1e15, like amounts
    ("100", TypeError),
    (True, TypeError),
    ([100], TypeError),
]


@pytest.mark.parametrize(
    "name", ["max_gross_exposure", "max_symbol_exposure", "max_net_exposure", "max_order_notional"]
)
@pytest.mark.parametrize(
    ("value", "exc"), BAD_AMOUNT_LIMITS, ids=[repr(v) for v, _ in BAD_AMOUNT_LIMITS]
)
def test_bad_exposure_limit(name: str, value: Any, exc: type[Exception]) -> None:
    """Exposure limits and the one-order cap are finite amounts >= 0 and below 1e15."""
    with raises(exc, name, value):
        PortfolioLimits(**{name: value})


BAD_POSITION_LIMITS: list[tuple[object, type[Exception]]] = [
    (-1, ValueError),
    (True, TypeError),
    (False, TypeError),
    (2.0, TypeError),
    (NAN, TypeError),
    ("3", TypeError),
    (Decimal(3), TypeError),
]


@pytest.mark.parametrize(
    ("value", "exc"), BAD_POSITION_LIMITS, ids=[repr(v) for v, _ in BAD_POSITION_LIMITS]
)
def test_bad_max_concurrent_positions(value: Any, exc: type[Exception]) -> None:
    """The positions limit is an int >= 0 (not a bool, not a float)."""
    with raises(exc, "max_concurrent_positions", value):
        PortfolioLimits(max_concurrent_positions=value)


@pytest.mark.parametrize("name", ["max_open_orders", "max_open_orders_per_symbol"])
@pytest.mark.parametrize(
    ("value", "exc"), BAD_POSITION_LIMITS, ids=[repr(v) for v, _ in BAD_POSITION_LIMITS]
)
def test_bad_open_order_caps(name: str, value: Any, exc: type[Exception]) -> None:
    """The open-order caps are counts as the positions limit is: an int >= 0."""
    with raises(exc, name, value):
        PortfolioLimits(**{name: value})


BAD_RATES: list[tuple[object, type[Exception]]] = [
    ((0, 1), ValueError),
    ((-1, 1), ValueError),
    ((True, 1), TypeError),  # a wrong type is a TypeError, as for the other counts
    ((1.0, 1), TypeError),
    (("2", 1), TypeError),
    ((10**9 + 1, 1), ValueError),  # a gate keeps that many stamps: bounded
    ((2**63, 1), ValueError),
    ((1, 10**400), ValueError),  # past a float
    ((1, Decimal("NaN")), ValueError),
    ((1, Decimal("sNaN")), ValueError),
    ((1, Decimal("Infinity")), ValueError),
    ((1, 0), ValueError),
    ((1, -0.5), ValueError),
    ((1, NAN), ValueError),
    ((1, INF), ValueError),
    ((1, Fraction(-1, 2)), ValueError),
    ((1, "1"), TypeError),
    ((1, True), TypeError),
    ((1, None), TypeError),
    ([1, 1], TypeError),  # a tuple, as the annotation says
    ((1,), TypeError),
    ((1, 1, 1), TypeError),
    (5, TypeError),
    ("5/s", TypeError),
]


@pytest.mark.parametrize(("value", "exc"), BAD_RATES, ids=[repr(v) for v, _ in BAD_RATES])
def test_bad_orders_per_interval(value: Any, exc: type[Exception]) -> None:
    """``max_orders_per_interval`` is ``(count, seconds)``: an int count >= 1 and finite
    seconds > 0."""
    with raises(exc, "max_orders_per_interval", value):
        PortfolioLimits(max_orders_per_interval=value)


def test_seconds_of_every_kind_of_amount_are_taken() -> None:
    for seconds in (1, 0.5, Decimal("0.25"), Fraction(1, 3)):
        limits = PortfolioLimits(max_orders_per_interval=(10**9, seconds))
        assert limits.max_orders_per_interval == (10**9, seconds)


def test_zero_order_caps_are_valid(gate: PortfolioGate) -> None:
    """Zero open orders (or a zero one-order cap) is a limit that admits nothing, not an
    error; the rate count starts at one."""
    gate.limits = PortfolioLimits(max_open_orders=0)
    assert gate.try_enter("AAA", 1, {}).reason is DenyReason.MAX_OPEN_ORDERS
    gate.limits = PortfolioLimits(max_open_orders_per_symbol=0)
    assert gate.try_enter("AAA", 1, {}).reason is DenyReason.MAX_OPEN_ORDERS_PER_SYMBOL
    gate.limits = PortfolioLimits(max_order_notional=0)
    assert gate.try_enter("AAA", 1e-300, {}).reason is DenyReason.MAX_ORDER_NOTIONAL
    gate.limits = PortfolioLimits(max_orders_per_interval=(1, 1e-9))
    assert gate.try_enter("AAA", 1, {})


def test_zero_limits_are_valid() -> None:
    """Zero is a limit (nothing new may open / be added), not an error."""
    lim = PortfolioLimits(max_concurrent_positions=0, max_gross_exposure=0, max_symbol_exposure=0)
    assert lim.max_concurrent_positions == 0


def test_zero_gross_limit_denies_everything(gate: PortfolioGate) -> None:
    """Even the smallest float counts as one unit, which a zero limit does not admit."""
    gate.limits = PortfolioLimits(max_gross_exposure=0)
    assert gate.try_enter("AAA", 1e-300, {}).reason is DenyReason.MAX_GROSS_EXPOSURE


def test_bad_limits_on_the_gate_change_nothing(
    ledger: PendingEntryLedger, gate: PortfolioGate, book: Reservation, unchanged: Unchanged
) -> None:
    """A refused ``gate.limits`` assignment keeps the limits in force."""
    before = gate.limits
    with unchanged(ledger, gate), raises(TypeError, "limits", None):
        gate.limits = None
    assert gate.limits is before


# ---------------------------------------------------------------------------- lock timeout

BAD_TIMEOUTS: list[tuple[object, type[Exception]]] = [
    (-1, ValueError),
    (-0.001, ValueError),
    (NAN, ValueError),
    (-INF, ValueError),
    (INF, ValueError),
    (1e10, ValueError),  # past threading.TIMEOUT_MAX: would be an OverflowError from the lock
    ("1", TypeError),
    (True, TypeError),
    (Decimal(1), TypeError),
]
TIMEOUT_IDS = [repr(v) for v, _ in BAD_TIMEOUTS]


@pytest.mark.parametrize(("value", "exc"), BAD_TIMEOUTS, ids=TIMEOUT_IDS)
def test_bad_lock_timeout(
    ledger: PendingEntryLedger,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """``lock(timeout)`` is None or finite seconds in [0, TIMEOUT_MAX]."""
    with unchanged(ledger), raises(exc, "timeout", value), ledger.lock(value):
        pytest.fail("entered a lock() block with a bad timeout")  # pragma: no cover


@pytest.mark.parametrize(("value", "exc"), BAD_TIMEOUTS, ids=TIMEOUT_IDS)
def test_try_enter_bad_timeout(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """``try_enter(timeout=...)`` is checked the same way, before anything is read or decided."""
    calls: list[int] = []

    def positions() -> Book:
        calls.append(1)
        return {}

    sources: list[Positions | None] = [None, {}, positions]
    for source in sources:
        with unchanged(ledger, gate), raises(exc, "timeout", value):
            gate.try_enter("DDD", 1, source, timeout=value)
    assert calls == []


# ---------------------------------------------------------------------------- ManualClock

BAD_STEPS: list[tuple[object, type[Exception], str]] = [
    (-1, ValueError, "time can't go backwards"),
    (-1e-9, ValueError, "time can't go backwards"),
    (-INF, ValueError, "seconds"),
    (NAN, ValueError, "seconds"),
    (INF, ValueError, "seconds"),
    ("1", TypeError, "seconds"),
    (True, TypeError, "seconds"),
    (None, TypeError, "seconds"),
]


@pytest.mark.parametrize(
    ("value", "exc", "message"), BAD_STEPS, ids=[repr(v) for v, _, _ in BAD_STEPS]
)
def test_manual_clock_bad_advance(value: Any, exc: type[Exception], message: str) -> None:
    """A bad step is refused and the clock stays where it was."""
    clock = ManualClock(5.0)
    with pytest.raises(exc, match=re.escape(message)) as info:
        clock.advance(value)
    assert repr(value) in str(info.value)
    assert clock() == 5.0  # unchanged


@pytest.mark.parametrize("value", [NAN, INF, -INF, "0", None, True], ids=repr)
def test_manual_clock_bad_start(value: Any) -> None:
    """The start is finite seconds."""
    with pytest.raises((ValueError, TypeError), match=rf"start.*{re.escape(repr(value))}"):
        ManualClock(value)


# ---------------------------------------------------------------------------- a broken clock


@pytest.mark.parametrize("reading", [NAN, INF, -INF, None, "now"], ids=repr)
def test_a_clock_that_returns_garbage_fails_closed(reading: object) -> None:
    """A clock reading that is not finite seconds is a LedgerError naming it: no decision is
    made on it, nothing is counted, reserved or expired, and the lock is not left held."""
    readings: list[Any] = [0.0]  # the clock returns whatever the test put last
    ledger = PendingEntryLedger(10, clock=lambda: readings[-1])
    gate = PortfolioGate(ledger, PortfolioLimits(max_concurrent_positions=1))
    held = gate.try_enter("AAA", 1, {})
    assert held
    before = ledger.stats(), gate.stats()
    readings.append(reading)
    with pytest.raises(LedgerError, match=re.escape(repr(reading))):
        gate.try_enter("BBB", 1, {})  # never admitted on a time it cannot trust
    with pytest.raises(LedgerError, match=re.escape(repr(reading))):
        gate.try_enter("BBB", 1)
    with pytest.raises(LedgerError, match="clock"):
        ledger.stats()
    assert not ledger.locked() and ledger.audit() == []
    readings.append(1.0)
    assert (ledger.stats(), gate.stats()) == before
    assert held.reservation is not None and held.reservation.active  # nothing was expired
    assert gate.try_enter("BBB", 1, {}).reason is DenyReason.MAX_CONCURRENT_POSITIONS


def test_an_int_clock_is_accepted() -> None:
    """An int is a real number of seconds; stamps come back as float."""
    ticks = iter(range(100))
    ledger = PendingEntryLedger(10, clock=lambda: next(ticks))  # an int is a real number of seconds
    gate = PortfolioGate(ledger, PortfolioLimits())
    decision = gate.try_enter("AAA", 1, {})
    assert decision.reservation is not None
    assert isinstance(decision.reservation.reserved_at, float)


# ---------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "value",
    [Decimal("1E-400"), Fraction(1, 3**700), Fraction(7, 2**1200), 5e-324],
    ids=["Decimal('1E-400')", "Fraction(1, 3**700)", "Fraction(7, 2**1200)", "5e-324"],
)
def test_less_than_a_unit_counts_as_one_unit(
    ledger: PendingEntryLedger, gate: PortfolioGate, value: Any
) -> None:
    """An amount finer than 1e-9 is not refused: as a notional it rounds up to one whole unit
    (a reservation is never smaller than its order) and reads back as given; as a limit it
    rounds down to zero."""
    decision = gate.try_enter("AAA", value, {})
    assert decision.reservation is not None
    assert decision.reservation.notional == value  # as given, until reduced
    assert type(decision.reservation.notional) is type(value)
    assert in_units(ledger.stats().gross_notional) == 1
    assert gate.try_enter("AAA", value, {})
    assert in_units(ledger.stats().gross_notional) == 2
    gate.limits = PortfolioLimits(max_symbol_exposure=value)
    assert gate.try_enter("BBB", value, {}).reason is DenyReason.MAX_SYMBOL_EXPOSURE


def test_the_smallest_float_reads_back_in_whole_units(
    ledger: PendingEntryLedger, gate: PortfolioGate
) -> None:
    """Sums come back in the kind reserved: a float of whole units (1e-9), the reservation's own
    notional as given. A fill of less than a unit takes nothing off (fills round down)."""
    tiny = 5e-324
    decision = gate.try_enter("AAA", tiny, {})
    assert decision.reservation is not None
    assert decision.reservation.notional == tiny
    assert ledger.stats().gross_notional == 1e-09
    big = gate.try_enter("BBB", 1.0, {}).reservation
    assert big is not None and big.reduce(tiny)
    assert big.notional == 1.0 and big.active
    assert ledger.stats().gross_notional == 1.000000001


@pytest.mark.parametrize("order_id", [None])
def test_release_paths_refuse_a_none_order_id(
    ledger: PendingEntryLedger,
    gate: PortfolioGate,
    book: Reservation,
    unchanged: Unchanged,
    order_id: Any,
) -> None:
    """None names no order: releasing or filling it is a TypeError (it is never a lookup)."""
    with unchanged(ledger, gate), raises(TypeError, "order_id", order_id):
        ledger.release_order(order_id)
    with unchanged(ledger, gate), raises(TypeError, "order_id", order_id):
        gate.confirm_fill(order_id, 5)


# ---------------------------------------------------------------------------- strategy budgets


class _Name(str):
    """A str subclass: its comparisons and hash could run code under the lock."""

    __slots__ = ()


@pytest.fixture
def budgeted(gate: PortfolioGate, book: Reservation) -> PortfolioGate:
    """The ``book`` fixture's gate with two budgets, a reservation and a position of one."""
    gate.budgets = {"A": PortfolioLimits(max_gross_exposure=500), "B": PortfolioLimits()}
    assert gate.try_enter("AAA", 50, order_id="sa", strategy="A")
    gate.set_position("BBB", 5, strategy="A")
    return gate


def everything(gate: PortfolioGate) -> tuple[object, ...]:
    """What a budget change or a refused strategy must leave as it was, beyond ``unchanged``."""
    return (
        dict(gate.budgets),
        gate.limits,
        gate.positions(strategy="A"),
        gate.positions(strategy="B"),
        gate.stats().scopes,
    )


BAD_BUDGETS: list[tuple[object, type[Exception] | tuple[type[Exception], ...], str]] = [
    ([("A", PortfolioLimits())], TypeError, "budgets"),
    ("A", TypeError, "budgets"),
    (PortfolioLimits(), TypeError, "budgets"),
    ({1: PortfolioLimits()}, TypeError, "1"),
    ({None: PortfolioLimits()}, TypeError, "None"),
    ({b"A": PortfolioLimits()}, TypeError, "b'A'"),
    ({"": PortfolioLimits()}, (TypeError, ValueError), "''"),
    ({"A": None}, TypeError, "A"),
    ({"A": {"max_gross_exposure": 1}}, TypeError, "A"),
    ({"A": PortfolioLimits(max_daily_loss=1)}, ValueError, "loss limit"),
    ({"A": PortfolioLimits(max_drawdown=Decimal("0.5"))}, ValueError, "account's"),
    ({"C": PortfolioLimits(), "A": PortfolioLimits(max_drawdown=1)}, ValueError, "A"),
]
BUDGET_IDS = [repr(v) for v, _, _ in BAD_BUDGETS]


@pytest.mark.parametrize(("value", "exc", "names"), BAD_BUDGETS, ids=BUDGET_IDS)
def test_bad_budgets_change_nothing(
    ledger: PendingEntryLedger,
    budgeted: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception] | tuple[type[Exception], ...],
    names: str,
) -> None:
    """A bad budgets mapping (not a mapping, a key not an exact non-empty str, a value not
    ``PortfolioLimits``, a budget with loss limits) is refused whole: the budgets in force stay,
    and so does every decision they make; at construction no gate is made."""
    before = everything(budgeted)
    with unchanged(ledger, budgeted), pytest.raises(exc, match="budgets") as info:
        budgeted.budgets = value
    assert names in str(info.value), info.value
    assert everything(budgeted) == before
    denial = budgeted.try_enter("AAA", 446, strategy="A")  # A's gross 55 + 446 > 500
    assert (denial.reason, denial.scope) == (DenyReason.MAX_GROSS_EXPOSURE, "A")
    with pytest.raises(ValueError, match="strategy"):
        budgeted.try_enter("AAA", 1, strategy="C")  # the refused budgets named C: not in force
    with pytest.raises(exc, match="budgets") as info:
        PortfolioGate(ledger, PortfolioLimits(), budgets=value)
    assert names in str(info.value), info.value


def test_budgets_read_back_read_only_and_as_of_the_assignment(
    ledger: PendingEntryLedger, gate: PortfolioGate
) -> None:
    """``gate.budgets`` is the budgets in force, read-only; the caller's dict is not kept (a
    later change to it would bypass the checks above), and None means no budgets."""
    mine = {"A": PortfolioLimits(max_order_notional=10)}
    gate.budgets = mine
    mine["A"] = PortfolioLimits()
    mine["B"] = PortfolioLimits()
    assert dict(gate.budgets) == {"A": PortfolioLimits(max_order_notional=10)}
    proxy: Any = gate.budgets
    with pytest.raises(TypeError):
        proxy["B"] = PortfolioLimits()
    assert gate.try_enter("AAA", 11, strategy="A").reason is DenyReason.MAX_ORDER_NOTIONAL
    with pytest.raises(ValueError, match="strategy"):
        gate.try_enter("AAA", 1, strategy="B")
    gate.budgets = None
    assert dict(gate.budgets) == {}
    assert dict(PortfolioGate(ledger, PortfolioLimits()).budgets) == {}


BAD_STRATEGIES: list[tuple[object, type[Exception] | tuple[type[Exception], ...]]] = [
    ("C", ValueError),  # a typo must not trade without limits
    ("a", ValueError),
    ("A ", ValueError),
    ("", ValueError),
    (b"A", (TypeError, ValueError)),
    (1, (TypeError, ValueError)),
    (("A",), (TypeError, ValueError)),
]
STRATEGY_IDS = [repr(v) for v, _ in BAD_STRATEGIES]


@pytest.mark.parametrize(("value", "exc"), BAD_STRATEGIES, ids=STRATEGY_IDS)
def test_try_enter_bad_strategy_reserves_nothing(
    ledger: PendingEntryLedger,
    budgeted: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """A strategy that is not exactly a budget's name is refused, naming the argument and the
    value: nothing reserved, nothing counted, on every source of positions it accepts."""
    before = everything(budgeted)
    with unchanged(ledger, budgeted), pytest.raises(exc, match="strategy") as info:
        budgeted.try_enter("DDD", 1, strategy=value)
    assert repr(value) in str(info.value), info.value
    with unchanged(ledger, budgeted), pytest.raises(exc, match="strategy"):
        budgeted.try_enter("DDD", 1, order_id="fresh", side="buy", strategy=value)
    assert everything(budgeted) == before
    assert budgeted.try_enter("DDD", 1, order_id="fresh", strategy="B")  # the id is still free


@pytest.mark.parametrize("positions", [{}, AAA_OPEN, lambda: AAA_OPEN], ids=repr)
def test_a_strategy_with_a_callers_positions_is_refused(
    ledger: PendingEntryLedger,
    budgeted: PortfolioGate,
    unchanged: Unchanged,
    positions: Positions,
) -> None:
    """A caller's positions carry no strategy: a budget is decided on the gate's own book only
    (``ValueError``, before the positions are read); without a strategy they decide as before."""
    calls: list[int] = []

    def counted() -> Book:
        calls.append(1)
        return dict(positions() if callable(positions) else positions)

    with unchanged(ledger, budgeted), pytest.raises(ValueError, match="strateg"):
        budgeted.try_enter("DDD", 1, positions, strategy="A")
    with unchanged(ledger, budgeted), pytest.raises(ValueError, match="strateg"):
        budgeted.try_enter("DDD", 1, counted, strategy="A")
    assert calls == []
    assert budgeted.try_enter("DDD", 1, positions)


BAD_BOOK_STRATEGIES: list[tuple[object, type[Exception] | tuple[type[Exception], ...]]] = [
    ("", ValueError),
    (b"A", TypeError),
    (1, TypeError),
    (["A"], TypeError),
]


@pytest.mark.parametrize(
    ("value", "exc"), BAD_BOOK_STRATEGIES, ids=[repr(v) for v, _ in BAD_BOOK_STRATEGIES]
)
def test_owned_book_bad_strategy(
    ledger: PendingEntryLedger,
    budgeted: PortfolioGate,
    unchanged: Unchanged,
    value: Any,
    exc: type[Exception],
) -> None:
    """The book methods take None or a non-empty exact str as the strategy (it need not have a
    budget: a position may outlive one); anything else is refused and changes nothing."""
    before = everything(budgeted)
    with unchanged(ledger, budgeted):
        with pytest.raises(exc, match="strategy"):
            budgeted.set_position("AAA", 1, strategy=value)
        with pytest.raises(exc, match="strategy"):
            budgeted.close_position("BBB", strategy=value)
        with pytest.raises(exc, match="strategy"):
            budgeted.confirm_fill("sa", 1, strategy=value)
        with pytest.raises(exc, match="strategy"):
            budgeted.confirm_fill("gone", 1, symbol="AAA", strategy=value)
        with pytest.raises(exc, match="strategy"):
            budgeted.positions(strategy=value)
    assert everything(budgeted) == before


def test_confirm_fill_under_another_strategy_changes_nothing(
    ledger: PendingEntryLedger, budgeted: PortfolioGate, unchanged: Unchanged
) -> None:
    """A fill naming a strategy other than its reservation's is refused whole, as a wrong
    symbol is; a strategy without a budget may still hold a position."""
    before = everything(budgeted)
    with unchanged(ledger, budgeted), pytest.raises(ValueError, match="strategy"):
        budgeted.confirm_fill("sa", 50, strategy="B")
    with unchanged(ledger, budgeted), pytest.raises(ValueError, match="strategy"):
        budgeted.confirm_fill("a", 50, strategy="A")  # "a" is the account's own order
    assert everything(budgeted) == before
    budgeted.set_position("ZZZ", 3, strategy="retired")
    assert budgeted.positions(strategy="retired") == {"ZZZ": 3}
