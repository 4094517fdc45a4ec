"""Strategy budgets under one account and the order-flow caps (issue 13), on both backends.

The harness is ``test_gate_conformance``'s: the fixture ``h`` builds an in-process
``PortfolioGate`` on a ``ManualClock`` or a ``RedisGate`` on a real ``redis-server`` with its
namespace's server clock frozen, and ``h.advance`` moves time (never a sleep). Every body talks
to the shared ``Gate`` protocol only, except where a test says it drives the in-process gate's
clock to land between two steps of a decision.

A decision under strategy ``S`` is ``rules.first_failing_rule`` with ``S``'s budget over ``S``'s
own positions and reservations (a denial names ``S`` in ``Decision.scope``), then with the
account's limits over everything (``scope`` None); ``HALTED`` is the account's. The table at the
end holds both backends to that, decision by decision, from a model that sums both scopes'
figures afresh from its own bookkeeping.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import test_gate_conformance as conformance
from test_gate_conformance import Harness, res_of, state_of

from pendingledger import (
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Side,
    TradingState,
    _units,
    rules,
)
from pendingledger.limits import REASONS, Decision, DenyReason
from pendingledger.protocols import Gate as GateLike
from pendingledger.testing import ManualClock, ManualWallClock

# The conformance suite's fixtures: ``h`` (each backend) and the module's redis-server.
h = conformance.h
redis_server = conformance.redis_server

L = PortfolioLimits
R = DenyReason
Budgets = dict[str, PortfolioLimits]
SCOPES = ["strategy", "account"]


def why(decision: Decision) -> tuple[DenyReason | None, str | None]:
    """What a decision says: its reason (None: admitted) and the scope that denied it."""
    return decision.reason, decision.scope


def capped(h: Harness, scope: str, ttl: float = 60.0, **caps: Any) -> GateLike:
    """A gate whose strategy ``A`` (``scope="strategy"``) or account (``"account"``) has the
    limits ``caps``; the other scope, and strategy ``B``, have none."""
    if scope == "strategy":
        return h.gate(L(), ttl=ttl, budgets={"A": L(**caps), "B": L()})
    return h.gate(L(**caps), ttl=ttl, budgets={"A": L(), "B": L()})


def denier(scope: str) -> str | None:
    """The scope a ``capped`` gate's cap denies with."""
    return "A" if scope == "strategy" else None


def positions_of(gate: GateLike, strategy: str | None = None) -> dict[str, _units.Number]:
    return gate.positions(strategy=strategy)  # a call: mypy does not narrow it across calls


# ---------------------------------------------------------------------------- the order caps


@pytest.mark.parametrize("scope", SCOPES)
def test_one_orders_notional_cap_at_its_edge(h: Harness, scope: str) -> None:
    """``max_order_notional``: an order landing on the cap is admitted, one unit more is not;
    a reducing order is one order too; the other strategy is not bound by a budget's cap."""
    g = capped(h, scope, max_order_notional=100)
    assert g.try_enter("AAA", 100, strategy="A")
    assert why(g.try_enter("AAA", Decimal("100.000000001"), strategy="A")) == (
        R.MAX_ORDER_NOTIONAL,
        denier(scope),
    )
    g.set_position("BBB", 1_000, strategy="A")
    assert why(g.try_enter("BBB", 101, side=Side.SELL, strategy="A")) == (
        R.MAX_ORDER_NOTIONAL,
        denier(scope),
    )
    assert g.try_enter("BBB", 100, side=Side.SELL, strategy="A")
    other = why(g.try_enter("CCC", 101, strategy="B"))
    own = why(g.try_enter("CCC", 101))
    if scope == "strategy":
        assert other == own == (None, None)
    else:
        assert other == own == (R.MAX_ORDER_NOTIONAL, None)


@pytest.mark.parametrize("scope", SCOPES)
def test_open_orders_cap_at_its_edge(h: Harness, scope: str) -> None:
    """``max_open_orders``: the cap's last order is admitted and the next is not, reducing or
    not, until one ends (released or expired). A budget counts its strategy's orders only; the
    account counts every order."""
    g = capped(h, scope, ttl=10.0, max_open_orders=2)
    first = res_of(g.try_enter("AAA", 1, strategy="A"))
    h.advance(5)
    assert g.try_enter("BBB", 1, strategy="A")
    g.set_position("CCC", 500, strategy="A")
    full = (R.MAX_OPEN_ORDERS, denier(scope))
    assert why(g.try_enter("DDD", 1, strategy="A")) == full
    assert why(g.try_enter("CCC", 1, side=Side.SELL, strategy="A")) == full  # reducing
    others = [why(g.try_enter("EEE", 1, strategy="B")), why(g.try_enter("EEE", 1))]
    if scope == "strategy":
        assert others == [(None, None)] * 2  # not A's: they do not count against A's budget
        assert why(g.try_enter("DDD", 1, strategy="A")) == full
    else:
        assert others == [full] * 2
    assert first.release() is True
    assert g.try_enter("DDD", 1, strategy="A")
    assert why(g.try_enter("FFF", 1, strategy="A")) == full
    h.advance(10)  # every order made at 5 expires
    assert g.try_enter("FFF", 1, strategy="A")


@pytest.mark.parametrize("scope", SCOPES)
def test_open_orders_per_symbol_cap_at_its_edge(h: Harness, scope: str) -> None:
    """``max_open_orders_per_symbol``: per symbol, over the scope's own orders on it (B's
    order on AAA is the account's but not A's); reducing orders count too."""
    g = capped(h, scope, max_open_orders_per_symbol=2)
    g.set_position("AAA", 300, strategy="A")
    assert g.try_enter("AAA", 1, strategy="A")
    assert g.try_enter("AAA", 1, strategy="B")  # the account's second order on AAA
    full = (R.MAX_OPEN_ORDERS_PER_SYMBOL, denier(scope))
    second = why(g.try_enter("AAA", 1, side="sell", strategy="A"))
    if scope == "strategy":
        assert second == (None, None)  # A's second on AAA: B's is not A's
        assert why(g.try_enter("AAA", 1, side="sell", strategy="A")) == full  # reducing too
        assert g.try_enter("AAA", 1, strategy="B")
    else:
        assert second == full  # a reducing order is one order too
        assert why(g.try_enter("AAA", 1, strategy="B")) == full
    assert g.try_enter("BBB", 1, strategy="A")
    assert g.try_enter("BBB", 1, strategy="A")
    assert why(g.try_enter("BBB", 1, strategy="A")) == full
    assert g.release("BBB") is True
    assert why(g.try_enter("AAA", 1, strategy="A")) == full
    assert g.try_enter("BBB", 1, strategy="A")


