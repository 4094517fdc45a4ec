"""Issue 13 on Redis: strategy budgets under one account, and the order-flow caps.

Every cap is checked at both scopes (a strategy's budget over its own figures, the account's
limits over everything) in the one server call of a decision; ``Decision.scope`` names whose
limit denied. The model test holds gate.lua to ``rules.first_failing_rule`` at both scopes,
decision by decision, over figures recomputed in Python. Time moves only on the namespace's
server test clock (frozen, then advanced), never by sleeping.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from redis_server import CommandLog, RedisServer

from pendingledger import PortfolioLimits, _units, rules
from pendingledger.decision import REASONS, Admitted, Decision, Denied, DenyReason
from pendingledger.trading import Side

redis = pytest.importorskip("redis")

from redis_gates import new_gate, res  # noqa: E402

from pendingledger.redis import OpenOrder, RedisGate, RedisReservation  # noqa: E402
from pendingledger.redis._gate import micros  # noqa: E402
from pendingledger.redis.testing import advance_server_clock  # noqa: E402

pytestmark = pytest.mark.redis
R = DenyReason
Limits = PortfolioLimits
U = _units.SCALE


def budget_gate(
    client: Any, limits: Limits | None = None, budgets: Mapping[str, Limits] | None = None
) -> RedisGate:
    """``redis_gates.new_gate`` with the budgets as a third argument, as the tests here pass
    them."""
    return new_gate(client, limits, budgets=budgets)


def denial(decision: Decision) -> tuple[DenyReason | None, str | None]:
    return decision.reason, decision.scope


# ------------------------------------------------------------------------- every cap, both scopes

# cap -> (its limits, the orders up to its edge (all admitted), the order past it): each order
# (symbol, notional, side); positions set first.
Case = tuple[Limits, dict[str, int], list[tuple[str, int, str | None]], tuple[str, int, str | None]]
CASES: dict[str, Case] = {
    "max_order_notional": (
        Limits(max_order_notional=10), {}, [("AAA", 10, None)], ("AAA", 11, "sell"),
    ),
    "max_open_orders": (
        Limits(max_open_orders=2), {}, [("AAA", 1, None), ("BBB", 1, None)], ("CCC", 1, "sell"),
    ),
    "max_open_orders_per_symbol": (
        Limits(max_open_orders_per_symbol=2), {},
        [("AAA", 1, None), ("BBB", 1, None), ("AAA", 1, "buy")], ("AAA", 1, "sell"),
    ),
    "max_orders_per_interval": (
        Limits(max_orders_per_interval=(3, 10.0)), {},
        [("AAA", 1, None), ("BBB", 1, None), ("CCC", 1, None)], ("AAA", 1, "sell"),
    ),
    "max_concurrent_positions": (
        Limits(max_concurrent_positions=2), {"AAA": 5}, [("BBB", 1, None), ("AAA", 1, None)],
        ("CCC", 1, None),
    ),
    "max_gross_exposure": (
        Limits(max_gross_exposure=20), {"AAA": 5}, [("BBB", 15, "buy")], ("CCC", 1, "buy"),
    ),
    "max_symbol_exposure": (
        Limits(max_symbol_exposure=8), {"AAA": 5}, [("AAA", 3, "buy"), ("AAA", 8, "sell")],
        ("AAA", 1, "buy"),
    ),
    "max_net_exposure": (
        Limits(max_net_exposure=10), {"AAA": 5}, [("BBB", 5, "buy"), ("CCC", 15, "sell")],
        ("DDD", 1, "buy"),
    ),
}  # fmt: skip


def play(gate: RedisGate, case: Case, strategy: str | None) -> Decision:
    """Set the case's positions (the strategy's parts), admit the orders up to the edge, and
    return the decision on the order past it."""
    _, positions, orders, last = case
    for symbol, value in positions.items():
        gate.set_position(symbol, value, strategy=strategy)
    for symbol, notional, side in orders:
        assert gate.try_enter(symbol, notional, side=side, strategy=strategy), (symbol, notional)
    symbol, notional, side = last
    return gate.try_enter(symbol, notional, side=side, strategy=strategy)


@pytest.mark.parametrize("cap", sorted(CASES))
def test_a_strategys_own_cap_denies_it_while_the_account_has_room(client: Any, cap: str) -> None:
    case = CASES[cap]
    gate = budget_gate(client, Limits(), {"alpha": case[0], "beta": Limits()})
    decision = play(gate, case, "alpha")
    assert denial(decision) == (R(cap), "alpha")
    last = case[3]
    # the same order under another strategy, or the account's own, is the account's to decide
    assert gate.try_enter(last[0], last[1], side=last[2], strategy="beta")
    assert gate.try_enter(last[0], last[1], side=last[2])
    stats = gate.stats()
    assert stats.scopes["alpha"].denied[R(cap)] == 1 and stats.denied[R(cap)] == 1
    assert gate.audit(gate.limits, gate.budgets) == []


@pytest.mark.parametrize("cap", sorted(CASES))
def test_the_accounts_cap_denies_with_no_scope_while_the_strategy_has_room(
    client: Any, cap: str
) -> None:
    case = CASES[cap]
    gate = budget_gate(client, case[0], {"alpha": Limits()})
    decision = play(gate, case, "alpha")
    assert denial(decision) == (R(cap), None)
    last = case[3]
    assert denial(gate.try_enter(last[0], last[1], side=last[2])) == (R(cap), None)
    assert gate.stats().scopes["alpha"].denied[R(cap)] == 1


@pytest.mark.parametrize("cap", sorted(CASES))
def test_the_account_counts_every_strategys_orders(client: Any, cap: str) -> None:
    """The edge reached with the orders spread over two strategies and the account's own."""
    limits, positions, orders, last = CASES[cap]
    gate = budget_gate(client, limits, {"alpha": Limits(), "beta": Limits()})
    for symbol, value in positions.items():
        gate.set_position(symbol, value, strategy="alpha")
    owners = ["alpha", "beta", None]
    for i, (symbol, notional, side) in enumerate(orders):
        assert gate.try_enter(symbol, notional, side=side, strategy=owners[i % 3])
    decision = gate.try_enter(last[0], last[1], side=last[2], strategy="beta")
    assert denial(decision) == (R(cap), None)
    assert gate.audit(gate.limits, gate.budgets) == []


