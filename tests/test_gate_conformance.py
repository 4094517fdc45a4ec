"""One suite of gate behaviour, run against both backends: in-process and Redis.

Every test body talks to the shared ``Gate`` protocol (``pendingledger.protocols``) only. The
``backend`` fixture builds an in-process ``PortfolioGate`` on a ``ManualClock`` or a
``RedisGate`` on a real ``redis-server`` (one per module, a fresh namespace per gate). Time moves
only through ``h.advance``, never by sleeping: the manual clock for the in-process gate; for Redis,
whose TTL runs on the server's clock, each gate's namespace has its server-side test clock frozen
when the gate is made, and ``h.advance`` moves every one the test made
(``pendingledger.redis.testing``).
"""

from __future__ import annotations

import datetime
import itertools
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, running_server

from pendingledger import (
    Latch,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Side,
    TradingState,
    _units,
    rules,
)
from pendingledger.limits import REASONS, Decision, DenyReason, denied
from pendingledger.protocols import Gate as GateLike
from pendingledger.protocols import ReservationHandle as ReservationLike
from pendingledger.testing import ManualClock, ManualWallClock

Limits = PortfolioLimits
R = DenyReason


@dataclass
class Harness:
    """``advance`` moves every clock the gates read (monotonic and wall alike); ``wall`` reads
    the wall clock a gate's loss latch runs on."""

    backend: str
    make_gate: Callable[..., GateLike]
    advance: Callable[[float], object]
    wall: Callable[[GateLike], float]
    short_ttl: float

    def gate(
        self, limits: PortfolioLimits | None = None, *, ttl: float = 60.0, **options: Any
    ) -> GateLike:
        """A gate on a fresh book; ``options`` are the backend's loss-latch keywords
        (``on_loss``, ``daily_reset``)."""
        return self.make_gate(limits or PortfolioLimits(), ttl, **options)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_server(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "memory":
        clock = ManualClock()
        wall = ManualWallClock()

        def make_memory(limits: PortfolioLimits, ttl: float, **options: Any) -> GateLike:
            ledger = PendingEntryLedger(ttl, clock=clock)
            return PortfolioGate(ledger, limits, wall_clock=wall, **options)

        def advance_memory(seconds: float) -> None:
            clock.advance(seconds)
            wall.advance(seconds)

        yield Harness("memory", make_memory, advance_memory, lambda _: wall(), 1.0)
        return

    import redis

    from pendingledger.redis import RedisGate
    from pendingledger.redis.testing import (
        advance_server_clock,
        freeze_server_clock,
        server_clock,
    )

    server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    gates: list[RedisGate] = []

    def make_redis(limits: PortfolioLimits, ttl: float, **options: Any) -> GateLike:
        namespace = f"t-{uuid.uuid4().hex[:12]}"
        gate = RedisGate(client, limits, ttl=ttl, namespace=namespace, **options)
        freeze_server_clock(gate)  # like the ManualClock: time moves only when the test says so
        gate.restore({})
        gates.append(gate)
        return gate

    def advance_redis(seconds: float) -> None:
        for gate in gates:
            advance_server_clock(gate, seconds)

    def wall_redis(gate: GateLike) -> float:
        assert isinstance(gate, RedisGate)
        return server_clock(gate)

    yield Harness("redis", make_redis, advance_redis, wall_redis, 1.0)
    client.close()


def res_of(decision: Decision) -> ReservationLike:
    assert decision, decision
    res: Any = decision.reservation
    assert isinstance(res, ReservationLike)
    return res


def is_active(res: ReservationLike) -> bool:
    return res.active  # a call, so mypy does not narrow the property across the gate's calls


def is_halted(gate: GateLike) -> bool:
    return gate.halted  # a call, so mypy does not narrow the property across halt()/resume()


def state_of(gate: GateLike) -> TradingState:
    return gate.state  # a call, as is_halted


def latch_of(gate: GateLike) -> Latch | None:
    return gate.latch  # a call, as is_halted


# ---------------------------------------------------------------------------- the seed behaviours


def test_reserve_and_release_round_trip(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=2, max_gross_exposure=1500))
    aaa = res_of(g.try_enter("AAA", 1000))
    assert g.try_enter("BBB", 500)
    assert g.try_enter("CCC", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.try_enter("AAA", 1).reason is R.MAX_GROSS_EXPOSURE  # 1500 gross already
    assert aaa.release() is True
    assert aaa.release() is False
    assert not aaa.active
    assert g.try_enter("CCC", 1000)  # AAA's slot and room are back: 500 + 1000 = 1500


def test_same_symbol_reservations_share_one_slot(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    assert g.try_enter("AAA", 10)
    assert g.try_enter("AAA", 20)
    assert g.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS


def test_reservations_expire_after_ttl(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1), ttl=h.short_ttl)
    res = res_of(g.try_enter("AAA", 10))
    assert math.isclose(res.expires_at - res.reserved_at, h.short_ttl, abs_tol=1e-6)
    assert g.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
    h.advance(h.short_ttl * 1.2)
    assert g.try_enter("BBB", 1)  # any decision sweeps what expired
    assert not res.active
    assert res.release() is False


def test_each_order_keeps_its_own_ttl(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=100), ttl=h.short_ttl)
    first = res_of(g.try_enter("AAA", 60))
    h.advance(h.short_ttl * 0.6)
    second = res_of(g.try_enter("AAA", 40))  # a top-up does not extend the first one's life
    h.advance(h.short_ttl * 0.6)
    assert g.try_enter("BBB", 60)  # the first one's 60 is free again, the second's 40 is not
    assert g.try_enter("BBB", 1).reason is R.MAX_GROSS_EXPOSURE
    assert not first.active
    assert second.active