@pytest.mark.parametrize("scope", SCOPES)
def test_orders_per_interval_slides_on_the_gates_clock(h: Harness, scope: str) -> None:
    """``max_orders_per_interval=(2, 8)``: two admissions in any window of 8 s. A released
    order still counted (it was admitted); a denial never does; the window slides as the
    gate's clock moves, and an admission exactly ``seconds`` old is out of it."""
    g = capped(h, scope, max_orders_per_interval=(2, 8))
    assert res_of(g.try_enter("AAA", 1, strategy="A")).release()
    assert g.try_enter("BBB", 1, strategy="A")
    full = (R.MAX_ORDERS_PER_INTERVAL, denier(scope))
    for _ in range(3):
        assert why(g.try_enter("CCC", 1, strategy="A")) == full
    h.advance(7.75)
    assert why(g.try_enter("CCC", 1, side="buy", strategy="A")) == full
    h.advance(0.25)  # now - 8 is the first two's stamp: outside (now - 8, now]
    assert g.try_enter("CCC", 1, strategy="A")
    assert g.try_enter("CCC", 1, strategy="A")  # the denials at 0 and 7.75 left no stamp
    assert why(g.try_enter("CCC", 1, strategy="A")) == full
    h.advance(4)
    assert why(g.try_enter("DDD", 1, strategy="A")) == full
    other = why(g.try_enter("DDD", 1, strategy="B"))
    assert other == ((None, None) if scope == "strategy" else full)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_denial_at_the_other_scope_takes_no_place_in_the_window(h: Harness, scope: str) -> None:
    """Only admissions count: an order the other scope denies leaves no stamp in the rate
    window of the scope whose rate limit is under test."""
    rate = L(max_orders_per_interval=(2, 60))
    notional = L(max_order_notional=10)
    if scope == "strategy":
        g = h.gate(notional, budgets={"A": rate})
    else:
        g = h.gate(rate, budgets={"A": notional})
    other = None if scope == "strategy" else "A"
    for _ in range(3):
        assert why(g.try_enter("AAA", 11, strategy="A")) == (R.MAX_ORDER_NOTIONAL, other)
    assert g.try_enter("AAA", 10, strategy="A")
    assert g.try_enter("AAA", 10, strategy="A")
    assert why(g.try_enter("AAA", 10, strategy="A")) == (
        R.MAX_ORDERS_PER_INTERVAL,
        denier(scope),
    )


def test_the_account_window_counts_every_admission_and_a_budget_only_its_own(h: Harness) -> None:
    """Per scope: the account's window counts admissions with and without a strategy, A's
    only A's (so B and the account's own orders do not use up A's rate)."""
    g = h.gate(
        L(max_orders_per_interval=(4, 10)),
        budgets={"A": L(max_orders_per_interval=(2, 10)), "B": L()},
    )
    assert g.try_enter("AAA", 1, strategy="B")
    assert g.try_enter("AAA", 1)
    assert g.try_enter("AAA", 1, strategy="A")
    assert g.try_enter("AAA", 1, strategy="A")
    assert why(g.try_enter("AAA", 1, strategy="A")) == (R.MAX_ORDERS_PER_INTERVAL, "A")
    assert why(g.try_enter("AAA", 1, strategy="B")) == (R.MAX_ORDERS_PER_INTERVAL, None)
    assert why(g.try_enter("AAA", 1)) == (R.MAX_ORDERS_PER_INTERVAL, None)
    h.advance(10)
    assert g.try_enter("AAA", 1, strategy="A")


def test_a_budget_replaced_with_the_same_rate_keeps_its_window(h: Harness) -> None:
    """The window is the scope's admissions, not the budget object's: replacing the budgets
    (or the account's limits) with the same rate does not forget what was admitted."""
    rate = L(max_orders_per_interval=(1, 30))
    g = h.gate(rate, budgets={"A": L(max_orders_per_interval=(1, 30))})
    assert g.try_enter("AAA", 1, strategy="A")
    g.budgets = {"A": L(max_orders_per_interval=(1, 30), max_gross_exposure=10**6)}
    g.limits = L(max_orders_per_interval=(1, 30), max_gross_exposure=10**6)
    assert why(g.try_enter("AAA", 1, strategy="A")) == (R.MAX_ORDERS_PER_INTERVAL, "A")
    g.budgets = {"A": L()}
    assert why(g.try_enter("AAA", 1, strategy="A")) == (R.MAX_ORDERS_PER_INTERVAL, None)


def test_huge_counts_are_refused_up_front_or_decided(h: Harness) -> None:
    """A count that ``PortfolioLimits`` accepts must be decided by the rule (here: nothing to
    deny), or refused when the limits are made or assigned, naming the limit and changing
    nothing; never an error from inside a decision."""
    huge: list[tuple[str, Any]] = [
        ("max_orders_per_interval", (2**63, 1)),
        ("max_open_orders", 2**63),
        ("max_open_orders_per_symbol", 2**64),
    ]
    for name, value in huge:
        try:
            limits = L(**{name: value})
        except (TypeError, ValueError) as exc:
            assert name in str(exc)
            continue
        for where in ("account", "budget"):
            g = h.gate(L(), budgets={"A": L()})
            try:
                if where == "account":
                    g.limits = limits
                else:
                    g.budgets = {"A": limits}
            except (TypeError, ValueError) as exc:
                assert name in str(exc)
                assert g.limits == L() and dict(g.budgets) == {"A": L()}
                continue
            decision = g.try_enter("AAA", 1, strategy="A")
            assert decision, (name, where, decision)


# ---------------------------------------------------------------------------- the two scopes


def test_the_strategy_is_checked_first_and_its_denial_wins(h: Harness) -> None:
    """Both scopes would deny: the strategy's check comes first, whatever the rules' order
    (A's open-orders cap, rule 8, over the account's gross, rule 4)."""
    g = h.gate(
        L(max_gross_exposure=100, max_order_notional=100),
        budgets={"A": L(max_open_orders=1, max_order_notional=100)},
    )
    assert g.try_enter("AAA", 50, strategy="A")
    assert why(g.try_enter("AAA", 60, strategy="A")) == (R.MAX_OPEN_ORDERS, "A")
    assert why(g.try_enter("AAA", 60)) == (R.MAX_GROSS_EXPOSURE, None)
    assert why(g.try_enter("BBB", 101, strategy="A")) == (R.MAX_ORDER_NOTIONAL, "A")  # rule 7
    g.budgets = {"A": L(max_open_orders=1)}
    assert why(g.try_enter("BBB", 101, strategy="A")) == (R.MAX_OPEN_ORDERS, "A")
    g.budgets = {"A": L()}
    assert why(g.try_enter("BBB", 101, strategy="A")) == (R.MAX_GROSS_EXPOSURE, None)


def test_halted_is_the_accounts_whatever_the_budget(h: Harness) -> None:
    """The trading state is the account's: a halt denies with scope None even where the
    strategy's own cap would deny too, and an admitted decision has no scope."""
    g = h.gate(L(), budgets={"A": L(max_order_notional=1)})
    g.halt()
    assert why(g.try_enter("AAA", 5, strategy="A")) == (R.HALTED, None)
    g.resume()
    assert why(g.try_enter("AAA", 5, strategy="A")) == (R.MAX_ORDER_NOTIONAL, "A")
    decision = g.try_enter("AAA", 1, strategy="A")
    assert why(decision) == (None, None)
    assert res_of(decision).strategy == "A"
    assert res_of(g.try_enter("AAA", 1)).strategy is None