def test_the_order_caps_edges(client: Any) -> None:
    """At the limit admitted, one past it denied; a release frees an open order's slot."""
    gate = budget_gate(client, Limits(), {"s": Limits(max_order_notional=5, max_open_orders=2,
                                                    max_open_orders_per_symbol=1)})  # fmt: skip
    assert gate.try_enter("AAA", 5, strategy="s")  # on the notional limit: admitted
    assert denial(gate.try_enter("BBB", 5.000000001, strategy="s")) == (R.MAX_ORDER_NOTIONAL, "s")
    assert denial(gate.try_enter("AAA", 1, strategy="s")) == (R.MAX_OPEN_ORDERS_PER_SYMBOL, "s")
    second = res(gate.try_enter("BBB", 1, strategy="s"))
    assert denial(gate.try_enter("CCC", 1, strategy="s")) == (R.MAX_OPEN_ORDERS, "s")
    assert second.strategy == "s" and second.release()
    assert gate.try_enter("CCC", 1, strategy="s")
    assert gate.stats().scopes["s"].outstanding == 2


def test_a_reducing_order_still_counts_against_the_order_caps(client: Any) -> None:
    gate = budget_gate(client, Limits(max_open_orders=1), {"s": Limits(max_order_notional=3)})
    gate.set_position("AAA", 10, strategy="s")
    assert denial(gate.try_enter("AAA", 4, side="sell", strategy="s")) == (
        R.MAX_ORDER_NOTIONAL, "s",
    )  # fmt: skip
    assert gate.try_enter("AAA", 3, side="sell", strategy="s")
    assert denial(gate.try_enter("AAA", 1, side="sell", strategy="s")) == (R.MAX_OPEN_ORDERS, None)


# ---------------------------------------------------------------------------- the rate window