# ---------------------------------------------------------------------------- the rules


def test_open_symbol_takes_no_new_slot(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    g.set_position("AAA", 100)
    assert g.try_enter("AAA", 10)
    assert g.try_enter("BBB", 10).reason is R.MAX_CONCURRENT_POSITIONS


def test_zero_positions_limit_only_admits_open_or_reserved_symbols(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=0))
    assert g.try_enter("AAA", 10).reason is R.MAX_CONCURRENT_POSITIONS
    g.set_position("AAA", -5)
    assert g.try_enter("AAA", 10)


def test_reserved_symbols_that_are_open_count_once(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=2))
    assert g.try_enter("AAA", 10)
    g.set_position("AAA", 10)  # open and still reserved: one slot
    assert g.try_enter("BBB", 10)
    assert g.try_enter("CCC", 10).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.close_position("AAA") is True  # AAA still reserved: still one slot
    assert g.try_enter("CCC", 10).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.release("AAA") is True
    assert g.try_enter("CCC", 10)


def test_gross_counts_absolute_exposure_and_admits_landing_on_the_limit(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=1000))
    g.set_position("AAA", -600)
    assert g.try_enter("BBB", 401).reason is R.MAX_GROSS_EXPOSURE
    assert g.try_enter("BBB", 400)
    assert g.try_enter("CCC", Decimal("0.000000001")).reason is R.MAX_GROSS_EXPOSURE


def test_symbol_limit(h: Harness) -> None:
    g = h.gate(Limits(max_symbol_exposure=500))
    g.set_position("AAA", -300)
    assert g.try_enter("AAA", 150)
    assert g.try_enter("AAA", 51).reason is R.MAX_SYMBOL_EXPOSURE
    assert g.try_enter("AAA", 50)
    assert g.try_enter("BBB", 500)


def test_rules_are_checked_in_order(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1, max_gross_exposure=100, max_symbol_exposure=50))
    assert g.try_enter("AAA", 50)
    g.halt()
    assert is_halted(g)
    assert g.try_enter("BBB", 1000).reason is R.HALTED
    g.resume()
    assert not is_halted(g)
    assert g.try_enter("BBB", 1000).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.try_enter("AAA", 1000).reason is R.MAX_GROSS_EXPOSURE
    assert g.try_enter("AAA", 1).reason is R.MAX_SYMBOL_EXPOSURE


def test_limits_can_be_replaced(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    assert g.try_enter("AAA", 1)
    assert not g.try_enter("BBB", 1)
    g.limits = Limits(max_concurrent_positions=2)
    assert g.limits == Limits(max_concurrent_positions=2)
    assert g.try_enter("BBB", 1)
    with pytest.raises(TypeError):
        g.limits = {"max_concurrent_positions": 3}  # type: ignore[assignment]


def test_exact_amounts_of_every_type(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=Decimal("1.0")))
    assert g.try_enter("AAA", 0.5)
    assert g.try_enter("BBB", Fraction(1, 4))
    assert g.try_enter("CCC", Decimal("0.125"))
    assert g.try_enter("DDD", 0.125)  # lands exactly on 1.0
    assert g.try_enter("EEE", Decimal("1e-9")).reason is R.MAX_GROSS_EXPOSURE


def test_many_float_reservations_release_to_exactly_zero(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=0.3))
    decisions = [g.try_enter("AAA", 0.1), g.try_enter("BBB", 0.1)]
    for decision in decisions:
        assert res_of(decision).release()
    assert g.try_enter("CCC", 0.3)  # nothing left over from the floats


# ---------------------------------------------------------------------------- releases


def test_release_order_drops_one_reservation_of_a_symbol(h: Harness) -> None:
    g = h.gate(Limits(max_symbol_exposure=100))
    assert g.try_enter("AAA", 60, order_id="o-1")
    assert g.try_enter("AAA", 40, order_id="o-2")
    assert g.release_order("o-1") is True
    assert g.release_order("o-1") is False
    assert g.try_enter("AAA", 61).reason is R.MAX_SYMBOL_EXPOSURE
    assert g.try_enter("AAA", 60)


def test_release_symbol_drops_all_its_reservations(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=100))
    a = res_of(g.try_enter("AAA", 30))
    b = res_of(g.try_enter("AAA", 30))
    c = res_of(g.try_enter("BBB", 40))
    assert g.release("AAA") is True
    assert g.release("AAA") is False
    assert not a.active and not b.active and c.active
    assert g.try_enter("CCC", 60)


def test_reduce_shrinks_then_ends(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=100))
    res = res_of(g.try_enter("AAA", 100))
    assert res.reduce(30) is True
    assert res.notional == 70
    assert res.initial_notional == 100
    assert g.try_enter("BBB", 31).reason is R.MAX_GROSS_EXPOSURE
    assert g.try_enter("BBB", 30)
    assert res.reduce(80) is True  # more than remains: ends it
    assert not res.active
    assert res.reduce(1) is False
    assert res.release() is False
    assert g.try_enter("CCC", 70)