def test_positions_limit_at_strategy_scope_counts_its_own_symbols(h: Harness) -> None:
    """A's ``max_concurrent_positions`` counts the symbols A holds or has reserved: the
    account's own and B's symbols are not A's, and A adding to a symbol only they hold opens
    it for A."""
    g = h.gate(
        L(max_concurrent_positions=4), budgets={"A": L(max_concurrent_positions=1), "B": L()}
    )
    g.set_position("XXX", 100)  # the account's own
    g.set_position("YYY", 100, strategy="B")
    assert g.try_enter("ZZZ", 1, strategy="B")
    assert g.try_enter("AAA", 1, strategy="A")
    assert g.try_enter("AAA", 1, strategy="A")  # open for A already: no new slot
    assert why(g.try_enter("XXX", 1, strategy="A")) == (R.MAX_CONCURRENT_POSITIONS, "A")
    assert why(g.try_enter("BBB", 1, strategy="A")) == (R.MAX_CONCURRENT_POSITIONS, "A")
    assert g.try_enter("XXX", 1, strategy="B")  # XXX is open in the account: no new slot
    assert why(g.try_enter("CCC", 1, strategy="B")) == (R.MAX_CONCURRENT_POSITIONS, None)
    assert g.release("AAA") is True
    g.set_position("BBB", 0, strategy="A")  # open with no exposure: A's one slot
    assert why(g.try_enter("AAA", 1, strategy="A")) == (R.MAX_CONCURRENT_POSITIONS, "A")
    assert g.close_position("BBB", strategy="A") is True
    assert g.try_enter("XXX", 1, strategy="A")


def test_gross_at_strategy_scope_is_over_its_own_book(h: Harness) -> None:
    """A's gross: its positions and reservations only, landing on the budget admitted."""
    g = h.gate(L(max_gross_exposure=10_000), budgets={"A": L(max_gross_exposure=1_000), "B": L()})
    g.set_position("AAA", -600, strategy="A")
    g.set_position("BBB", 5_000, strategy="B")
    g.set_position("CCC", 2_000)
    assert g.try_enter("AAA", 1_000, side=Side.BUY, strategy="B")  # B's, in AAA: not A's
    assert why(g.try_enter("DDD", 401, strategy="A")) == (R.MAX_GROSS_EXPOSURE, "A")
    assert g.try_enter("DDD", 400, strategy="A")
    assert why(g.try_enter("DDD", Decimal("1e-9"), strategy="A")) == (R.MAX_GROSS_EXPOSURE, "A")
    # the account's: AAA's worst case 600 (-600, or 400 with B's buy) + 5,000 + 2,000 + 400
    assert why(g.try_enter("EEE", 2_001)) == (R.MAX_GROSS_EXPOSURE, None)
    assert g.try_enter("EEE", 2_000)


def test_symbol_at_strategy_scope_where_the_account_is_reducing(h: Harness) -> None:
    """B holds AAA long 1,000; A's sells on AAA reduce the account's position but open a short
    for A, so A's symbol budget bounds them while the account admits."""
    g = h.gate(L(max_symbol_exposure=1_000), budgets={"A": L(max_symbol_exposure=500), "B": L()})
    g.set_position("AAA", 1_000, strategy="B")
    assert g.try_enter("AAA", 400, side=Side.SELL, strategy="A")
    assert why(g.try_enter("AAA", 101, side=Side.SELL, strategy="A")) == (
        R.MAX_SYMBOL_EXPOSURE,
        "A",
    )
    assert g.try_enter("AAA", 100, side=Side.SELL, strategy="A")  # A's -500: on the budget
    assert g.try_enter("AAA", 1_500, side=Side.SELL, strategy="B")  # B's own: 1,000 - 2,000
    assert why(g.try_enter("AAA", 1, side=Side.SELL, strategy="B")) == (
        R.MAX_SYMBOL_EXPOSURE,
        None,  # the account's: 1,000 - 500 - 1,500 - 1 = -1,001
    )


def test_net_at_strategy_scope(h: Harness) -> None:
    """A's net is over A's book: B's big short does not hedge A's longs."""
    g = h.gate(L(max_net_exposure=10_000), budgets={"A": L(max_net_exposure=1_000), "B": L()})
    g.set_position("AAA", 600, strategy="A")
    g.set_position("BBB", -5_000, strategy="B")  # the account's net: -4,400
    assert why(g.try_enter("CCC", 401, side=Side.BUY, strategy="A")) == (R.MAX_NET_EXPOSURE, "A")
    assert g.try_enter("CCC", 400, side=Side.BUY, strategy="A")  # A's 1,000: on the budget
    assert g.try_enter("CCC", 300, side=Side.SELL, strategy="A")  # lowers no net of A's
    assert g.try_enter("DDD", 5_300, side=Side.SELL)  # the account: -4,400 - 300 - 5,300
    assert why(g.try_enter("DDD", 1, side=Side.SELL)) == (R.MAX_NET_EXPOSURE, None)
    assert why(g.try_enter("DDD", 1, side=Side.SELL, strategy="A")) == (R.MAX_NET_EXPOSURE, None)


def test_sides_and_worst_cases_at_strategy_scope(h: Harness) -> None:
    """A's budget on its worst cases: a sell reducing A's long is admitted however full A is,
    an unknown side counts both ways, and two sells cannot both flip A past its limit."""
    g = h.gate(L(), budgets={"A": L(max_gross_exposure=1_000, max_symbol_exposure=1_000)})
    g.set_position("AAA", 1_000, strategy="A")
    assert why(g.try_enter("AAA", 1, side=Side.BUY, strategy="A")) == (R.MAX_GROSS_EXPOSURE, "A")
    assert why(g.try_enter("AAA", 1, strategy="A")) == (R.MAX_GROSS_EXPOSURE, "A")
    assert g.try_enter("AAA", 500, side=Side.SELL, strategy="A")
    assert g.try_enter("AAA", 1_500, side=Side.SELL, strategy="A")  # both filled: -1,000
    assert why(g.try_enter("AAA", 1, side=Side.SELL, strategy="A")) == (R.MAX_GROSS_EXPOSURE, "A")
    g.budgets = {"A": L(max_symbol_exposure=1_000)}
    assert why(g.try_enter("AAA", 1, side=Side.SELL, strategy="A")) == (
        R.MAX_SYMBOL_EXPOSURE,
        "A",
    )


def test_reducing_at_both_scopes(h: Harness) -> None:
    """In ``REDUCING`` (the account's state) an order must raise no figure at either scope:
    A's buy covering the account's short still adds to A's long (denied as A's); A's sell
    reducing A's long adds to the account's short (denied as the account's)."""
    g = h.gate(L(), budgets={"A": L(), "B": L()})
    g.set_position("AAA", 1_000, strategy="A")
    g.set_position("AAA", -3_000, strategy="B")  # the account: -2,000
    g.set_position("DDD", 500, strategy="B")
    g.reduce_only()
    assert state_of(g) is TradingState.REDUCING
    assert why(g.try_enter("AAA", 500, side=Side.BUY, strategy="A")) == (R.REDUCING_ONLY, "A")
    assert why(g.try_enter("AAA", 500, side=Side.SELL, strategy="A")) == (R.REDUCING_ONLY, None)
    assert g.try_enter("AAA", 500, side=Side.BUY, strategy="B")  # reduces B and the account
    assert why(g.try_enter("DDD", 100, side=Side.SELL, strategy="A")) == (R.REDUCING_ONLY, "A")
    # B's sell lowers B's DDD but adds to B's net short (-2,500 held): both scopes would deny
    assert why(g.try_enter("DDD", 100, side=Side.SELL, strategy="B")) == (R.REDUCING_ONLY, "B")
    g.set_position("EEE", -100)  # the account's own short: covering it lowers every figure
    assert g.try_enter("EEE", 100, side=Side.BUY)
    assert why(g.try_enter("CCC", 1, side=Side.SELL, strategy="A")) == (R.REDUCING_ONLY, "A")