def test_the_rate_window_slides_on_the_server_clock_and_denials_do_not_count(client: Any) -> None:
    gate = budget_gate(client, Limits(), {"s": Limits(max_orders_per_interval=(2, 10.0))})
    assert gate.try_enter("AAA", 1, strategy="s")  # t0
    advance_server_clock(gate, 4.0)
    assert gate.try_enter("AAA", 1, strategy="s")  # t0 + 4
    advance_server_clock(gate, 5.999999)
    for _ in range(5):  # t0 + 9.999999: both still inside; the denials are not counted
        assert denial(gate.try_enter("BBB", 1, strategy="s")) == (R.MAX_ORDERS_PER_INTERVAL, "s")
    assert gate.try_enter("CCC", 1)  # the account's own: not the strategy's window
    advance_server_clock(gate, 0.000001)  # t0 + 10: t0 leaves the window (now - 10, now]
    assert gate.try_enter("BBB", 1, strategy="s")
    assert denial(gate.try_enter("BBB", 1, strategy="s")) == (R.MAX_ORDERS_PER_INTERVAL, "s")
    advance_server_clock(gate, 4.0)  # t0 + 14: t0 + 4 leaves
    assert gate.try_enter("BBB", 1, strategy="s")
    assert gate.stats().scopes["s"].denied[R.MAX_ORDERS_PER_INTERVAL] == 6


def test_the_accounts_rate_window_counts_every_admission_and_survives_restore(
    client: Any,
) -> None:
    gate = budget_gate(client, Limits(max_orders_per_interval=(3, 1.0)), {"a": Limits()})
    assert gate.try_enter("AAA", 1, strategy="a")
    assert gate.try_enter("AAA", 1)
    assert gate.try_enter("BBB", 1, strategy="a")
    assert denial(gate.try_enter("CCC", 1)) == (R.MAX_ORDERS_PER_INTERVAL, None)
    gate.restore({})  # the window is the namespace's history, not its book
    assert denial(gate.try_enter("CCC", 1, strategy="a")) == (R.MAX_ORDERS_PER_INTERVAL, None)
    advance_server_clock(gate, 1.0)
    assert gate.try_enter("CCC", 1, strategy="a")
    kept = [name for name in client.hkeys(gate.keys[0]) if name.startswith((b"w:", b"W"))]
    assert len(kept) == 3  # the account's last 3 stamps; a has no rate limit: none


def test_the_window_keeps_at_most_rate_count_stamps(client: Any) -> None:
    gate = budget_gate(client, Limits(max_orders_per_interval=(2, 0.001)), {"s": Limits(
        max_orders_per_interval=(3, 0.001))})  # fmt: skip
    for _ in range(20):
        assert gate.try_enter("AAA", 1, strategy="s")
        res(gate.try_enter("AAA", 1)).release()
        advance_server_clock(gate, 0.001)
    names = client.hkeys(gate.keys[0])
    assert len([n for n in names if n.startswith(b"w:")]) == 2
    assert len([n for n in names if n.startswith(b"W")]) == 3


# ---------------------------------------------------------------------------- positions


def test_the_accounts_position_is_the_sum_of_the_parts(client: Any) -> None:
    gate = budget_gate(client, Limits(max_symbol_exposure=4), {"a": Limits(), "b": Limits()})
    gate.set_position("AAA", 5, strategy="a")
    gate.set_position("AAA", -2, strategy="b")
    gate.set_position("AAA", 1)
    assert gate.positions() == {"AAA": 4}
    assert gate.positions(strategy="a") == {"AAA": 5}
    assert gate.positions(strategy="b") == {"AAA": -2}
    # b's part is short: its buy reduces b's figure, but raises the account's 4 to 5
    assert denial(gate.try_enter("AAA", 1, side="buy", strategy="b")) == (
        R.MAX_SYMBOL_EXPOSURE, None,
    )  # fmt: skip
    assert gate.try_enter("AAA", 1, side="sell", strategy="a")
    assert gate.close_position("AAA", strategy="a")
    assert not gate.close_position("AAA", strategy="a")
    assert gate.positions() == {"AAA": -1}
    assert gate.close_position("AAA") and gate.positions() == {"AAA": -2}
    assert gate.close_position("AAA", strategy="b") and gate.positions() == {}
    assert gate.audit(gate.limits, gate.budgets) == []


def test_one_part_reads_back_as_set(client: Any) -> None:
    gate = budget_gate(client)
    gate.set_position("AAA", 1.5, strategy="x")  # no budget needed for the book
    assert gate.positions() == {"AAA": 1.5} and type(gate.positions()["AAA"]) is float
    gate.set_position("AAA", 2)
    assert gate.positions() == {"AAA": 3.5}
    gate.set_position("BBB", 0, strategy="x")  # a part at 0 is open
    assert gate.positions(strategy="x") == {"AAA": 1.5, "BBB": 0}
    assert gate.audit() == []