def test_reduce_with_floats_reaches_zero(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=1))
    res = res_of(g.try_enter("AAA", 0.3))
    assert res.reduce(0.1)
    assert res.reduce(0.2)
    assert not res.active


def test_duplicate_order_id_is_refused_and_changes_nothing(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=100))
    assert g.try_enter("AAA", 50, order_id="dup")
    with pytest.raises(ValueError, match="dup"):
        g.try_enter("BBB", 10, order_id="dup")
    assert g.try_enter("CCC", 50)
    assert g.stats().admitted == 2


def test_generated_order_ids_are_distinct(h: Harness) -> None:
    g = h.gate()
    ids = {res_of(g.try_enter("AAA", 1)).order_id for _ in range(50)}
    assert len(ids) == 50


# ---------------------------------------------------------------------------- the book


def test_confirm_fill_moves_the_reservation_into_the_position(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1, max_gross_exposure=100))
    res = res_of(g.try_enter("AAA", 60, order_id="f-1"))
    assert g.confirm_fill("f-1", 60) is True
    assert not res.active
    assert g.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS  # AAA is open now
    assert g.try_enter("AAA", 41).reason is R.MAX_GROSS_EXPOSURE  # 60 open
    assert g.try_enter("AAA", 40)


def test_confirm_fill_after_the_reservation_ended(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    assert g.try_enter("AAA", 10, order_id="late")
    assert g.release_order("late")
    assert g.confirm_fill("late", 10) is False  # no symbol to book it on: nothing changes
    assert g.positions() == {}
    assert g.try_enter("BBB", 1)
    assert g.release("BBB")
    assert g.confirm_fill("late", 10, symbol="AAA") is False  # the position is recorded anyway
    assert list(g.positions()) == ["AAA"]
    assert g.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS


def test_confirm_fill_on_the_wrong_symbol_is_refused(h: Harness) -> None:
    g = h.gate()
    res = res_of(g.try_enter("AAA", 10, order_id="w-1"))
    with pytest.raises(ValueError):
        g.confirm_fill("w-1", 10, symbol="BBB")
    assert res.active


def test_close_position_frees_the_slot(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    g.set_position("AAA", 5)
    assert g.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.close_position("AAA") is True
    assert g.close_position("AAA") is False
    assert g.try_enter("BBB", 1)


def test_set_position_replaces_the_exposure(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=100))
    g.set_position("AAA", 90)
    assert not g.try_enter("BBB", 20)
    g.set_position("AAA", -50)
    assert g.try_enter("BBB", 50)


def test_positions_reads_the_book(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=2))
    g.set_position("AAA", -600)
    g.set_position("BBB", Decimal("0.5"))
    g.set_position("CCC", 0)  # open with no exposure: still holds a slot
    assert g.positions() == {"AAA": -600, "BBB": Decimal("0.5"), "CCC": 0}
    assert g.try_enter("DDD", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.close_position("CCC")
    assert g.positions() == {"AAA": -600, "BBB": Decimal("0.5")}


def test_positions_come_back_in_the_kind_given(h: Harness) -> None:
    """A bot that keeps floats gets floats back (``current + 2500.0`` must work), and so on for
    every kind, exact to 10**-9 units."""
    g = h.gate()
    book: dict[str, _units.Number] = {
        "F": 2500.25,
        "I": -7,
        "D": Decimal("0.125"),
        "Q": Fraction(1, 4),
        "Z": 0.0,
    }
    for symbol, exposure in book.items():
        g.set_position(symbol, exposure)
    got = g.positions()
    assert got == book
    assert {s: type(v) for s, v in got.items()} == {s: type(v) for s, v in book.items()}
    current = got["F"]
    assert isinstance(current, float) and current + 2500.0 == 5000.25
    assert g.confirm_fill(res_of(g.try_enter("F", 1.5)).order_id, 2501.75) is True
    assert g.positions()["F"] == 2501.75 and isinstance(g.positions()["F"], float)


def test_reduce_order_shrinks_by_order_id_then_ends(h: Harness) -> None:
    g = h.gate(Limits(max_gross_exposure=100))
    res = res_of(g.try_enter("AAA", 100, order_id="r-1"))
    assert g.reduce_order("r-1", 30) is True
    assert g.try_enter("BBB", 31).reason is R.MAX_GROSS_EXPOSURE  # 70 still reserved
    assert g.try_enter("BBB", 30)
    assert is_active(res)
    assert g.reduce_order("r-1", 70) is True  # the rest: it ends, as filled
    assert not is_active(res)
    assert g.reduce_order("r-1", 1) is False
    assert g.reduce_order("never-made", 1) is False
    assert g.try_enter("CCC", 70)


def test_reduce_order_counts_as_the_handle_does(h: Harness) -> None:
    g = h.gate()
    by_handle = res_of(g.try_enter("AAA", 1, order_id="a"))
    assert g.try_enter("BBB", 1, order_id="b")
    for part in (Fraction(1, 3), Fraction(1, 3)):
        assert by_handle.reduce(part)
        assert g.reduce_order("b", part)
    assert reservation_counts(g)[:2] == (2, 2 * Fraction(333_333_334, 10**9))
    assert by_handle.reduce(Fraction(1, 3)) and g.reduce_order("b", Fraction(1, 3))
    assert reservation_counts(g)[0] == 0


def test_a_partial_fill_books_the_position_and_the_reduction_together(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1, max_gross_exposure=100))
    res = res_of(g.try_enter("AAA", 100, order_id="p-1"))
    assert g.confirm_fill("p-1", 40, filled=40) is True
    assert is_active(res)
    assert g.positions() == {"AAA": 40}
    assert reservation_counts(g)[:2] == (1, 60)  # 40 open + 60 reserved: still 100 in all
    assert g.try_enter("AAA", 1).reason is R.MAX_GROSS_EXPOSURE
    assert g.confirm_fill("p-1", 100, filled=60) is True  # the rest: the reservation ends
    assert not is_active(res)
    assert g.positions() == {"AAA": 100}
    assert reservation_counts(g)[:2] == (0, 0)
    assert g.confirm_fill("p-1", 100, filled=1) is False  # nothing outstanding any more


