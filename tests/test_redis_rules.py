"""Issue 12 on Redis: sides and worst-case figures, the net limit, trading states, the loss latch.

The rule lives in ``rules.first_failing_rule``; gate.lua is its held copy. The model test drives
a gate through every kind of change (signed positions, entries of each side, releases, partial
and full fills, expiry, restore) and checks each decision against the rule function over figures
recomputed in Python, and the namespace's audit (every kept total recomputed from the records)
after each step. The latch tests run on the namespace's server test clock, never by sleeping.
"""

from __future__ import annotations

import datetime
import random
import threading
import uuid
from typing import Any

import pytest
from redis_server import CommandLog, RedisServer

from pendingledger import PortfolioLimits, _units, rules
from pendingledger.decision import REASONS, DenyReason
from pendingledger.limits import Decision
from pendingledger.trading import Latch, Side, TradingState

redis = pytest.importorskip("redis")

from redis_gates import new_gate, res  # noqa: E402

from pendingledger.redis import OpenOrder, RedisGate, RedisReservation  # noqa: E402
from pendingledger.redis._audit import LAYOUT, pack_state, unpack_state  # noqa: E402
from pendingledger.redis.testing import (  # noqa: E402
    advance_server_clock,
    server_clock,
)

pytestmark = pytest.mark.redis
R = DenyReason
Limits = PortfolioLimits
U = _units.SCALE
DAY = 86_400.0


def state_of(gate: RedisGate) -> TradingState:
    return gate.state  # a call: mypy does not narrow it across the server calls between


def latch_of(gate: RedisGate) -> Latch | None:
    return gate.latch


def same_namespace(gate: RedisGate, **kwargs: Any) -> RedisGate:
    """A second gate object on the gate's namespace, as another process would make it."""
    return RedisGate(gate.client, gate.limits, ttl=gate.ttl, namespace=gate.namespace, **kwargs)


def to_midnight(gate: RedisGate) -> float:
    """Move the namespace's clock to the next UTC midnight's first microsecond after it, and
    return that midnight (Unix seconds)."""
    now = server_clock(gate)
    midnight = rules.next_reset(now, 0.0)
    advance_server_clock(gate, midnight - now)
    return midnight


# ---------------------------------------------------------------------------- sides and figures


def test_a_buy_that_reduces_a_short_is_admitted_under_the_symbol_limit(client: Any) -> None:
    gate = new_gate(client, Limits(max_symbol_exposure=10_000))
    gate.set_position("AAA", -8_000)
    assert gate.try_enter("AAA", 5_000).reason is R.MAX_SYMBOL_EXPOSURE  # side unknown: 13,000
    assert gate.try_enter("AAA", 5_000, side=Side.BUY)  # worst case stays 8,000
    assert gate.try_enter("AAA", 2_001, side="sell").reason is R.MAX_SYMBOL_EXPOSURE  # -10,001
    assert gate.audit(gate.limits) == []


def test_two_reducing_sells_cannot_both_flip_past_the_limit(client: Any) -> None:
    gate = new_gate(client, Limits(max_symbol_exposure=10_000, max_gross_exposure=10_000))
    gate.set_position("AAA", 10_000)
    assert gate.try_enter("AAA", 15_000, side="sell")  # worst case max(10,000, 5,000)
    assert gate.try_enter("AAA", 10_000, side="sell").reason is R.MAX_GROSS_EXPOSURE  # -15,000
    assert gate.try_enter("AAA", 5_000, side="sell")  # lands on -10,000: admitted
    assert gate.snapshot().figures().symbols == {"AAA": 10_000 * U}


def test_the_net_limit_bounds_the_sum_and_admits_what_lowers_it(client: Any) -> None:
    gate = new_gate(client, Limits(max_net_exposure=10_000))
    gate.set_position("AAA", 6_000)
    gate.set_position("BBB", 3_000)
    assert gate.try_enter("CCC", 2_000, side="buy").reason is R.MAX_NET_EXPOSURE
    assert gate.try_enter("CCC", 1_000, side="buy")  # net 10,000: on the limit
    assert gate.try_enter("DDD", 5_000, side="sell")  # lowers the long side: net stays
    assert gate.try_enter("DDD", 1, side="buy").reason is R.MAX_NET_EXPOSURE
    stats = gate.stats()
    assert stats.denied[R.MAX_NET_EXPOSURE] == 2
    assert gate.audit(gate.limits) == []