def test_confirm_fill_follows_the_reservations_strategy(client: Any) -> None:
    gate = budget_gate(client, Limits(), {"a": Limits(), "b": Limits()})
    made = res(gate.try_enter("AAA", 10, side="buy", strategy="a", order_id="o1"))
    assert made.strategy == "a"
    before = gate.snapshot()
    with pytest.raises(ValueError, match="strategy 'a', not strategy='b'"):
        gate.confirm_fill("o1", 10, strategy="b")
    assert gate.snapshot().orders == before.orders and gate.positions() == {}
    assert gate.confirm_fill("o1", 7, filled=5)  # partial: a's part
    assert gate.positions(strategy="a") == {"AAA": 7} and gate.positions() == {"AAA": 7}
    assert gate.confirm_fill("o1", 10, strategy="a")
    assert gate.positions(strategy="a") == {"AAA": 10}
    # none outstanding: the strategy given (or the account's own) gets the part
    assert not gate.confirm_fill("o1", 3, symbol="AAA", strategy="b")
    assert gate.positions(strategy="b") == {"AAA": 3} and gate.positions() == {"AAA": 13}
    assert gate.audit() == []


def test_restore_takes_the_strategies_parts_and_orders(client: Any) -> None:
    gate = budget_gate(client, Limits(), {"a": Limits(max_open_orders=1), "b": Limits()})
    made = gate.restore(
        {"AAA": 1},
        [OpenOrder("AAA", 5, "o1", "buy", "a"), OpenOrder("BBB", 2, "o2", None, None)],
        strategies={"a": {"AAA": 4}, "b": {"BBB": -3}},
    )
    assert made is not None and [r.strategy for r in made] == ["a", None]
    assert gate.positions() == {"AAA": 5, "BBB": -3}
    assert gate.positions(strategy="a") == {"AAA": 4}
    assert denial(gate.try_enter("CCC", 1, strategy="a")) == (R.MAX_OPEN_ORDERS, "a")
    stats = gate.stats()
    assert stats.scopes["a"].outstanding == 1 and stats.scopes[None].outstanding == 1
    assert gate.audit(gate.limits, gate.budgets) == []
    assert made[0].release()
    assert gate.try_enter("CCC", 1, strategy="a")


# ---------------------------------------------------------------------------- stats, round trips


def test_the_state_comes_first_and_is_the_accounts(client: Any) -> None:
    gate = budget_gate(client, Limits(), {"s": Limits(max_open_orders=0)})
    gate.halt()
    assert denial(gate.try_enter("AAA", 1, strategy="s")) == (R.HALTED, None)
    gate.resume()
    assert denial(gate.try_enter("AAA", 1, strategy="s")) == (R.MAX_OPEN_ORDERS, "s")
    stats = gate.stats()
    assert stats.scopes["s"].denied[R.HALTED] == 1 and stats.scopes[None].decisions == 0