# ---------------------------------------------------------------------------- the book


def test_the_accounts_position_is_the_sum_of_its_parts(h: Harness) -> None:
    """``positions()`` is what the exchange holds: each symbol's parts (strategies' and the
    account's own) summed; ``positions(strategy=S)`` is S's part as set. A symbol is open in
    the account while any part is, even at a sum of 0."""
    g = h.gate(L(max_concurrent_positions=3), budgets={"A": L(), "B": L()})
    g.set_position("AAA", 100, strategy="A")
    g.set_position("AAA", -30, strategy="B")
    g.set_position("AAA", 5)
    g.set_position("BBB", Decimal("0.5"), strategy="A")
    g.set_position("FFF", 0.1, strategy="A")
    g.set_position("FFF", 0.2, strategy="B")
    got = positions_of(g)
    assert got == {"AAA": 75, "BBB": Decimal("0.5"), "FFF": 0.3}
    assert type(got["AAA"]) is int and type(got["BBB"]) is Decimal and type(got["FFF"]) is float
    assert positions_of(g, "A") == {"AAA": 100, "BBB": Decimal("0.5"), "FFF": 0.1}
    assert positions_of(g, "B") == {"AAA": -30, "FFF": 0.2}
    assert positions_of(g, "nobody") == {}
    assert why(g.try_enter("CCC", 1)) == (R.MAX_CONCURRENT_POSITIONS, None)
    assert g.close_position("AAA", strategy="A") is True
    assert g.close_position("AAA", strategy="A") is False
    assert positions_of(g)["AAA"] == -25
    assert g.close_position("AAA") is True
    assert positions_of(g)["AAA"] == -30
    g.set_position("AAA", 30)  # the sum is 0: still open, still a slot
    assert positions_of(g)["AAA"] == 0
    assert why(g.try_enter("CCC", 1)) == (R.MAX_CONCURRENT_POSITIONS, None)
    assert g.close_position("AAA", strategy="B") and g.close_position("AAA")
    assert "AAA" not in positions_of(g)
    assert g.try_enter("CCC", 1)


def test_the_account_decides_on_the_sums(h: Harness) -> None:
    """The account's figures are of the summed position: A's long and B's short net out."""
    g = h.gate(L(max_symbol_exposure=100, max_gross_exposure=100), budgets={"A": L(), "B": L()})
    g.set_position("AAA", 300, strategy="A")
    g.set_position("AAA", -250, strategy="B")  # the account holds 50
    assert why(g.try_enter("AAA", 51, side=Side.BUY)) == (R.MAX_GROSS_EXPOSURE, None)
    assert g.try_enter("AAA", 50, side=Side.BUY, strategy="A")  # 100: not A's 300 + B's 250
    assert why(g.try_enter("AAA", 151, side=Side.SELL, strategy="B")) == (
        R.MAX_GROSS_EXPOSURE,
        None,
    )
    assert g.try_enter("AAA", 150, side=Side.SELL, strategy="B")  # 50 - 150: on the limit
    assert why(g.try_enter("AAA", Decimal("1e-9"), side=Side.SELL)) == (
        R.MAX_GROSS_EXPOSURE,
        None,
    )


def test_confirm_fill_follows_the_reservations_strategy(h: Harness) -> None:
    """A fill books the position of the reservation's strategy; naming another strategy is
    refused with nothing changed; with the reservation gone the named strategy's part is
    set."""
    g = h.gate(L(), budgets={"A": L(max_gross_exposure=100), "B": L()})
    res = res_of(g.try_enter("AAA", 60, order_id="f-1", strategy="A"))
    assert g.confirm_fill("f-1", 60) is True
    assert not res.active
    assert positions_of(g, "A") == {"AAA": 60} and positions_of(g) == {"AAA": 60}
    assert positions_of(g, "B") == {}
    assert why(g.try_enter("AAA", 41, strategy="A")) == (R.MAX_GROSS_EXPOSURE, "A")
    part = res_of(g.try_enter("BBB", 40, order_id="f-2", strategy="A"))
    before = (positions_of(g, "A"), positions_of(g, "B"), positions_of(g), g.stats())
    with pytest.raises(ValueError, match="strategy"):
        g.confirm_fill("f-2", 40, strategy="B")
    with pytest.raises(ValueError, match="strategy"):
        g.confirm_fill("f-2", 40, filled=10, strategy="B")
    with pytest.raises(ValueError, match="strategy"):
        g.confirm_fill("f-2", 40, symbol="BBB", strategy="B")
    assert (positions_of(g, "A"), positions_of(g, "B"), positions_of(g), g.stats()) == before
    assert part.active
    assert g.confirm_fill("f-2", 10, filled=10, strategy="A") is True
    assert positions_of(g, "A") == {"AAA": 60, "BBB": 10} and part.active
    assert part.strategy == "A"
    assert g.confirm_fill("f-2", 40, symbol="BBB") is True
    assert g.confirm_fill("gone", 7, symbol="CCC", strategy="B") is False
    assert positions_of(g, "B") == {"CCC": 7}
    assert positions_of(g) == {"AAA": 60, "BBB": 40, "CCC": 7}
    own = res_of(g.try_enter("DDD", 5, order_id="f-3"))
    with pytest.raises(ValueError, match="strategy"):
        g.confirm_fill("f-3", 5, strategy="A")  # the account's own order is not A's
    assert own.active
    assert g.confirm_fill("f-3", 5) is True
    assert positions_of(g, "A") == {"AAA": 60, "BBB": 40} and positions_of(g)["DDD"] == 5


def test_a_strategy_may_hold_a_position_after_its_budget_is_gone(h: Harness) -> None:
    """Removing a budget stops its trading, not its book: the position still counts in the
    account, and its outstanding orders stay its own."""
    g = h.gate(L(max_gross_exposure=1_000), budgets={"A": L(), "B": L()})
    g.set_position("AAA", 600, strategy="A")
    res = res_of(g.try_enter("BBB", 300, strategy="A"))
    g.budgets = {"B": L()}
    with pytest.raises(ValueError, match="strategy"):
        g.try_enter("CCC", 1, strategy="A")
    assert why(g.try_enter("CCC", 101, strategy="B")) == (R.MAX_GROSS_EXPOSURE, None)
    assert g.try_enter("CCC", 100, strategy="B")
    assert positions_of(g, "A") == {"AAA": 600} and res.active and res.strategy == "A"
    assert g.stats().scopes["A"].outstanding == 1
    g.set_position("AAA", 100, strategy="A")
    assert g.try_enter("CCC", 500, strategy="B")


# ---------------------------------------------------------------------------- bad strategies