def test_reducing_admits_only_orders_that_raise_no_figure(client: Any) -> None:
    gate = new_gate(client)
    gate.set_position("AAA", 10_000)
    gate.reduce_only()
    assert state_of(gate) is TradingState.REDUCING and not gate.halted
    assert gate.try_enter("AAA", 4_000, side="sell")
    assert gate.try_enter("AAA", 1, side="buy").reason is R.REDUCING_ONLY
    assert gate.try_enter("AAA", 1).reason is R.REDUCING_ONLY  # unknown side raises it
    assert gate.try_enter("BBB", 1, side="sell").reason is R.REDUCING_ONLY  # opens a symbol
    gate.halt()
    assert gate.try_enter("AAA", 1, side="sell").reason is R.HALTED
    gate.resume()
    assert state_of(gate) is TradingState.ACTIVE and gate.try_enter("BBB", 1, side="buy")
    stats = gate.stats()
    assert (stats.denied[R.REDUCING_ONLY], stats.denied[R.HALTED]) == (3, 1)


def test_an_order_of_unknown_side_beside_pending_sells_counts_them(client: Any) -> None:
    """With sells pending a symbol's worst case is no longer |p| + u: the side-blind shortcut
    must not be taken (it would count the sells on top of a long they reduce)."""
    gate = new_gate(client, Limits(max_symbol_exposure=15))
    gate.set_position("AAA", 10)
    assert gate.try_enter("AAA", 10, side="sell")  # worst case max(10, 0)
    unknown = res(gate.try_enter("AAA", 5))  # max(15, 5): on the limit
    assert gate.try_enter("AAA", 1).reason is R.MAX_SYMBOL_EXPOSURE
    assert unknown.release()
    assert gate.audit(gate.limits) == []
    assert gate.snapshot().gross() == 10


def test_a_decision_with_a_side_is_one_fcall(client: Any, server: RedisServer) -> None:
    gate = new_gate(client, Limits(max_net_exposure=100, max_gross_exposure=100))
    assert gate.try_enter("WARM", 1, side="buy")
    with CommandLog(server.url) as log:
        assert gate.try_enter("AAA", 1, side="sell")
        assert gate.try_enter("AAA", 1_000, side="buy").reason is R.MAX_GROSS_EXPOSURE
    assert log.commands == ["FCALL"] * 2


@pytest.mark.parametrize("side", ["BUY", "short", 1, b"buy", object()])
def test_a_bad_side_is_refused_before_anything_is_sent(client: Any, side: Any) -> None:
    gate = new_gate(client)
    error = ValueError if isinstance(side, str) else TypeError
    with pytest.raises(error, match=r"side must be .* got"):
        gate.try_enter("AAA", 1, side=side)
    with pytest.raises(error, match=r"open_orders\[0\]: side"):
        gate.restore({}, [OpenOrder("AAA", 1, "a", side)])
    assert gate.stats().decisions == 0 and gate.snapshot().orders == {}


def test_restore_takes_the_open_orders_sides(client: Any) -> None:
    gate = new_gate(client, Limits(max_symbol_exposure=10_000))
    made = gate.restore(
        {"AAA": -8_000, "BBB": 1_000},
        [OpenOrder("AAA", 5_000, "a", Side.BUY), ("BBB", 500, "b", "sell"), ("CCC", 7, "c")],
    )
    assert made is not None and [r.order_id for r in made] == ["a", "b", "c"]
    snap = gate.snapshot()
    assert {o.order_id: o.side for o in snap.orders.values()} == {"a": 1, "b": 2, "c": 0}
    assert snap.figures().symbols == {"AAA": 8_000 * U, "BBB": 1_000 * U, "CCC": 7 * U}
    assert gate.audit(gate.limits) == []
    assert gate.try_enter("AAA", 5_000, side="buy")  # worst case still 8,000
    assert gate.try_enter("AAA", 2_001, side="sell").reason is R.MAX_SYMBOL_EXPOSURE


def test_a_book_of_the_old_layout_reads_as_not_restored(client: Any) -> None:
    gate = new_gate(client)
    assert gate.book_restored()
    state = unpack_state("state", client.hget(gate.keys[0], "state"))
    assert state["layout"] == LAYOUT
    client.hset(gate.keys[0], "state", pack_state("state", state | {"layout": LAYOUT - 1}))
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED
    assert not gate.book_restored()
    gate.restore({})
    assert gate.try_enter("AAA", 1, side="buy")


# ---------------------------------------------------------------------------- the model