@pytest.mark.parametrize("amount", [0, -1, math.nan, math.inf, Decimal("NaN"), True, "5"])
def test_bad_fill_amounts_change_nothing(h: Harness, amount: object) -> None:
    g = h.gate(Limits(max_gross_exposure=100))
    res = res_of(g.try_enter("AAA", 100, order_id="x-1"))
    with pytest.raises((ValueError, TypeError), match="amount"):
        g.reduce_order("x-1", amount)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="filled"):
        g.confirm_fill("x-1", 50, filled=amount)  # type: ignore[arg-type]
    assert res.active and res.notional == 100
    assert g.positions() == {}
    assert g.try_enter("BBB", 1).reason is R.MAX_GROSS_EXPOSURE
    with pytest.raises((ValueError, TypeError), match="order_id"):
        g.reduce_order("", 1)


# ---------------------------------------------------------------------------- stats


def test_stats_count_decisions(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    assert g.try_enter("AAA", 1)
    assert not g.try_enter("BBB", 1)
    g.halt()
    assert not g.try_enter("AAA", 1)
    g.resume()
    stats = g.stats()
    assert stats.admitted == 1
    assert stats.denied[R.MAX_CONCURRENT_POSITIONS] == 1
    assert stats.denied[R.HALTED] == 1
    assert set(stats.denied) == set(DenyReason)


def reservation_counts(g: GateLike) -> tuple[int, object, int]:
    """(outstanding, reserved gross, expired): the ledger's stats in process, the namespace's
    for Redis (``GateStats`` itself has no reservation counts)."""
    stats: Any = g.ledger.stats() if isinstance(g, PortfolioGate) else g.stats()
    return stats.outstanding, stats.gross_notional, stats.expired


def test_stats_after_the_ttl_count_nothing_outstanding(h: Harness) -> None:
    g = h.gate(ttl=h.short_ttl)
    assert g.try_enter("AAA", 10)
    assert g.try_enter("BBB", 5)
    assert reservation_counts(g) == (2, 15, 0)
    h.advance(h.short_ttl)  # and no other call: stats itself must see the expiry
    assert reservation_counts(g) == (0, 0, 2)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("notional", "error"),
    [
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        (0, ValueError),
        (0.0, ValueError),
        (-1, ValueError),
        (Decimal("NaN"), ValueError),
        (Decimal("-0.5"), ValueError),
        (Fraction(0), ValueError),
        (True, TypeError),
        ("100", TypeError),
        (None, TypeError),
    ],
)
def test_bad_notional_changes_nothing(h: Harness, notional: object, error: type) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    with pytest.raises(error, match="notional"):
        g.try_enter("AAA", notional)  # type: ignore[arg-type]
    assert g.stats().admitted == 0
    assert g.try_enter("BBB", 1)  # the slot is still free


@pytest.mark.parametrize(
    ("symbol", "error"), [(None, TypeError), ("", ValueError), ([], TypeError)]
)
def test_bad_symbol_changes_nothing(h: Harness, symbol: object, error: type) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    with pytest.raises(error, match="symbol"):
        g.try_enter(symbol, 1)  # type: ignore[arg-type]
    assert g.try_enter("BBB", 1)


@pytest.mark.parametrize("exposure", [math.nan, math.inf, Decimal("sNaN"), None, "5", True])
def test_bad_exposure_changes_nothing(h: Harness, exposure: object) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    with pytest.raises((ValueError, TypeError)):
        g.set_position("AAA", exposure)  # type: ignore[arg-type]
    assert g.try_enter("BBB", 1)


# ---------------------------------------------------------------------------- the rule function
#
# Every backend must decide as pendingledger.rules.first_failing_rule does: the in-process gate
# calls it, gate.lua is a port of it, and BrokenGate calls it on figures of its own. The table
# drives each through the edges of every rule, in every trading state and for every side, and
# the expected outcome is the rule function's answer on figures this test sums afresh from the
# state it set up (so a backend that gathered its figures wrongly, or a script that ported a
# rule wrongly, fails here).