def test_a_store_failure_under_a_strategy_counts_in_its_scope(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    gate = budget_gate(client, Limits(), {"s": Limits()})
    dead = RedisGate(redis.Redis(port=1, socket_timeout=0.2), Limits(), ttl=1.0,
                     namespace=gate.namespace, budgets={"s": Limits()})  # fmt: skip
    assert denial(dead.try_enter("AAA", 1, strategy="s")) == (R.BACKEND_UNAVAILABLE, None)
    assert denial(dead.try_enter("AAA", 1)) == (R.BACKEND_UNAVAILABLE, None)
    dead._client = client  # the store is back: the counts are read
    dead._code = gate.server
    stats = dead.stats()
    assert stats.scopes["s"].denied[R.BACKEND_UNAVAILABLE] == 1
    assert stats.scopes[None].denied[R.BACKEND_UNAVAILABLE] == 1
    assert stats.denied[R.BACKEND_UNAVAILABLE] == 2
    client.close()


def test_the_scopes_counts_add_up_to_the_top_level(client: Any) -> None:
    gate = budget_gate(client, Limits(max_open_orders=3), {"a": Limits(max_open_orders=1),
                                                        "idle": Limits()})  # fmt: skip
    assert gate.try_enter("AAA", 1, strategy="a")
    assert not gate.try_enter("AAA", 1, strategy="a")  # a's cap
    assert gate.try_enter("AAA", 1)
    assert gate.try_enter("AAA", 1)
    assert not gate.try_enter("BBB", 1)  # the account's
    assert not gate.try_enter("BBB", 1, strategy="a")  # a's again
    stats = gate.stats()
    assert set(stats.scopes) == {"a", "idle", None}
    assert stats.scopes["a"].admitted == 1 and stats.scopes["a"].denied[R.MAX_OPEN_ORDERS] == 2
    assert stats.scopes[None].admitted == 2 and stats.scopes[None].outstanding == 2
    assert stats.scopes["idle"].decisions == 0
    assert sum(s.admitted for s in stats.scopes.values()) == stats.admitted
    for reason in DenyReason:
        assert sum(s.denied[reason] for s in stats.scopes.values()) == stats.denied[reason]
    assert sum(s.outstanding for s in stats.scopes.values()) == stats.outstanding


def test_a_strategy_decision_with_both_windows_is_one_fcall(
    client: Any, server: RedisServer
) -> None:
    rate = Limits(max_orders_per_interval=(2, 10.0), max_open_orders=10)
    gate = budget_gate(client, rate, {"s": rate})
    assert gate.try_enter("WARM", 1, strategy="s")
    with CommandLog(server.url) as log:
        assert gate.try_enter("AAA", 1, side="buy", strategy="s")
        assert not gate.try_enter("AAA", 1, strategy="s")
    assert log.commands == ["FCALL"] * 2


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("strategy", "error"),
    [("nope", ValueError), ("", ValueError), (b"s", TypeError), (1, TypeError)],
)
def test_an_unknown_or_bad_strategy_is_refused_and_nothing_is_sent(
    client: Any, server: RedisServer, strategy: Any, error: type
) -> None:
    gate = budget_gate(client, Limits(), {"s": Limits()})
    with CommandLog(server.url) as log, pytest.raises(error, match="strategy"):
        gate.try_enter("AAA", 1, strategy=strategy)
    assert log.commands == []
    assert gate.stats().decisions == 0


class Str(str):
    pass


@pytest.mark.parametrize(
    ("budgets", "error", "match"),
    [
        ([("s", Limits())], TypeError, "budgets"),
        ({1: Limits()}, TypeError, "budgets"),
        ({"": Limits()}, ValueError, "budgets"),
        ({"s": object()}, TypeError, r"budgets\['s'\]"),
        ({"s": Limits(max_daily_loss=1)}, ValueError, "are the account's"),
    ],
)
def test_bad_budgets_are_refused_and_change_nothing(
    client: Any, budgets: Any, error: type, match: str
) -> None:
    gate = budget_gate(client, Limits(), {"kept": Limits(max_open_orders=1)})
    before = gate.budgets
    with pytest.raises(error, match=match):
        gate.budgets = budgets
    assert gate.budgets is before and dict(gate.budgets) == {"kept": Limits(max_open_orders=1)}
    with pytest.raises(error, match=match):
        RedisGate(client, Limits(), ttl=1.0, namespace="bad-budgets", budgets=budgets)


def test_a_str_subclass_names_the_strategy_as_its_plain_str(client: Any) -> None:
    gate = budget_gate(client, Limits(), {Str("s"): Limits(max_open_orders=1)})
    assert type(next(iter(gate.budgets))) is str
    made = res(gate.try_enter("AAA", 1, strategy=Str("s")))
    assert type(made.strategy) is str and made.strategy == "s"
    assert denial(gate.try_enter("AAA", 1, strategy="s")) == (R.MAX_OPEN_ORDERS, "s")
    gate.set_position("AAA", 1, strategy=Str("s"))
    assert gate.positions(strategy="s") == {"AAA": 1}


def test_budgets_read_only_and_none_is_empty(client: Any) -> None:
    gate = budget_gate(client, Limits(), {"s": Limits()})
    with pytest.raises(TypeError):
        gate.budgets["t"] = Limits()  # type: ignore[index]
    gate.budgets = None
    assert dict(gate.budgets) == {}
    with pytest.raises(ValueError, match="no budget"):
        gate.try_enter("AAA", 1, strategy="s")