@pytest.mark.parametrize("strategy", ["C", "a", "", "A "])
def test_a_strategy_without_a_budget_is_refused_and_reserves_nothing(
    h: Harness, strategy: str
) -> None:
    """A typo must not trade without limits: ``ValueError`` naming the argument and the value,
    nothing reserved, nothing counted; with no budgets at all, every strategy is refused."""
    g = h.gate(L(max_open_orders=1), budgets={"A": L()})
    before = g.stats()
    with pytest.raises(ValueError, match="strategy") as info:
        g.try_enter("AAA", 1, order_id="o-1", strategy=strategy)
    assert repr(strategy) in str(info.value)
    assert g.stats() == before
    assert g.try_enter("AAA", 1, order_id="o-1", strategy="A")  # the id and the slot are free
    bare = h.gate()
    with pytest.raises(ValueError, match="strategy"):
        bare.try_enter("AAA", 1, strategy="A")
    assert bare.stats().decisions == 0


BAD_BUDGETS: list[tuple[object, type[Exception], str]] = [
    ([("A", L())], TypeError, "budgets"),
    ({1: L()}, TypeError, "1"),
    ({"": L()}, ValueError, "''"),
    ({"A": None}, TypeError, "'A'"),
    ({"A": L(max_daily_loss=1)}, ValueError, "loss limit"),
    ({"B": L(), "A": L(max_drawdown=5)}, ValueError, "loss limit"),
]


@pytest.mark.parametrize(
    ("budgets", "error", "names"), BAD_BUDGETS, ids=[repr(b) for b, _, _ in BAD_BUDGETS]
)
def test_bad_budgets_change_nothing(
    h: Harness, budgets: object, error: type[Exception], names: str
) -> None:
    """A refused budgets assignment keeps the budgets in force, and the decisions they make;
    at construction it makes no gate."""
    g = h.gate(L(), budgets={"A": L(max_order_notional=10)})
    assert g.try_enter("AAA", 10, strategy="A")
    before = (dict(g.budgets), g.limits, g.stats())
    with pytest.raises(error, match="budgets") as info:
        g.budgets = budgets  # type: ignore[assignment]
    assert names in str(info.value)
    assert (dict(g.budgets), g.limits, g.stats()) == before
    assert why(g.try_enter("AAA", 11, strategy="A")) == (R.MAX_ORDER_NOTIONAL, "A")
    with pytest.raises(ValueError, match="strategy"):
        g.try_enter("AAA", 1, strategy="B")
    with pytest.raises(error, match="budgets"):
        h.gate(L(), budgets=budgets)


class Name(str):
    """A str subclass: its hash and comparisons are Python code."""

    __slots__ = ()


def test_a_str_subclass_name_is_refused_or_kept_as_an_exact_str(h: Harness) -> None:
    """A budget's name, or a strategy, of a str subclass is refused (naming the argument), or
    taken as the plain str it spells, never kept as the subclass (whose code would run in the
    decision)."""
    g = h.gate(L())
    try:
        g.budgets = {Name("A"): L(max_order_notional=1)}
    except (TypeError, ValueError) as exc:
        assert "budgets" in str(exc) and dict(g.budgets) == {}
        g.budgets = {"A": L(max_order_notional=1)}
    assert [type(name) for name in g.budgets] == [str]
    try:
        decision = g.try_enter("AAA", 2, strategy=Name("A"))
    except (TypeError, ValueError) as exc:
        assert "strategy" in str(exc) and g.stats().decisions == 0
        return
    assert why(decision) == (R.MAX_ORDER_NOTIONAL, "A") and type(decision.scope) is str


# ---------------------------------------------------------------------------- replacements


def test_budgets_and_limits_replace_one_another_never(h: Harness) -> None:
    """Assigning the limits keeps the budgets and the other way round; each decision after
    an assignment uses it."""
    a = L(max_order_notional=10)
    g = h.gate(L(max_order_notional=100), budgets={"A": a})
    g.limits = L(max_order_notional=50)
    assert dict(g.budgets) == {"A": a}
    g.budgets = {"A": L(max_order_notional=20), "C": L()}
    assert g.limits == L(max_order_notional=50)
    assert why(g.try_enter("AAA", 21, strategy="A")) == (R.MAX_ORDER_NOTIONAL, "A")
    assert why(g.try_enter("AAA", 51, strategy="C")) == (R.MAX_ORDER_NOTIONAL, None)
    assert g.try_enter("AAA", 50, strategy="C")
    g.budgets = None
    assert dict(g.budgets) == {} and g.limits == L(max_order_notional=50)


class SlowBudgets(Mapping[str, PortfolioLimits]):
    """A budgets mapping that runs ``meanwhile`` the first time the gate reads it (while it is
    being checked, before the assignment takes effect)."""

    def __init__(self, data: Budgets, meanwhile: Callable[[], None]) -> None:
        self._data = data
        self._meanwhile: Callable[[], None] | None = meanwhile

    def _once(self) -> None:
        run, self._meanwhile = self._meanwhile, None
        if run is not None:
            run()

    def __getitem__(self, key: str) -> PortfolioLimits:
        self._once()
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        self._once()
        return iter(self._data)

    def __len__(self) -> int:
        self._once()
        return len(self._data)


def limits_assigned_while_budgets_are_checked(g: Any) -> tuple[PortfolioLimits, Budgets]:
    """Assign ``g.budgets`` (to ``{"A": max_order_notional=3}``) while another thread assigns
    ``g.limits`` (to ``max_order_notional=5``) in the middle of the budgets' check; return the
    pair in force afterwards. The other thread may finish at once, or wait for the budgets'
    assignment to finish first (then it lands after): either way both must stand."""
    done = threading.Event()
    errors: list[BaseException] = []

    def assign_limits() -> None:
        try:
            g.limits = L(max_order_notional=5)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
        finally:
            done.set()

    helper = threading.Thread(target=assign_limits, daemon=True)

    def meanwhile() -> None:
        helper.start()
        done.wait(5.0)  # not done by then: it waits for this assignment (no loss either)

    g.budgets = SlowBudgets({"A": L(max_order_notional=3)}, meanwhile)
    helper.join(30.0)
    assert not helper.is_alive() and not errors, errors
    return g.limits, dict(g.budgets)


def test_no_update_is_lost_when_limits_and_budgets_are_assigned_together(h: Harness) -> None:
    """Both assignments stand (a setter that read the pair before checking its argument
    would write the old limits back), and decisions use both."""
    g = h.gate(L(), budgets={"A": L()})
    pair = limits_assigned_while_budgets_are_checked(g)
    assert pair == (L(max_order_notional=5), {"A": L(max_order_notional=3)})
    assert why(g.try_enter("AAA", 4, strategy="A")) == (R.MAX_ORDER_NOTIONAL, "A")
    assert why(g.try_enter("AAA", 6)) == (R.MAX_ORDER_NOTIONAL, None)


class LossyPair:
    """The broken variant: a budgets setter that takes the account's limits, then checks its
    argument (caller code runs), then stores the pair, with no lock ordering the setters."""

    def __init__(self) -> None:
        self.limits = L()
        self._budgets: Budgets = {}

    @property
    def budgets(self) -> Budgets:
        return self._budgets

    @budgets.setter
    def budgets(self, budgets: Mapping[str, PortfolioLimits]) -> None:
        account = self.limits
        checked = dict(budgets.items())
        self.limits, self._budgets = account, checked