# The state every case starts from: signed exposures as set, and reservations (symbol,
# notional, side): AAA long with a pending sell, BBB short with a pending buy (both reducing).
TABLE_POSITIONS: dict[str, Any] = {"AAA": 600, "BBB": Decimal("-300.5")}
TABLE_RESERVED: list[tuple[str, Any, Side | None]] = [
    ("AAA", 100, None),
    ("CCC", 0.25, None),
    ("AAA", 250, Side.SELL),
    ("BBB", 200, Side.BUY),
]
TABLE_SYMBOLS = {"AAA": "open and reserved", "BBB": "open", "CCC": "reserved", "DDD": "new"}
TABLE_STATES = {
    TradingState.ACTIVE: rules.ACTIVE,
    TradingState.REDUCING: rules.REDUCING,
    TradingState.HALTED: rules.HALTED_STATE,
}


@dataclass(frozen=True)
class Figures:
    """The rules' inputs for one order, in units, summed from TABLE_POSITIONS/TABLE_RESERVED."""

    open_count: int
    symbol_open: bool
    gross: int
    before: int
    after: int
    net_before: int
    net_after: int
    units: int
    orders: int
    symbol_orders: int

    @classmethod
    def of(cls, symbol: str, notional: Any, side: Side | None) -> Figures:
        signed = {s: _units.units("exposure", v, True) for s, v in TABLE_POSITIONS.items()}
        pending: dict[tuple[str, Side | None], int] = {}
        for s, n, d in TABLE_RESERVED:
            pending[s, d] = pending.get((s, d), 0) + _units.notional_units("notional", n)
        units = _units.notional_units("notional", notional)
        reserved = {s for s, _ in pending}

        def sums(symbol: str | None, extra: int) -> tuple[int, int, int]:
            def of_side(d: Side | None) -> int:
                more = extra if d is side else 0
                return more + sum(
                    n for (s, e), n in pending.items() if e is d and symbol in (None, s)
                )

            return of_side(Side.BUY), of_side(Side.SELL), of_side(None)

        def worst(symbol: str | None, extra: int) -> int:
            position = sum(signed.values()) if symbol is None else signed.get(symbol, 0)
            return rules.worst_case(position, *sums(symbol, extra))

        symbols = set(signed) | reserved
        return cls(
            open_count=len(symbols),
            symbol_open=symbol in symbols,
            gross=sum(worst(s, 0) for s in symbols),
            before=worst(symbol, 0),
            after=worst(symbol, units),
            net_before=worst(None, 0),
            net_after=worst(None, units),
            units=units,
            orders=len(TABLE_RESERVED),
            symbol_orders=sum(1 for s, _, _ in TABLE_RESERVED if s == symbol),
        )

    def expected(self, limits: PortfolioLimits, state: int) -> DenyReason | None:
        code = rules.first_failing_rule(
            rules.unit_limits(limits),
            state,
            self.open_count,
            self.symbol_open,
            self.gross,
            self.before,
            self.after,
            self.net_before,
            self.net_after,
            self.units,
            self.orders,
            self.symbol_orders,
            rules.NO_WINDOW,  # the table sets no rate limit
            0.0,
        )
        return REASONS[code]


def _edges(f: Figures) -> dict[str, list[tuple[str, Any]]]:
    """Each limit unset, exactly what the order leaves (it lands on the limit), and one unit
    less (it would be one unit over); for positions, full (a new symbol would be one over), one
    slot left, and zero (only symbols open or reserved pass)."""
    gross_at = f.gross - f.before + f.after
    return {
        "positions": [
            ("unset", None),
            ("full", f.open_count),
            ("one slot left", f.open_count + 1),
            ("zero", 0),
        ],
        "gross": [
            ("unset", None),
            ("at", Decimal(gross_at).scaleb(-9)),
            ("one unit over", Decimal(gross_at - 1).scaleb(-9)),
        ],
        "symbol": [
            ("unset", None),
            ("at", Fraction(f.after, 10**9)),
            ("one unit over", Fraction(f.after - 1, 10**9)),
            # a limit finer than a unit rounds down: one tenth of a unit short is a unit short
            ("a tenth of a unit over", Fraction(10 * f.after - 1, 10**10)),
        ],
        "net": [
            ("unset", None),
            ("at", Fraction(f.net_after, 10**9)),
            ("one unit over", Fraction(f.net_after - 1, 10**9)),
        ],
    }


def _set_up_table(gate: GateLike) -> None:
    gate.limits = PortfolioLimits()
    for symbol, exposure in TABLE_POSITIONS.items():
        gate.set_position(symbol, exposure)
    for symbol, notional, side in TABLE_RESERVED:
        assert gate.try_enter(symbol, notional, side=side)


def _set_state(gate: GateLike, state: TradingState) -> None:
    {
        TradingState.ACTIVE: gate.resume,
        TradingState.REDUCING: gate.reduce_only,
        TradingState.HALTED: gate.halt,
    }[state]()
    assert state_of(gate) is state