@pytest.mark.parametrize("strategy", [1, b"s", ""])
def test_bad_book_strategies_are_refused_and_change_nothing(client: Any, strategy: Any) -> None:
    gate = budget_gate(client)
    gate.set_position("AAA", 1, strategy="s")
    before = gate.snapshot()
    error = ValueError if strategy == "" else TypeError
    for call in (
        lambda: gate.set_position("AAA", 2, strategy=strategy),
        lambda: gate.close_position("AAA", strategy=strategy),
        lambda: gate.confirm_fill("o", 2, symbol="AAA", strategy=strategy),
        lambda: gate.positions(strategy=strategy),
        lambda: gate.restore({}, strategies={strategy: {"AAA": 1}}),
        lambda: gate.restore({}, [OpenOrder("AAA", 1, "o", None, strategy)]),
    ):
        with pytest.raises(error, match="strateg"):
            call()
    after = gate.snapshot()
    assert (after.positions, after.parts, after.orders) == (
        before.positions, before.parts, before.orders,
    )  # fmt: skip
    with pytest.raises(TypeError, match="strategies"):
        gate.restore({}, strategies=[("s", {})])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="strategies"):
        gate.restore({}, strategies={None: {"AAA": 1}})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------- a budget change


DENY_ALL = Limits(max_open_orders=0)
PAIRS = [  # every pair denies an order under "s"; limits from the last and budgets from the
    (DENY_ALL, {"s": Limits()}),  # first would admit it
    (DENY_ALL, {"s": DENY_ALL}),
    (Limits(), {"s": DENY_ALL}),
]


def torn_enter(gate: RedisGate, between: Callable[[], object]) -> Decision:
    """The broken variant: reads the budget, then (after ``between``) the account's limits,
    from two reads of the gate, as a gate with separate fields for them would."""
    budget = gate._scopes.configs["s"]
    between()
    config = gate._scopes.config
    reply = gate.server.call("enter", "AAA", U, uuid.uuid4().hex, "tok", config, 0, "", "0", "s",
                             budget)  # fmt: skip
    return Admitted(object()) if reply[0] == b"A" else Denied(R.MAX_OPEN_ORDERS)


def walk(gate: RedisGate) -> None:
    """From the first pair to the last, one assignment at a time (each state is a pair)."""
    gate.budgets = PAIRS[1][1]
    gate.limits = PAIRS[2][0]


def test_a_torn_read_of_limits_and_budgets_would_admit(client: Any) -> None:
    """The harness catches the broken variant, every time: the change lands between its reads."""
    gate = budget_gate(client, PAIRS[0][0], PAIRS[0][1])
    assert torn_enter(gate, lambda: walk(gate))


def test_each_decision_uses_one_pair_while_the_budgets_change(server: RedisServer) -> None:
    """Threads decide under "s" while another walks the pairs back and forth: no pair admits,
    so any admission would be a decision made on a mix."""
    clients = [redis.Redis.from_url(server.url, socket_timeout=5) for _ in range(4)]
    gate = budget_gate(clients[0], PAIRS[0][0], PAIRS[0][1])
    stop = threading.Event()
    seen: list[Decision] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def decide(client: Any) -> None:
        try:
            start.wait(10)
            mine = gate  # the gate object whose pair is being replaced
            for _ in range(400):
                seen.append(mine.try_enter("AAA", 1, strategy="s"))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def change() -> None:
        try:
            start.wait(10)
            while not stop.is_set():
                walk(gate)
                gate.limits, gate.budgets = PAIRS[0][0], PAIRS[1][1]
                gate.budgets = PAIRS[0][1]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=decide, args=(c,)) for c in clients[1:3]]
    threads.append(threading.Thread(target=change))
    threads.append(threading.Thread(target=decide, args=(clients[3],)))
    for t in threads:
        t.start()
    for t in threads[:2] + threads[3:]:
        t.join(60)
    stop.set()
    threads[2].join(60)
    assert not errors
    assert len(seen) == 1200 and not any(seen)
    assert {denial(d) for d in seen} <= {(R.MAX_OPEN_ORDERS, None), (R.MAX_OPEN_ORDERS, "s")}
    for c in clients:
        c.close()


def test_the_broken_gate_breaches_a_budget_that_the_gate_holds(client: Any) -> None:
    """check_then_reserve under a strategy: an entry in the gap takes the budget's last slot,
    and the forced reserve breaches it (audit names the scope); the gate itself denies."""
    from pendingledger.redis.testing import check_then_reserve, enable_test_ops

    budget = Limits(max_gross_exposure=10, max_open_orders=5)
    gate = budget_gate(client, Limits(), {"s": budget})
    enable_test_ops(gate)
    assert gate.try_enter("AAA", 6, strategy="s")
    decision = check_then_reserve(
        gate, "BBB", 4, strategy="s", between=lambda: gate.try_enter("CCC", 4, strategy="s")
    )
    assert decision and res(decision).strategy == "s"
    assert gate.audit(gate.limits, gate.budgets) == [
        "strategy 's': gross 14000000000 units > max_gross_exposure 10000000000 units"
    ]
    assert denial(gate.try_enter("DDD", 1, strategy="s")) == (R.MAX_GROSS_EXPOSURE, "s")