class Model:
    """The book in Python, decided by the rule function over recomputed figures."""

    def __init__(self, limits: Limits) -> None:
        self.unit = rules.unit_limits(limits)
        self.positions: dict[str, int] = {}
        self.orders: dict[str, tuple[str, int, int]] = {}  # oid -> symbol, units, side code
        self.state = rules.ACTIVE

    def pending(self, symbol: str | None) -> tuple[int, int, int]:
        sides = [0, 0, 0]
        for sym, units, side in self.orders.values():
            if symbol is None or sym == symbol:
                sides[side] += units
        return sides[1], sides[2], sides[0]

    def worst(self, symbol: str, extra: tuple[int, int, int] = (0, 0, 0)) -> int:
        b, s, u = self.pending(symbol)
        return rules.worst_case(
            self.positions.get(symbol, 0), b + extra[0], s + extra[1], u + extra[2]
        )

    def decide(self, symbol: str, units: int, side: int) -> DenyReason | None:
        extra = (units * (side == 1), units * (side == 2), units * (side == 0))
        busy = set(self.positions) | {sym for sym, _, _ in self.orders.values()}
        b, s, u = self.pending(None)
        p = sum(self.positions.values())
        code = rules.first_failing_rule(
            self.unit,
            self.state,
            len(busy),
            symbol in busy,
            sum(self.worst(sym) for sym in busy),
            self.worst(symbol),
            self.worst(symbol, extra),
            rules.worst_case(p, b, s, u),
            rules.worst_case(p, b + extra[0], s + extra[1], u + extra[2]),
            units,
            len(self.orders),
            sum(1 for sym, _, _ in self.orders.values() if sym == symbol),
            rules.NO_WINDOW,
            0.0,
        )
        return REASONS[code]


@pytest.mark.parametrize("seed", range(6))
def test_every_change_keeps_the_figures_the_rule_function_decides_on(
    client: Any, seed: int
) -> None:
    rng = random.Random(seed)
    limits = Limits(
        max_concurrent_positions=4,
        max_gross_exposure=60,
        max_symbol_exposure=25,
        max_net_exposure=30,
    )
    gate = new_gate(client, limits)
    model = Model(limits)
    handles: dict[str, RedisReservation] = {}
    symbols = ["AAA", "BBB", "CCC", "D|D", "EEE"]
    sides = [None, Side.BUY, Side.SELL]
    trail: list[tuple[str, str]] = []
    for step in range(160):
        op = rng.choice(["enter"] * 6 + ["position", "close", "release", "reduce", "fill",
                         "release_symbol", "state", "expire", "restore"])  # fmt: skip
        sym = rng.choice(symbols)
        if op == "enter":
            side = rng.choice(sides)
            notional = rng.randint(1, 12)
            code = {None: 0, Side.BUY: 1, Side.SELL: 2}[side]
            expected = model.decide(sym, notional * U, code)
            decision = gate.try_enter(sym, notional, side=side, order_id=f"o{step}")
            assert decision.reason is expected, (step, op, sym, notional, side)
            if decision:
                handle = res(decision)
                handles[handle.order_id] = handle
                model.orders[handle.order_id] = (sym, notional * U, code)
        elif op == "position":
            value = rng.randint(-20, 20)
            gate.set_position(sym, value)
            model.positions[sym] = value * U
        elif op == "close":
            assert gate.close_position(sym) == (model.positions.pop(sym, None) is not None)
        elif op in ("release", "reduce", "fill") and model.orders:
            oid = rng.choice(sorted(model.orders))
            osym, units, side_code = model.orders[oid]
            if op == "release":
                assert handles[oid].release()
                del model.orders[oid]
            elif op == "reduce":
                amount = rng.randint(1, 6)
                assert gate.reduce_order(oid, amount)
                left = _units.after_fill(units, amount * U, amount * U)
                if left:
                    model.orders[oid] = (osym, left, side_code)
                else:
                    del model.orders[oid]
            else:
                value = rng.randint(-20, 20)
                assert gate.confirm_fill(oid, value)
                del model.orders[oid]
                model.positions[osym] = value * U
        elif op == "release_symbol":
            gate.release(sym)
            model.orders = {k: v for k, v in model.orders.items() if v[0] != sym}
        elif op == "state":
            model.state = rng.choice([rules.ACTIVE, rules.ACTIVE, rules.REDUCING])
            (gate.reduce_only if model.state == rules.REDUCING else gate.resume)()
        elif op == "expire" and rng.random() < 0.3:
            advance_server_clock(gate, gate.ttl)
            model.orders.clear()
        elif op == "restore" and rng.random() < 0.3:
            orders = [
                OpenOrder(s, _units.to_number(u, 0), oid, (None, "buy", "sell")[c])
                for oid, (s, u, c) in model.orders.items()
            ]
            made = gate.restore({s: _units.to_number(v, 0) for s, v in model.positions.items()},
                                orders)  # fmt: skip
            assert made is not None
            handles.update({r.order_id: r for r in made})
        trail.append((op, sym))
        assert gate.audit() == [], (trail[-6:], model.orders, model.positions)
    assert gate.stats().corrupt == 0