def drive_table(gate: GateLike) -> dict[DenyReason | None, int]:
    """Every case of the table on ``gate``: the decision must be the rule function's. Admitted
    orders are released again, so each case starts from the same state. Returns the outcomes
    seen, so a caller can check the table reached every rule."""
    _set_up_table(gate)
    seen: dict[DenyReason | None, int] = {}
    for state, code in TABLE_STATES.items():
        _set_state(gate, state)
        for symbol, kind in TABLE_SYMBOLS.items():
            notionals: tuple[int | Fraction, ...] = (50, Fraction(1, 3))
            sides: tuple[Side | None, ...] = (None, *Side)
            for notional, side in itertools.product(notionals, sides):
                figures = Figures.of(symbol, notional, side)
                edges = _edges(figures)
                for (pn, positions), (gn, gross), (sn, per_symbol), (nn, net) in itertools.product(
                    edges["positions"], edges["gross"], edges["symbol"], edges["net"]
                ):
                    limits = PortfolioLimits(positions, gross, per_symbol, net)
                    gate.limits = limits
                    decision = gate.try_enter(symbol, notional, side=side)
                    want = figures.expected(limits, code)
                    case = f"{kind} {symbol} {side} {notional!r}, {state}, {pn}/{gn}/{sn}/{nn}"
                    assert decision.reason is want, f"{case}: {decision!r}, want {want}"
                    if decision:
                        assert res_of(decision).release() is True, case
                    seen[want] = seen.get(want, 0) + 1
    gate.resume()
    return seen


ALL_OUTCOMES = {
    None,
    DenyReason.HALTED,
    DenyReason.REDUCING_ONLY,
    DenyReason.MAX_CONCURRENT_POSITIONS,
    DenyReason.MAX_GROSS_EXPOSURE,
    DenyReason.MAX_SYMBOL_EXPOSURE,
    DenyReason.MAX_NET_EXPOSURE,
}


def test_every_rule_edge_decides_as_the_rule_function(h: Harness) -> None:
    """The table on each backend: gate.lua is held to rules.first_failing_rule here."""
    seen = drive_table(h.gate())
    assert set(seen) == ALL_OUTCOMES, seen


def test_the_broken_gate_decides_the_table_as_the_rule_function() -> None:
    """Sequentially (nothing to race) the check-then-act gate's own figures are right too."""
    from pendingledger.sim import BrokenGate

    gate = BrokenGate(PendingEntryLedger(60.0, clock=ManualClock()), PortfolioLimits())
    assert set(drive_table(gate)) == ALL_OUTCOMES


def test_lua_names_only_reasons_the_client_maps() -> None:
    """Every reason gate.lua can deny with is a DenyReason the client turns into its shared
    denied decision (an unknown one would fail closed as BACKEND_UNAVAILABLE)."""
    pytest.importorskip("redis")
    from pendingledger.redis import SCRIPT
    from pendingledger.redis._gate import DENIALS

    named = set(re.findall(r"deny\(mode, '(\w+)'", SCRIPT))
    named |= set(re.findall(r"return '(reducing_only|max_\w+)'", SCRIPT))
    assert named == {
        "halted",
        "reducing_only",
        "max_concurrent_positions",
        "max_gross_exposure",
        "max_symbol_exposure",
        "max_net_exposure",
        "max_order_notional",
        "max_open_orders",
        "max_open_orders_per_symbol",
        "max_orders_per_interval",
        "book_not_restored",
    }
    for name in named:
        assert DENIALS[name] is denied(DenyReason(name))
    assert set(DENIALS) == {reason.value for reason in DenyReason}  # LOCK_TIMEOUT too


def test_a_tenth_plus_two_tenths_fits_three_tenths(h: Harness) -> None:
    """Floats count as the decimals they print as: 0.1 + 0.2 lands exactly on 0.3."""
    assert 0.1 + 0.2 > 0.3  # as floats it would not fit
    g = h.gate(Limits(max_gross_exposure=0.3, max_symbol_exposure=0.3))
    assert g.try_enter("AAA", 0.1)
    assert g.try_enter("AAA", 0.2)  # 0.3 on the symbol and in all: admitted
    assert g.try_enter("BBB", 1e-9).reason is R.MAX_GROSS_EXPOSURE  # one unit more is not
    g = h.gate(Limits(max_symbol_exposure=0.3))
    g.set_position("AAA", -0.1)
    assert g.try_enter("AAA", 0.2)  # |-0.1| + 0.2: on the limit
    assert g.try_enter("AAA", 1e-9).reason is R.MAX_SYMBOL_EXPOSURE


# ---------------------------------------------------------------------------- sides and states


def test_a_buy_that_reduces_a_short_is_admitted_and_side_none_keeps_the_old_figures(
    h: Harness,
) -> None:
    """The issue's own case: a short of -8,000 under a symbol limit of 10,000."""
    g = h.gate(Limits(max_symbol_exposure=10_000))
    g.set_position("AAA", -8_000)
    assert g.try_enter("AAA", 5_000).reason is R.MAX_SYMBOL_EXPOSURE  # unknown side: 13,000
    buy = res_of(g.try_enter("AAA", 5_000, side=Side.BUY))  # worst case stays 8,000
    assert buy.side is Side.BUY
    assert g.try_enter("AAA", 2_001, side="sell").reason is R.MAX_SYMBOL_EXPOSURE  # -10,001
    assert g.try_enter("AAA", 2_000, side="sell")  # lands on -10,000