# ---------------------------------------------------------------------------- the model


class Model:
    """The book in Python at every scope, decided by the rule function at both scopes."""

    def __init__(self, limits: Limits, budgets: Mapping[str, Limits]) -> None:
        self.units = {None: self._unit(limits)} | {k: self._unit(v) for k, v in budgets.items()}
        self.parts: dict[str | None, dict[str, int]] = {}
        self.orders: dict[str, tuple[str, int, int, str | None]] = {}  # symbol, units, side, s
        self.windows: dict[str | None, deque[int]] = {}
        self.state = rules.ACTIVE

    @staticmethod
    def _unit(limits: Limits) -> rules.UnitLimits:
        unit = rules.unit_limits(limits)
        if unit.rate_count != rules.NO_LIMIT:
            unit.rate_seconds = float(micros(unit.rate_seconds))  # the server's clock: us
        return unit

    def positions(self, scope: str | None, account: bool) -> dict[str, int]:
        if not account:
            return dict(self.parts.get(scope, {}))
        total: dict[str, int] = {}
        for part in self.parts.values():
            for sym, v in part.items():
                total[sym] = total.get(sym, 0) + v
        return total

    def figures_rule(
        self, unit: rules.UnitLimits, scope: str | None, account: bool, symbol: str, units: int,
        side: int, now: int,
    ) -> int:  # fmt: skip
        pos = self.positions(scope, account)
        orders = [o for o in self.orders.values() if account or o[3] == scope]
        pend: dict[str, list[int]] = {}
        for sym, u, sd, _ in orders:
            pend.setdefault(sym, [0, 0, 0])[sd] += u
        busy = set(pos) | set(pend)

        def worst(sym: str, extra: tuple[int, int, int] = (0, 0, 0)) -> int:
            u, b, s = pend.get(sym, [0, 0, 0])
            return rules.worst_case(pos.get(sym, 0), b + extra[1], s + extra[2], u + extra[0])

        extra = (units * (side == 0), units * (side == 1), units * (side == 2))
        tu = sum(p[0] for p in pend.values())
        tb = sum(p[1] for p in pend.values())
        ts = sum(p[2] for p in pend.values())
        p = sum(pos.values())
        window = self.windows.get(None if account else scope, deque())
        count = unit.rate_count
        start = window[-count] if count > 0 and len(window) >= count else rules.NO_WINDOW
        return rules.first_failing_rule(
            unit, self.state, len(busy), symbol in busy, sum(worst(s) for s in busy),
            worst(symbol), worst(symbol, extra), rules.worst_case(p, tb, ts, tu),
            rules.worst_case(p, tb + extra[1], ts + extra[2], tu + extra[0]), units,
            len(orders), sum(1 for o in orders if o[0] == symbol), start, now,
        )  # fmt: skip

    def decide(
        self, symbol: str, units: int, side: int, scope: str | None, now: int
    ) -> tuple[DenyReason | None, str | None]:
        if scope is not None:
            code = self.figures_rule(self.units[scope], scope, False, symbol, units, side, now)
            if code:
                return REASONS[code], scope
        code = self.figures_rule(self.units[None], None, True, symbol, units, side, now)
        return REASONS[code], None

    def admit(self, oid: str, symbol: str, units: int, side: int, scope: str | None,
              now: int) -> None:  # fmt: skip
        self.orders[oid] = (symbol, units, side, scope)
        for key in {None, scope}:
            count = self.units[key].rate_count
            if count > 0:
                window = self.windows.setdefault(key, deque(maxlen=count))
                window.append(now)