# ---------------------------------------------------------------------------- the loss latch


def test_the_daily_loss_latches_every_process_until_the_reset(client: Any) -> None:
    gate = new_gate(client, Limits(max_daily_loss=100))
    other = same_namespace(gate)
    gate.set_position("AAA", 1_000)
    gate.record_pnl(-60)
    assert state_of(other) is TradingState.ACTIVE and latch_of(other) is None
    gate.record_pnl(-40)  # reaches -100: latches
    latch = latch_of(other)
    assert latch is not None and state_of(other) is TradingState.REDUCING
    assert (latch.state, latch.reason, latch.limit, latch.value) == (
        TradingState.REDUCING, "max_daily_loss", 100, -100,
    )  # fmt: skip
    assert latch.until == rules.next_reset(latch.at, 0.0)
    assert other.try_enter("BBB", 1, side="buy").reason is R.REDUCING_ONLY
    assert other.try_enter("AAA", 10, side="sell")  # reducing: admitted
    assert other.stats().latch == latch and other.stats().state is TradingState.REDUCING
    gate.record_pnl(-50)  # the first latch is kept: its value stays the one that latched
    gate.set_equity(1)
    assert latch_of(gate) == latch
    gate.record_pnl(+500)  # a latch holds till the reset, whatever comes after
    assert latch_of(gate) == latch
    until_us = round(latch.until * 1e6)
    advance_server_clock(gate, (until_us - gate.snapshot().now_us - 2) / 1e6)
    assert gate.snapshot().now_us < until_us  # a microsecond or two before the reset
    assert other.try_enter("BBB", 1, side="buy").reason is R.REDUCING_ONLY
    advance_server_clock(gate, (until_us - gate.snapshot().now_us) / 1e6)
    assert gate.snapshot().now_us >= until_us  # the reset: decided without the latch
    assert latch_of(other) is None and state_of(other) is TradingState.ACTIVE
    assert other.try_enter("BBB", 1, side="buy")
    gate.record_pnl(-99)  # a new day: the old losses are gone
    assert latch_of(gate) is None


def test_the_daily_reset_time_and_halted_on_loss(client: Any) -> None:
    reset = datetime.time(22, 30, tzinfo=datetime.UTC)
    gate = new_gate(client, Limits(max_daily_loss=10), on_loss=TradingState.HALTED,
                    daily_reset=reset)  # fmt: skip
    gate.record_pnl(-10.5)
    latch = latch_of(gate)
    assert latch is not None and latch.state is TradingState.HALTED and latch.value == -10.5
    assert latch.until == rules.next_reset(latch.at, 22.5 * 3600)
    assert gate.try_enter("AAA", 1, side="sell").reason is R.HALTED and gate.halted
    advance_server_clock(gate, latch.until - server_clock(gate))
    assert state_of(gate) is TradingState.ACTIVE


def test_the_drawdown_is_measured_from_the_peak(client: Any) -> None:
    gate = new_gate(client, Limits(max_drawdown=100))
    gate.set_equity(1_000)
    gate.set_equity(1_200)  # the peak
    gate.set_equity(1_101)
    assert latch_of(gate) is None
    gate.set_equity(1_100)  # 100 below the peak: latches
    latch = latch_of(gate)
    assert latch is not None and (latch.reason, latch.value, latch.limit) == (
        "max_drawdown",
        100,
        100,
    )
    gate.resume()  # clears it and starts a new period: the peak is the last equity
    assert latch_of(gate) is None and state_of(gate) is TradingState.ACTIVE
    gate.set_equity(1_001)
    assert latch_of(gate) is None
    gate.set_equity(1_000)
    assert latch_of(gate) is not None


def test_the_day_rolls_the_peak_to_the_last_equity(client: Any) -> None:
    gate = new_gate(client, Limits(max_drawdown=50, max_daily_loss=30))
    gate.set_equity(-100)  # signed equity
    gate.record_pnl(-20)
    to_midnight(gate)
    gate.record_pnl(-20)  # a new day: -20, not -40
    gate.set_equity(-140)  # the new period's peak is -100: 40 below
    assert latch_of(gate) is None
    gate.set_equity(-150)
    latch = latch_of(gate)
    assert latch is not None and (latch.reason, latch.value) == ("max_drawdown", 50)