def test_a_reducing_sell_passes_a_full_gate(h: Harness) -> None:
    g = h.gate(Limits(max_concurrent_positions=1, max_gross_exposure=10_000))
    g.set_position("AAA", 10_000)
    assert g.try_enter("AAA", 1, side=Side.BUY).reason is R.MAX_GROSS_EXPOSURE
    assert g.try_enter("AAA", 4_000, side=Side.SELL)  # lowers no figure: admitted
    assert g.try_enter("BBB", 1, side=Side.SELL).reason is R.MAX_CONCURRENT_POSITIONS
    assert g.try_enter("AAA", 4_000).reason is R.MAX_GROSS_EXPOSURE  # unknown side adds


def test_two_reducing_sells_cannot_both_flip_past_the_limit(h: Harness) -> None:
    """Each sell alone flips a long of 10,000 to a short of 2,000; together to 14,000."""
    g = h.gate(Limits(max_symbol_exposure=10_000, max_gross_exposure=10_000))
    g.set_position("AAA", 10_000)
    first = res_of(g.try_enter("AAA", 12_000, side=Side.SELL))
    assert g.try_enter("AAA", 12_000, side=Side.SELL).reason is R.MAX_GROSS_EXPOSURE
    g.limits = Limits(max_symbol_exposure=10_000)
    assert g.try_enter("AAA", 12_000, side=Side.SELL).reason is R.MAX_SYMBOL_EXPOSURE
    assert first.release() is True
    assert g.try_enter("AAA", 12_000, side=Side.SELL)


def test_net_exposure_limit(h: Harness) -> None:
    g = h.gate(Limits(max_net_exposure=10_000))
    g.set_position("AAA", 6_000)
    assert g.try_enter("BBB", 4_001, side=Side.BUY).reason is R.MAX_NET_EXPOSURE
    assert g.try_enter("BBB", 4_000, side=Side.BUY)  # lands on 10,000
    assert g.try_enter("CCC", 1).reason is R.MAX_NET_EXPOSURE  # unknown side counts long too
    assert g.try_enter("CCC", 9_000, side=Side.SELL)  # a short hedges: the net falls
    g.limits = Limits(max_net_exposure=5_000)  # over the new limit already...
    assert g.try_enter("AAA", 1, side=Side.SELL)  # ...a sell still lowers nothing: admitted
    assert g.try_enter("AAA", 1, side=Side.BUY).reason is R.MAX_NET_EXPOSURE


def test_reducing_state_admits_only_orders_that_raise_no_figure(h: Harness) -> None:
    g = h.gate(Limits())
    g.set_position("AAA", 10_000)
    g.reduce_only()
    assert state_of(g) is TradingState.REDUCING and not is_halted(g)
    assert g.try_enter("AAA", 4_000, side=Side.SELL)
    assert g.try_enter("AAA", 1, side=Side.BUY).reason is R.REDUCING_ONLY
    assert g.try_enter("AAA", 1).reason is R.REDUCING_ONLY  # unknown side: it might add
    assert g.try_enter("CCC", 1, side=Side.SELL).reason is R.REDUCING_ONLY  # opens a short
    assert g.try_enter("AAA", 16_001, side=Side.SELL).reason is R.REDUCING_ONLY  # -10,001
    assert g.try_enter("AAA", 16_000, side=Side.SELL)  # both sells filled: -10,000, no worse
    g.resume()
    assert state_of(g) is TradingState.ACTIVE
    assert g.try_enter("CCC", 1, side=Side.SELL)


def test_in_reducing_covering_a_short_may_still_raise_the_net(h: Harness) -> None:
    g = h.gate(Limits())
    g.set_position("AAA", 10_000)
    g.set_position("BBB", -500)  # the book's net: 9,500 long
    g.reduce_only()
    # Covering BBB lowers BBB's worst case but raises the book's net long: a figure.
    assert g.try_enter("BBB", 500, side=Side.BUY).reason is R.REDUCING_ONLY
    g.set_position("AAA", 0)  # now the net is short: the same buy lowers both
    assert g.try_enter("BBB", 500, side=Side.BUY)


def test_halted_admits_nothing_not_even_a_reducing_order(h: Harness) -> None:
    g = h.gate(Limits())
    g.set_position("AAA", 10_000)
    g.halt()
    assert state_of(g) is TradingState.HALTED and is_halted(g)
    assert g.try_enter("AAA", 1, side=Side.SELL).reason is R.HALTED
    g.reduce_only()
    assert g.try_enter("AAA", 1, side=Side.SELL)


def test_stats_carry_the_state_and_count_the_new_reasons(h: Harness) -> None:
    g = h.gate(Limits(max_net_exposure=1))
    assert g.try_enter("AAA", 2).reason is R.MAX_NET_EXPOSURE
    g.reduce_only()
    assert g.try_enter("AAA", 1).reason is R.REDUCING_ONLY
    stats = g.stats()
    assert stats.state is TradingState.REDUCING and stats.latch is None
    assert stats.denied[R.MAX_NET_EXPOSURE] == 1 and stats.denied[R.REDUCING_ONLY] == 1