@pytest.mark.parametrize("seed", range(8))
def test_every_decision_at_both_scopes_matches_the_rule_function(client: Any, seed: int) -> None:
    rng = random.Random(seed)
    limits = Limits(max_concurrent_positions=4, max_gross_exposure=90, max_symbol_exposure=30,
                    max_net_exposure=40, max_order_notional=11, max_open_orders=5,
                    max_open_orders_per_symbol=2, max_orders_per_interval=(8, 1.0))  # fmt: skip
    budgets = {
        "a": Limits(max_concurrent_positions=3, max_gross_exposure=40, max_symbol_exposure=18,
                    max_net_exposure=20, max_order_notional=9, max_open_orders=3,
                    max_open_orders_per_symbol=1, max_orders_per_interval=(3, 1.0)),
        "b|:2": Limits(max_symbol_exposure=15, max_open_orders=4,
                       max_orders_per_interval=(2, 0.5)),
    }  # fmt: skip
    gate = budget_gate(client, limits, budgets)
    model = Model(limits, budgets)
    now = gate.snapshot().now_us
    handles: dict[str, RedisReservation] = {}
    symbols = ["AAA", "BBB", "CCC", "D|D", "EEE"]
    scopes: list[str | None] = ["a", "b|:2", None, "a"]
    trail: list[tuple[Any, ...]] = []
    for step in range(220):
        op = rng.choice(["enter"] * 8 + ["position", "close", "release", "reduce", "fill",
                         "release_symbol", "state", "tick", "tick", "expire",
                         "restore"])  # fmt: skip
        sym = rng.choice(symbols)
        scope = rng.choice(scopes)
        if op == "enter":
            side = rng.choice([None, Side.BUY, Side.SELL])
            notional = rng.randint(1, 12)
            code = {None: 0, Side.BUY: 1, Side.SELL: 2}[side]
            expected = model.decide(sym, notional * U, code, scope, now)
            decision = gate.try_enter(sym, notional, side=side, order_id=f"o{step}",
                                      strategy=scope)  # fmt: skip
            assert denial(decision) == expected, (step, sym, notional, side, scope, trail[-5:])
            if decision:
                handle = res(decision)
                assert handle.strategy == scope
                handles[handle.order_id] = handle
                model.admit(handle.order_id, sym, notional * U, code, scope, now)
        elif op == "position":
            value = rng.randint(-20, 20)
            gate.set_position(sym, value, strategy=scope)
            model.parts.setdefault(scope, {})[sym] = value * U
        elif op == "close":
            was = model.parts.get(scope, {}).pop(sym, None) is not None
            assert gate.close_position(sym, strategy=scope) == was
        elif op in ("release", "reduce", "fill") and model.orders:
            oid = rng.choice(sorted(model.orders))
            osym, units, side_code, oscope = model.orders[oid]
            if op == "release":
                assert handles[oid].release()
                del model.orders[oid]
            elif op == "reduce":
                amount = rng.randint(1, 6)
                assert gate.reduce_order(oid, amount)
                left = _units.after_fill(units, amount * U, amount * U)
                if left:
                    model.orders[oid] = (osym, left, side_code, oscope)
                else:
                    del model.orders[oid]
            else:
                value = rng.randint(-20, 20)
                assert gate.confirm_fill(oid, value)
                del model.orders[oid]
                model.parts.setdefault(oscope, {})[osym] = value * U
        elif op == "release_symbol":
            gate.release(sym)
            model.orders = {k: v for k, v in model.orders.items() if v[0] != sym}
        elif op == "state":
            model.state = rng.choice([rules.ACTIVE, rules.ACTIVE, rules.ACTIVE, rules.REDUCING])
            (gate.reduce_only if model.state == rules.REDUCING else gate.resume)()
        elif op == "tick":
            advance_server_clock(gate, rng.choice([0.1, 0.25, 0.5, 1.0]))
            now = gate.snapshot().now_us
        elif op == "expire" and rng.random() < 0.3:
            advance_server_clock(gate, gate.ttl)
            now = gate.snapshot().now_us
            model.orders.clear()
        elif op == "restore" and rng.random() < 0.3:
            orders = [
                OpenOrder(s, _units.to_number(u, 0), oid, (None, "buy", "sell")[c], sc)
                for oid, (s, u, c, sc) in model.orders.items()
            ]
            parts = {k: {s: _units.to_number(v, 0) for s, v in p.items()}
                     for k, p in model.parts.items() if k is not None}  # fmt: skip
            own = {s: _units.to_number(v, 0) for s, v in model.parts.get(None, {}).items()}
            made = gate.restore(own, orders, strategies=parts)
            assert made is not None
            handles.update({r.order_id: r for r in made})
        trail.append((step, op, sym, scope))
        assert gate.audit() == [], (trail[-6:], model.orders, model.parts)
    stats = gate.stats()
    assert stats.corrupt == 0
    assert sum(s.admitted for s in stats.scopes.values()) == stats.admitted