def test_a_retried_loss_call_is_answered_not_counted_again(client: Any) -> None:
    gate = new_gate(client, Limits(max_daily_loss=100))
    config = gate._loss_config
    for op in ("record_pnl", "set_equity"):
        token = uuid.uuid4().hex[:16]
        args = (op, token, -60 * U, 0, config)
        first = gate.server.call(*args)
        again = gate.server.call(*args)  # what a client retry after a lost reply sends
        assert again == first
    assert latch_of(gate) is None  # -60 counted once (a second time would reach -120)
    gate.record_pnl(-40)
    assert latch_of(gate) is not None


def test_a_loss_call_works_on_any_namespace_and_moves_the_mark(client: Any) -> None:
    gate = RedisGate(client, Limits(max_daily_loss=1), ttl=1.0, namespace=uuid.uuid4().hex[:12])
    before = gate.server.mark.args()
    gate.record_pnl(-1)  # nothing restored: still latched (and kept by the restore)
    assert gate.server.mark.args()[1] > before[1]  # a change: a failover that loses it is fenced
    gate.restore({})
    assert state_of(gate) is TradingState.REDUCING


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"on_loss": TradingState.ACTIVE}, ValueError),
        ({"on_loss": "stop"}, ValueError),
        ({"on_loss": 2}, TypeError),
        ({"daily_reset": "00:00"}, TypeError),
        ({"daily_reset": datetime.time(1, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))},
         ValueError),
    ],
)  # fmt: skip
def test_bad_loss_settings_are_refused(client: Any, kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        RedisGate(client, Limits(), ttl=1.0, namespace="bad-settings", **kwargs)


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), "1", None, 10**30])
def test_a_bad_loss_amount_is_refused_and_changes_nothing(client: Any, amount: Any) -> None:
    gate = new_gate(client, Limits(max_daily_loss=1))
    before = gate.snapshot().meta
    for call in (gate.record_pnl, gate.set_equity):
        with pytest.raises((ValueError, TypeError)):
            call(amount)
    assert gate.snapshot().meta == before


def test_a_retried_resume_does_not_start_the_period_again(client: Any) -> None:
    gate = new_gate(client, Limits(max_daily_loss=100))
    token = uuid.uuid4().hex[:16]
    assert gate.server.call("control", "state", rules.ACTIVE, token)[0] == b"1"
    gate.record_pnl(-60)  # another process records a loss between the two attempts
    gate.server.call("control", "state", rules.ACTIVE, token)  # the retry of the resume
    gate.record_pnl(-40)
    assert latch_of(gate) is not None  # -100: the -60 was not erased by the retry


def test_no_entry_is_admitted_after_the_latching_call_returns(server: RedisServer) -> None:
    """Threads (each with its own client, as processes would have) enter while another records
    the loss that latches: every decision that began after record_pnl returned is denied."""
    clients = [redis.Redis.from_url(server.url, socket_timeout=5) for _ in range(5)]
    gate = new_gate(clients[0], Limits(max_daily_loss=100))
    latched = threading.Event()
    late: list[Decision] = []
    errors: list[BaseException] = []

    def enter(client: Any, worker: int) -> None:
        mine = RedisGate(client, gate.limits, ttl=gate.ttl, namespace=gate.namespace)
        after_latch = 0
        try:
            for k in range(20_000):  # a bound, not a timing: each worker stops 50 after it
                after = latched.is_set()  # read before the call begins
                decision = mine.try_enter(f"S{worker}-{k}", 1, side="buy")
                if after:
                    late.append(decision)
                    after_latch += 1
                    if after_latch == 50:
                        return
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=enter, args=(c, i)) for i, c in enumerate(clients[1:])]
    for t in threads:
        t.start()
    gate.record_pnl(-100)
    latched.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert late and all(d.reason is R.REDUCING_ONLY for d in late)
    for c in clients:
        c.close()


def test_the_broken_gate_checks_and_reserves_under_the_side(client: Any) -> None:
    from pendingledger.redis.testing import check_then_reserve, enable_test_ops

    gate = new_gate(client, Limits(max_symbol_exposure=10))
    enable_test_ops(gate)
    gate.set_position("AAA", -10)
    assert check_then_reserve(gate, "AAA", 10, side="buy")  # reduces the short: passes
    assert check_then_reserve(gate, "AAA", 1, side="sell").reason is R.MAX_SYMBOL_EXPOSURE
    assert [o.side for o in gate.snapshot().orders.values()] == [rules.BUY]
    assert gate.audit(gate.limits) == []