def test_the_lost_update_check_catches_a_setter_that_reads_first() -> None:
    """The check above can fail: on the broken setter the limits assigned meanwhile are lost,
    every time (the other thread's assignment is driven into the gap by the mapping)."""
    limits, budgets = limits_assigned_while_budgets_are_checked(LossyPair())
    assert budgets == {"A": L(max_order_notional=3)}
    assert limits == L()  # the other thread's L(max_order_notional=5) was written over


# Two pairs of (limits, budgets) and the orders that tell a torn read from a whole one. The
# account holds XXX 1,000 (its own part). X is S1's 10 on XXX, Y is S2's 100 on YYY.
#   P1 = (L1, B1): X denied by the account's symbol limit, Y by S2's order cap.
#   P2 = (L2, B2): X denied by S1's order cap, Y by the account's order cap.
# A decision reading L2 with B1 admits X; one reading L1 with B2 admits Y. L0 admits nothing:
# the replacements below pass through it, so no pair in force at any moment admits X or Y.
L0 = L(max_order_notional=0)
L1 = L(max_symbol_exposure=500)
L2 = L(max_order_notional=50)
B1: Budgets = {"S1": L(), "S2": L(max_order_notional=1)}
B2: Budgets = {"S1": L(max_order_notional=1), "S2": L()}
ORDERS = {"X": ("XXX", 10, "S1"), "Y": ("YYY", 100, "S2")}
WHOLE = {
    ("P1", "X"): (R.MAX_SYMBOL_EXPOSURE, None),
    ("P1", "Y"): (R.MAX_ORDER_NOTIONAL, "S2"),
    ("P2", "X"): (R.MAX_ORDER_NOTIONAL, "S1"),
    ("P2", "Y"): (R.MAX_ORDER_NOTIONAL, None),
}
PAIRS = {"P1": (L1, B1), "P2": (L2, B2)}


def torn_read_gate(g: Any) -> Any:
    g.set_position("XXX", 1_000)
    return g


def order(g: Any, which: str) -> Decision:
    symbol, notional, strategy = ORDERS[which]
    decision: Decision = g.try_enter(symbol, notional, strategy=strategy)
    return decision


def put(g: Any, pair: str) -> None:
    g.limits, g.budgets = PAIRS[pair]


def test_each_pair_decides_whole_and_a_mixed_pair_would_admit(h: Harness) -> None:
    """Single-threaded, the two pairs decide as written above, and the mixed pairs (set on
    purpose) admit: the test below can tell a torn read."""
    g = torn_read_gate(h.gate(L1, budgets=B1))
    for (pair, which), want in WHOLE.items():
        put(g, pair)
        assert why(order(g, which)) == want, (pair, which)
    g.limits, g.budgets = L2, B1
    assert res_of(order(g, "X")).release()
    g.limits, g.budgets = L1, B2
    assert res_of(order(g, "Y")).release()
    g.limits = L0
    assert not order(g, "X") and not order(g, "Y")


class HookClock(ManualClock):
    """A ``ManualClock`` that runs ``hook`` at its ``at``-th reading (then never again)."""

    __slots__ = ("at", "hook", "reads")

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.at = 0
        self.hook: Callable[[], None] | None = None

    def __call__(self) -> float:
        self.reads += 1
        if self.hook is not None and self.reads == self.at:
            hook, self.hook = self.hook, None
            hook()
        return super().__call__()


def replaced_mid_decision(
    g: Any, clock: HookClock, start: str, end: str, which: str
) -> list[tuple[DenyReason | None, str | None]]:
    """Order ``which`` decided from pair ``start``, with the replacement by pair ``end`` (both
    the limits and the budgets) landing at the k-th clock reading of the decision, for each k
    the decision reads the clock; the outcomes, one per k."""
    put(g, start)
    before = clock.reads
    assert why(order(g, which)) == WHOLE[start, which]
    readings = clock.reads - before
    assert readings >= 1  # the decision reads the clock: the replacement lands inside it
    outcomes = []
    for k in range(1, readings + 1):
        put(g, start)
        swapped: list[int] = []

        def swap(swapped: list[int] = swapped) -> None:
            put(g, end)
            swapped.append(1)

        clock.at, clock.hook = clock.reads + k, swap
        decision = order(g, which)
        assert swapped == [1], k
        outcomes.append(why(decision))
        if decision:
            assert res_of(decision).release()
    return outcomes


DIRECTIONS = [("P1", "P2"), ("P2", "P1")]


@pytest.mark.parametrize(("start", "end"), DIRECTIONS)
@pytest.mark.parametrize("which", ["X", "Y"])
def test_a_pair_replaced_in_the_middle_of_a_decision_is_used_whole(
    start: str, end: str, which: str
) -> None:
    """In process, deterministically: the replacement lands at each clock reading a decision
    makes (the gate's one call out during a decision), and the decision is still the start
    pair's or the end pair's, never a mixture (which would admit: see above). Both directions,
    so a read of the budgets before the limits is caught too."""
    clock = HookClock()
    g = torn_read_gate(
        PortfolioGate(PendingEntryLedger(60.0, clock=clock), L(), wall_clock=ManualWallClock())
    )
    for got in replaced_mid_decision(g, clock, start, end, which):
        assert got in (WHOLE[start, which], WHOLE[end, which]), got


class TornGate:
    """The broken variant: a gate that reads its limits, then the clock, then its budgets (two
    reads where the real gates read one object), and decides on what it read."""

    def __init__(self, clock: HookClock) -> None:
        self.clock = clock
        self.limits = L()
        self.budgets: Budgets = {}
        self.inner = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), L())

    def set_position(self, symbol: str, exposure: int) -> None:
        self.inner.set_position(symbol, exposure)

    def try_enter(self, symbol: str, notional: int, *, strategy: str) -> Decision:
        account = self.limits
        self.clock()
        self.inner.limits, self.inner.budgets = account, self.budgets
        return self.inner.try_enter(symbol, notional, strategy=strategy)


def test_the_mid_decision_check_catches_a_gate_that_reads_twice() -> None:
    """The check above can fail, deterministically: on the torn gate the replacement P1 -> P2
    admits Y (L1 read before it, B2 after) and P2 -> P1 admits X."""
    caught = set()
    for (start, end), which in itertools.product(DIRECTIONS, ORDERS):
        clock = HookClock()
        outcomes = replaced_mid_decision(torn_read_gate(TornGate(clock)), clock, start, end, which)
        if (None, None) in outcomes:
            caught.add((start, which))
    assert caught == {("P1", "Y"), ("P2", "X")}