@pytest.mark.parametrize(
    ("side", "error"),
    [
        ("long", ValueError),
        ("BUY", ValueError),
        ("", ValueError),
        (1, TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_side_is_refused_and_changes_nothing(h: Harness, side: object, error: type) -> None:
    g = h.gate(Limits(max_concurrent_positions=1))
    with pytest.raises(error, match="side"):
        g.try_enter("AAA", 1, side=side)  # type: ignore[arg-type]
    assert g.try_enter("BBB", 1)  # nothing was reserved: the one slot is free
    assert g.stats().decisions == 1


# ---------------------------------------------------------------------------- the loss latch


def next_midnight(h: Harness, gate: GateLike) -> float:
    """Seconds from the gate's wall clock to the next midnight UTC."""
    now = h.wall(gate)
    return rules.next_reset(now, 0) - now


def test_daily_loss_latches_reducing_until_the_daily_reset(h: Harness) -> None:
    g = h.gate(Limits(max_daily_loss=1_000))
    g.set_position("AAA", 10_000)
    g.record_pnl(-600)
    g.record_pnl(Decimal("-399.999999999"))
    assert state_of(g) is TradingState.ACTIVE and latch_of(g) is None  # a unit short of the limit
    g.record_pnl(Decimal("-0.000000001"))  # reaches -1,000: latches
    latch = latch_of(g)
    assert latch is not None and state_of(g) is TradingState.REDUCING
    assert (latch.state, latch.reason, latch.limit, latch.value) == (
        TradingState.REDUCING,
        "max_daily_loss",
        1_000,
        -1_000,
    )
    assert latch.until == rules.next_reset(latch.at, 0)
    assert g.stats().latch == latch
    assert g.try_enter("BBB", 1).reason is R.REDUCING_ONLY
    assert g.try_enter("AAA", 1_000, side=Side.SELL)  # closing out is what a latch is for
    h.advance(next_midnight(h, g) - 1)
    assert g.try_enter("BBB", 1).reason is R.REDUCING_ONLY
    h.advance(1)  # midnight UTC: a new day
    assert g.try_enter("BBB", 1)
    assert state_of(g) is TradingState.ACTIVE and latch_of(g) is None
    g.record_pnl(-999)  # the day's P&L started again from 0
    assert latch_of(g) is None


def test_the_latch_can_halt_and_an_operator_can_resume(h: Harness) -> None:
    g = h.gate(Limits(max_daily_loss=100), on_loss=TradingState.HALTED)
    g.set_position("AAA", 10_000)
    g.record_pnl(-150)
    assert state_of(g) is TradingState.HALTED and is_halted(g)
    assert g.try_enter("AAA", 1, side=Side.SELL).reason is R.HALTED
    g.resume()  # clears the latch and its measuring period
    assert state_of(g) is TradingState.ACTIVE and latch_of(g) is None
    g.record_pnl(-99)
    assert latch_of(g) is None
    g.record_pnl(-1)
    assert state_of(g) is TradingState.HALTED


def test_drawdown_is_measured_from_the_peak(h: Harness) -> None:
    g = h.gate(Limits(max_drawdown=500))
    for equity in (10_000, 10_400, 9_950, 10_100):  # 450 below the peak at worst
        g.set_equity(equity)
    assert latch_of(g) is None
    g.set_equity(9_900)  # 500 below 10,400
    latch = latch_of(g)
    assert latch is not None
    assert (latch.reason, latch.limit, latch.value) == ("max_drawdown", 500, 500)
    g.set_equity(20_000)  # a recovery does not clear a latch
    assert state_of(g) is TradingState.REDUCING
    h.advance(next_midnight(h, g))
    assert latch_of(g) is None
    g.set_equity(19_600)  # the new day's peak is the last equity, 20,000: 400 below
    assert latch_of(g) is None


def test_the_first_latch_wins_and_a_later_daily_reset_time_is_kept(h: Harness) -> None:
    g = h.gate(Limits(max_daily_loss=100, max_drawdown=50), daily_reset=datetime.time(21, 30))
    g.set_equity(1_000)
    g.record_pnl(-100)
    g.set_equity(900)
    latch = latch_of(g)
    assert latch is not None and latch.reason == "max_daily_loss"
    assert latch.until == rules.next_reset(latch.at, 21 * 3600 + 1800)
    assert datetime.datetime.fromtimestamp(latch.until, datetime.UTC).time() == datetime.time(
        21, 30
    )


@pytest.mark.parametrize("amount", [math.nan, math.inf, Decimal("NaN"), None, "5", True])
def test_bad_loss_amounts_are_refused(h: Harness, amount: object) -> None:
    g = h.gate(Limits(max_daily_loss=1, max_drawdown=1))
    with pytest.raises((TypeError, ValueError), match="amount"):
        g.record_pnl(amount)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="equity"):
        g.set_equity(amount)  # type: ignore[arg-type]
    assert latch_of(g) is None


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_loss": TradingState.ACTIVE}, ValueError),
        ({"on_loss": "stop"}, ValueError),
        ({"on_loss": 2}, TypeError),
        ({"daily_reset": "00:00"}, TypeError),
        (
            {
                "daily_reset": datetime.time(
                    0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
                )
            },
            ValueError,
        ),
    ],
)
def test_bad_latch_options_are_refused(h: Harness, options: dict[str, Any], error: type) -> None:
    name = next(iter(options))
    with pytest.raises(error, match=name):
        h.gate(Limits(), **options)


@pytest.mark.parametrize("limit", [0, -1, math.nan])
def test_loss_limits_must_be_positive(limit: object) -> None:
    for name in ("max_daily_loss", "max_drawdown"):
        with pytest.raises(ValueError, match=name):
            PortfolioLimits(**{name: limit})  # type: ignore[arg-type]