def test_budgets_replaced_while_threads_decide(h: Harness, fast_switching: float) -> None:
    """Threads decide X and Y while another walks the pairs P1 -> (L0) -> P2 -> (L0) -> P1 one
    assignment at a time: no pair in force ever admits X or Y, so an admission is a decision
    that read its limits and its budgets at different moments. The counts add up per scope."""
    g = torn_read_gate(h.gate(L1, budgets=B1))
    target = 20_000 if h.backend == "memory" else 4_000  # decisions made while the walk goes on
    stop = threading.Event()
    decided: list[int] = []
    admitted: list[Decision] = []
    errors: list[BaseException] = []

    def walk() -> None:
        try:
            while len(decided) < target and not errors:
                g.limits = L0
                g.budgets = B2
                g.limits = L2
                g.limits = L0
                g.budgets = B1
                g.limits = L1
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def decide() -> None:
        try:
            while not stop.is_set():
                for which in ORDERS:
                    decision = order(g, which)
                    decided.append(1)
                    if decision:
                        admitted.append(decision)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=decide, daemon=True) for _ in range(3)]
    threads.append(threading.Thread(target=walk, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert admitted == []
    stats = g.stats()
    assert stats.admitted == 0 and stats.decisions > 0
    check_scope_sums(stats)


# ---------------------------------------------------------------------------- stats


def check_scope_sums(stats: Any) -> None:
    """``GateStats.scopes`` adds up to the top level, and every scope maps every reason."""
    assert None in stats.scopes
    assert sum(s.admitted for s in stats.scopes.values()) == stats.admitted
    for reason in DenyReason:
        assert sum(s.denied[reason] for s in stats.scopes.values()) == stats.denied[reason]
    for scope in stats.scopes.values():
        assert set(scope.denied) == set(DenyReason)


def test_stats_per_scope(h: Harness) -> None:
    """Counts per strategy (decisions made under it, whichever scope denied), the account's
    own (no strategy) under None; outstanding per scope; every budget a key, and a strategy
    with counts stays one after its budget is gone."""
    g = h.gate(L(max_open_orders=4), budgets={"A": L(max_order_notional=10), "B": L(), "C": L()})
    a = res_of(g.try_enter("AAA", 10, strategy="A"))
    assert g.try_enter("AAA", 5, strategy="A")
    assert not g.try_enter("AAA", 11, strategy="A")  # A's cap
    assert g.try_enter("BBB", 1, strategy="B")
    assert g.try_enter("CCC", 1)
    assert why(g.try_enter("DDD", 1, strategy="A")) == (R.MAX_OPEN_ORDERS, None)
    assert why(g.try_enter("DDD", 1)) == (R.MAX_OPEN_ORDERS, None)
    g.halt()
    assert why(g.try_enter("DDD", 1, strategy="B")) == (R.HALTED, None)
    g.resume()
    assert a.release()
    stats = g.stats()
    assert set(stats.scopes) == {"A", "B", "C", None}
    scopes = stats.scopes
    assert (scopes["A"].admitted, scopes["A"].outstanding) == (2, 1)
    assert scopes["A"].denied[R.MAX_ORDER_NOTIONAL] == 1
    assert scopes["A"].denied[R.MAX_OPEN_ORDERS] == 1
    assert scopes["A"].decisions == 4
    assert (scopes["B"].admitted, scopes["B"].outstanding, scopes["B"].decisions) == (1, 1, 2)
    assert scopes["B"].denied[R.HALTED] == 1
    assert (scopes["C"].decisions, scopes["C"].outstanding) == (0, 0)
    assert (scopes[None].admitted, scopes[None].outstanding, scopes[None].decisions) == (1, 1, 2)
    assert (stats.admitted, stats.decisions) == (4, 8)
    check_scope_sums(stats)
    g.budgets = {"B": L()}
    assert set(g.stats().scopes) == {"A", "B", None}  # C had no counts; A has
    check_scope_sums(g.stats())


def test_a_timed_out_decision_under_a_strategy_counts_in_its_scope() -> None:
    """In process: with the ledger lock held elsewhere a decision under A times out (fail
    closed, scope None: no budget denied it) and counts as A's decision."""
    ledger = PendingEntryLedger(60.0, clock=ManualClock())
    g = PortfolioGate(ledger, L(), budgets={"A": L()})
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with ledger.lock():
            taken.set()
            done.wait(30.0)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(30.0)
    try:
        decision = g.try_enter("AAA", 1, strategy="A", timeout=0)
    finally:
        done.set()
        holder.join(30.0)
    assert why(decision) == (R.LOCK_TIMEOUT, None)
    stats = g.stats()
    assert stats.scopes["A"].denied[R.LOCK_TIMEOUT] == 1
    assert stats.scopes[None].denied[R.LOCK_TIMEOUT] == 0
    check_scope_sums(stats)


# ---------------------------------------------------------------------------- the table
#
# Both scopes through the edges of every rule, on both backends, against a model: the state
# below (positions in parts, reservations with their strategies and sides) is set up on the
# gate and kept in the model; for each order (a strategy's or the account's own, on symbols
# open or reserved in either scope or neither, each side, in ACTIVE and REDUCING) limits are
# set at each scope to each rule's edge (on the limit, or one unit past it) and the decision
# must be the model's: first_failing_rule at A's scope, then at the account's. Admitted orders
# are released again, so every case starts from the same book; their stamps stay in the rate
# windows, which the model keeps too. The rate counts stay fixed (a gate keeps only the last
# count's stamps), the window's seconds move the edge; the clock moves a second after every
# admission, so every stamp has its own instant.

PARTS: list[tuple[str, str | None, Any]] = [
    ("AAA", "A", 600),
    ("BBB", "A", Decimal("-300.5")),
    ("AAA", "B", -200),
    ("CCC", "B", 150),
    ("DDD", None, 80),
]
RESERVED: list[tuple[str, Any, Side | None, str | None]] = [
    ("AAA", 100, None, "A"),
    ("CCC", 0.25, None, "A"),
    ("AAA", 250, Side.SELL, "A"),
    ("BBB", 200, Side.BUY, "A"),
    ("AAA", 50, Side.BUY, "B"),
    ("EEE", 30, None, "B"),
    ("DDD", 10, Side.SELL, None),
]
TABLE_SYMBOLS = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
RATE_COUNT = {"A": 2, "B": 2, None: 3}
SIDE_CODE = {None: rules.UNKNOWN_SIDE, Side.BUY: rules.BUY, Side.SELL: rules.SELL}


@dataclass
class ScopedModel:
    """The table's bookkeeping: position parts, reservations, admission stamps per scope (on
    the model's own clock: seconds since the gate was made, as the harness moved it)."""

    parts: dict[tuple[str, str | None], int] = field(default_factory=dict)
    orders: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    stamps: dict[str | None, list[float]] = field(default_factory=dict)
    now: float = 0.0

    def figures(self, scope: str | None, symbol: str, units: int, side: int) -> tuple[Any, ...]:
        """``first_failing_rule``'s figures (after the limits and the state) at ``scope`` (a
        strategy; None: the account, over everything) for this order."""
        mine = scope is not None
        signed: dict[str, int] = {}
        for (s, owner), value in self.parts.items():
            if not mine or owner == scope:
                signed[s] = signed.get(s, 0) + value
        orders = [o for o in self.orders if not mine or o[3] == scope]
        reserved = {s for s, _, _, _ in orders}

        def worst(on: str | None, extra: int) -> int:
            pending = [0, 0, 0]  # unknown, buys, sells (the side codes)
            for s, n, d, _ in orders:
                if on in (None, s):
                    pending[d] += n
            pending[side] += extra
            position = sum(signed.values()) if on is None else signed.get(on, 0)
            return rules.worst_case(position, pending[1], pending[2], pending[0])

        symbols = set(signed) | reserved
        stamps = self.stamps.get(scope, [])
        count = RATE_COUNT[scope]
        start = stamps[-count] if len(stamps) >= count else rules.NO_WINDOW
        return (
            len(symbols),
            symbol in symbols,
            sum(worst(s, 0) for s in symbols),
            worst(symbol, 0),
            worst(symbol, units),
            worst(None, 0),
            worst(None, units),
            units,
            len(orders),
            sum(1 for o in orders if o[0] == symbol),
            start,
            self.now,
        )


def edges(f: tuple[Any, ...], scope: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Each rule's edges at one scope, one rule at a time, the others unset: the figure the
    order leaves (admitted) and one unit (or one order, or half a second) less (denied)."""
    open_count, _, gross, before, after, _, net_after, units, orders, on_symbol, start, now = f

    def amount(n: int) -> Fraction:
        return Fraction(max(n, 0), 10**9)

    gross_at = gross - before + after
    count = RATE_COUNT[scope]
    span = now - start if start != rules.NO_WINDOW else 0.5
    found: list[tuple[str, dict[str, Any]]] = [
        ("none", {}),
        ("positions full", {"max_concurrent_positions": open_count}),
        ("positions one left", {"max_concurrent_positions": open_count + 1}),
        ("positions zero", {"max_concurrent_positions": 0}),
        ("gross at", {"max_gross_exposure": Decimal(gross_at).scaleb(-9)}),
        ("gross over", {"max_gross_exposure": amount(gross_at - 1)}),
        ("symbol at", {"max_symbol_exposure": amount(after)}),
        ("symbol over", {"max_symbol_exposure": amount(after - 1)}),
        ("net at", {"max_net_exposure": amount(net_after)}),
        ("net over", {"max_net_exposure": amount(net_after - 1)}),
        ("order at", {"max_order_notional": amount(units)}),
        ("order over", {"max_order_notional": amount(units - 1)}),
        ("open at", {"max_open_orders": orders + 1}),
        ("open over", {"max_open_orders": orders}),
        ("symbol orders at", {"max_open_orders_per_symbol": on_symbol + 1}),
        ("symbol orders over", {"max_open_orders_per_symbol": on_symbol}),
        ("rate at", {"max_orders_per_interval": (count, span)}),
        ("rate over", {"max_orders_per_interval": (count, span + 0.5)}),
    ]
    for _, limits in found:  # every limit keeps its scope's rate count (see above)
        limits.setdefault("max_orders_per_interval", (count, 0.5))
    return found


def expected(
    model: ScopedModel,
    strategy: str | None,
    limits: tuple[PortfolioLimits, PortfolioLimits],
    state: int,
    order: tuple[str, int, int],
) -> tuple[DenyReason | None, str | None]:
    """The decision the one rule function makes: at the strategy's scope, then the account's."""
    symbol, units, side = order
    budget, account = limits
    if strategy is not None:
        figures = model.figures(strategy, symbol, units, side)
        code = rules.first_failing_rule(rules.unit_limits(budget), state, *figures)
        if code != rules.ADMIT:
            return REASONS[code], (None if code == rules.HALTED else strategy)
    figures = model.figures(None, symbol, units, side)
    code = rules.first_failing_rule(rules.unit_limits(account), state, *figures)
    return REASONS[code], None


def base(scope: str | None) -> PortfolioLimits:
    return L(max_orders_per_interval=(RATE_COUNT[scope], 0.5))


def set_up_table(h: Harness) -> tuple[GateLike, ScopedModel]:
    budgets = {"A": base("A"), "B": base("B")}
    g = h.gate(base(None), ttl=10.0**7, budgets=budgets)
    model = ScopedModel()
    for symbol, owner, value in PARTS:
        g.set_position(symbol, value, strategy=owner)
        model.parts[symbol, owner] = _units.units("exposure", value, True)
    for symbol, notional, side, owner in RESERVED:
        assert g.try_enter(symbol, notional, side=side, strategy=owner)
        units = _units.notional_units("notional", notional)
        model.orders.append((symbol, units, SIDE_CODE[side], owner))
        admitted(model, owner)
        h.advance(1)
        model.now += 1
    assert positions_of(g, "A") == {"AAA": 600, "BBB": Decimal("-300.5")}
    assert positions_of(g) == {"AAA": 400, "BBB": Decimal("-300.5"), "CCC": 150, "DDD": 80}
    return g, model


def admitted(model: ScopedModel, strategy: str | None) -> None:
    model.stamps.setdefault(None, []).append(model.now)
    if strategy is not None:
        model.stamps.setdefault(strategy, []).append(model.now)


STATES = {TradingState.ACTIVE: rules.ACTIVE, TradingState.REDUCING: rules.REDUCING}


def drive_scoped_table(
    h: Harness, seed: int = 13
) -> dict[tuple[DenyReason | None, str | None], int]:
    """Every case on the gate, each decision checked against ``expected``; returns the
    outcomes seen (reason, scope)."""
    g, model = set_up_table(h)
    rng = random.Random(seed)
    seen: dict[tuple[DenyReason | None, str | None], int] = {}
    notionals: tuple[_units.Number, ...] = (50, Fraction(1, 3))
    sides: tuple[Side | None, ...] = (None, *Side)
    cases = itertools.product(STATES.items(), ("A", None), TABLE_SYMBOLS, notionals, sides)
    for (state, code), strategy, symbol, notional, side in cases:
        {TradingState.ACTIVE: g.resume, TradingState.REDUCING: g.reduce_only}[state]()
        units = _units.notional_units("notional", notional)
        order = (symbol, units, SIDE_CODE[side])
        account_edges = edges(model.figures(None, symbol, units, order[2]), None)
        if strategy is None:
            grid = [(("-", base("A")), (n, L(**k))) for n, k in account_edges]
        else:
            own_edges = edges(model.figures(strategy, symbol, units, order[2]), strategy)
            pairs = list(itertools.product(own_edges, account_edges))
            firsts = [p for p in pairs if p[0][0] == "none" or p[1][0] == "none"]
            rest = rng.sample([p for p in pairs if p not in firsts], 20)
            grid = [((sn, L(**sk)), (an, L(**ak))) for (sn, sk), (an, ak) in firsts + rest]
        for (sn, budget), (an, account) in grid:
            g.limits = account
            g.budgets = {"A": budget, "B": base("B")}
            decision = g.try_enter(symbol, notional, side=side, strategy=strategy)
            want = expected(model, strategy, (budget, account), code, order)
            case = f"{strategy} {symbol} {side} {notional!r} {state}: A {sn}, account {an}"
            assert why(decision) == want, f"{case}: {decision!r}, want {want}"
            seen[want] = seen.get(want, 0) + 1
            if decision:
                assert res_of(decision).release() is True, case
                admitted(model, strategy)
                h.advance(1)
                model.now += 1
    g.halt()
    for strategy in ("A", None):
        assert why(g.try_enter("FFF", 1, strategy=strategy)) == (R.HALTED, None)
    return seen


RULE_REASONS = [
    REASONS[code] for code in range(rules.REDUCING_ONLY, rules.MAX_ORDERS_PER_INTERVAL + 1)
]


def test_both_scopes_decide_every_edge_as_the_rule_function(h: Harness) -> None:
    """The table on each backend: both scopes' copies of the figures (and gate.lua's port of
    the rules) are held to rules.first_failing_rule, and every rule denies at both scopes."""
    seen = drive_scoped_table(h)
    want = {(None, None)} | {(r, None) for r in RULE_REASONS} | {(r, "A") for r in RULE_REASONS}
    assert want <= set(seen), sorted(want - set(seen), key=str)
