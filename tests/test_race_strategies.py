"""The race with strategy budgets under one account, and the order caps (issue 13).

Several strategies trade one account, each under a budget of its own (``SimConfig(strategies=)``,
budgets derived from the account's limits so that both scopes bind); every order is made under
a strategy, fills go to the reservation's strategy, and the router closes each strategy's
positions with that strategy's orders. The auditor checks every scope: each strategy's figures
against its budget, the account's against its limits, and the order caps (one order's notional,
open orders in all and on a symbol, the admissions in any sliding window of the rate's seconds).

The real gate must breach at no scope. The check-then-act gate must breach at some scope: the
race's catch is made certain by holding one decision in the gap while the others fill the
account's rate window; the catches at a strategy's budget are driven with events below, one
interleaving each. The auditor's own catches are shown on synthetic histories.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from gaps import Gap, interleave
from sim_checks import assert_books_balance

from pendingledger import (
    Decision,
    DenyReason,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Side,
    rules,
)
from pendingledger.sim import BrokenGate, MemoryBackend, SimConfig, SimResult, Simulation
from pendingledger.sim.auditor import Auditor
from pendingledger.sim.config import ACCOUNT, CAP_KINDS, LIMIT_KINDS, strategies_config
from pendingledger.sim.exchange import Order
from pendingledger.testing import ManualClock

# Four strategies on one account: every limit binds at both scopes on a ManualClock (whose
# steps of ttl / 8 put a rate window of 0.05 s inside one clock reading).
STRATEGIES = strategies_config(
    4,
    seconds=1.5,
    threads=32,
    seed=20261213,
    think=(0.0, 0.0),
    ttl=1.0,
    outcome_weights=(0.15, 0.40, 0.35, 0.10),
    min_admitted=300,
)
NAMES = ("s1", "s2", "s3", "s4")


def _run(
    config: SimConfig, *, between: Callable[[], object] | None = None, hold: int = 0
) -> tuple[SimResult, MemoryBackend]:
    """Race ``config`` on a ManualClock; with ``hold``, the broken gate's first decision to
    reach its gap waits there until the auditor has seen ``hold`` admissions."""
    made: list[MemoryBackend] = []
    sims: list[Simulation] = []
    calls: list[int] = []

    def held() -> None:
        calls.append(1)
        if len(calls) == 1:
            assert sims[0].wait_for_admissions(hold, 30.0), "the others never filled the window"

    def backend(**kwargs: Any) -> MemoryBackend:
        made.append(MemoryBackend(**kwargs, between=held if hold else between))
        return made[-1]

    sims.append(Simulation(config, backend=backend, clock=ManualClock()))
    result = sims[0].run()
    return result, made[0]


# ---------------------------------------------------------------- the race


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("fast_switching")
def test_strategies_sharing_an_account_never_breach_any_scope() -> None:
    """0 breaches at every scope, each strategy's budget and the account's limits binding."""
    result, backend = _run(STRATEGIES)

    assert result.breaches == 0, result.first_breach
    assert result.breaches_by_limit == dict.fromkeys(LIMIT_KINDS, 0)
    assert result.breaches_by_cap == dict.fromkeys(CAP_KINDS, 0)
    assert set(result.scopes) == {ACCOUNT, *NAMES}
    assert result.breaches_by_scope == dict.fromkeys((ACCOUNT, *NAMES), 0)
    for name, figures in result.scopes.items():
        limits = figures["limits"]
        assert figures["max_positions_seen"] <= limits["max_concurrent_positions"], name
        assert figures["max_gross_seen"] <= limits["max_gross_exposure"], name
        assert figures["max_symbol_seen"] <= limits["max_symbol_exposure"], name
        assert figures["max_net_seen"] <= limits["max_net_exposure"], name
        assert figures["max_open_orders_seen"] <= limits["max_open_orders"], name
        assert figures["max_symbol_orders_seen"] <= limits["max_open_orders_per_symbol"], name
        assert figures["max_window_seen"] <= limits["max_orders_per_interval"][0], name
        if limits["max_order_notional"] is not None:
            assert figures["max_order_seen"] <= limits["max_order_notional"], name
    # Both scopes bind: every strategy's budget denied orders, and the account's figures reached
    # its limits (its positions: the strategies' budgets add up to more than the account's).
    for name in NAMES:
        assert sum(result.scopes[name]["denied_here"].values()) > 0, name
        assert result.scopes[name]["admitted"] > 0, name
    account = result.scopes[ACCOUNT]
    assert sum(account["denied_here"].values()) > 0
    assert account["max_positions_seen"] == STRATEGIES.max_positions
    assert (
        sum(result.scopes[name]["limits"]["max_concurrent_positions"] for name in NAMES)
        > STRATEGIES.max_positions
    )
    assert result.admitted_buys > 0 and result.admitted_sells > 0
    assert result.longs_opened > 0 and result.shorts_opened > 0
    assert result.late_answers == 0
    # Every decision was made under a strategy, and the gate counted each one where we did.
    assert sum(result.scopes[name]["decisions"] for name in NAMES) == result.decisions
    gate_stats = backend.gate.stats()
    for name in NAMES:
        assert gate_stats.scopes[name].admitted == result.scopes[name]["admitted"], name
        assert gate_stats.scopes[name].decisions == result.scopes[name]["decisions"], name
    assert_books_balance(result, backend)
    assert result.ok


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("fast_switching")
def test_the_harness_catches_the_broken_gate_at_the_accounts_rate_for_certain() -> None:
    """One decision checks the account's rate window (room for one more), then waits in the
    gap until the other strategies' admissions have filled it: its reservation is then one
    admission more than the window allows, every time."""
    count = 20
    config = replace(
        STRATEGIES,
        broken=True,
        max_orders_per_interval=(count, 3600.0),  # one window over the whole run
        stop_after_breaches=1,
        min_admitted=0,
    )
    result, backend = _run(config, hold=count)

    assert result.breaches > 0 and not result.ok
    assert result.scopes[ACCOUNT]["breaches_by_limit"]["rate"] >= 1
    assert result.scopes[ACCOUNT]["max_window_seen"] > count
    assert result.breaches_by_cap["rate"] >= 1
    assert result.first_breach is not None
    assert_books_balance(result, backend)


def test_a_strategies_race_needs_the_gates_own_book_and_a_thread_each() -> None:
    """A budget is decided on the gate's own book; each strategy trades in a thread at least."""
    with pytest.raises(ValueError, match="book='gate'"):
        SimConfig(strategies=2)
    with pytest.raises(ValueError, match="threads"):
        SimConfig(strategies=4, threads=3, book="gate")
    with pytest.raises(ValueError, match="strategies"):
        SimConfig(strategies=-1)
    with pytest.raises(ValueError, match="release_first"):
        SimConfig(strategies=2, book="gate", release_first=True)
    assert SimConfig(strategies=1).budgets() == {}  # 0 or 1: trading for the account


def test_the_race_across_processes_refuses_strategies() -> None:
    """The race across processes trades for the account only: it says so before starting."""
    pytest.importorskip("redis")
    from pendingledger.sim.processes import ProcessRace

    with pytest.raises(ValueError, match="strategies=4"):
        ProcessRace(STRATEGIES, redis_url="redis://127.0.0.1:1/0", processes=2)
    with pytest.raises(ValueError, match="strategies"):
        Simulation(STRATEGIES, share=True)


def test_the_budgets_add_up_to_more_than_the_account_and_differ() -> None:
    """Shares of 2 / N of the account's figures, two thirds on a symbol, the order notional cap
    on every other strategy; no loss limits (they are the account's)."""
    budgets = STRATEGIES.budgets()
    assert tuple(budgets) == NAMES
    assert [STRATEGIES.strategy_of(i) for i in range(6)] == ["s1", "s2", "s3", "s4", "s1", "s2"]
    s1, s2 = budgets["s1"], budgets["s2"]
    assert s1.max_concurrent_positions == 3 and s1.max_gross_exposure == 25_000
    assert s1.max_symbol_exposure == 10_000 and s1.max_net_exposure == 15_000
    assert s1.max_order_notional == 6_000 and s2.max_order_notional is None
    assert s1.max_open_orders == 12 and s1.max_open_orders_per_symbol == 4
    assert s1.max_orders_per_interval == (20, 0.05)
    assert not any(b.has_loss_limits for b in budgets.values())


# ---------------------------------------------------------------- the broken gate, with events


def _pair(
    limits: PortfolioLimits,
    budgets: dict[str, PortfolioLimits],
    between: Callable[[], None],
    clock: ManualClock | None = None,
) -> tuple[BrokenGate, PortfolioGate]:
    broken = BrokenGate(
        PendingEntryLedger(60.0, clock=clock or ManualClock()), limits, budgets=budgets,
        between=between,
    )  # fmt: skip
    real = PortfolioGate(
        PendingEntryLedger(60.0, clock=clock or ManualClock()), limits, budgets=budgets
    )
    return broken, real


@dataclass
class _Case:
    budget: PortfolioLimits
    first: tuple[str, int]
    second: tuple[str, int]
    reason: DenyReason


_STRATEGY_CASES = {
    "open orders": _Case(PortfolioLimits(max_open_orders=1), ("AAA", 100), ("BBB", 100),
                         DenyReason.MAX_OPEN_ORDERS),
    "open orders on a symbol": _Case(PortfolioLimits(max_open_orders_per_symbol=1),
                                     ("AAA", 100), ("AAA", 100),
                                     DenyReason.MAX_OPEN_ORDERS_PER_SYMBOL),
    "rate": _Case(PortfolioLimits(max_orders_per_interval=(1, 10.0)), ("AAA", 100),
                  ("BBB", 100), DenyReason.MAX_ORDERS_PER_INTERVAL),
    "gross": _Case(PortfolioLimits(max_gross_exposure=1_000), ("AAA", 600), ("BBB", 600),
                   DenyReason.MAX_GROSS_EXPOSURE),
    "positions": _Case(PortfolioLimits(max_concurrent_positions=1), ("AAA", 100),
                       ("BBB", 100), DenyReason.MAX_CONCURRENT_POSITIONS),
}  # fmt: skip


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", list(_STRATEGY_CASES.values()), ids=list(_STRATEGY_CASES))
def test_two_orders_of_one_strategy_both_get_through_the_gap_past_its_budget(
    case: _Case,
    held_gap: Gap,
) -> None:
    """Within its budget alone each order fits; together they breach it. The account has room."""
    budgets = {"s1": case.budget, "s2": PortfolioLimits()}
    broken, real = _pair(PortfolioLimits(), budgets, held_gap[2])
    (sym_a, n_a), (sym_b, n_b) = case.first, case.second
    a, b = interleave(
        held_gap,
        lambda: broken.try_enter(sym_a, n_a, order_id="a", side=Side.BUY, strategy="s1"),
        lambda: broken.try_enter(sym_b, n_b, order_id="b", side=Side.BUY, strategy="s1"),
    )
    assert a and b
    reservation = a.reservation
    assert reservation is not None and reservation.strategy == "s1"
    assert broken.stats().scopes["s1"].outstanding == 2  # both the strategy's, in the ledger

    assert real.try_enter(sym_a, n_a, side=Side.BUY, strategy="s1")
    denied = real.try_enter(sym_b, n_b, side=Side.BUY, strategy="s1")
    assert (denied.reason, denied.scope) == (case.reason, "s1")
    assert real.try_enter(sym_b, n_b, side=Side.BUY, strategy="s2")  # another strategy's room


@pytest.mark.timeout(20)
def test_two_strategies_each_within_budget_breach_the_account_through_the_gap(
    held_gap: Gap,
) -> None:
    """The account's gross is the sum of its strategies': each fits its budget, together they
    pass the account's limit."""
    budgets = {"s1": PortfolioLimits(max_gross_exposure=800), "s2": PortfolioLimits()}
    limits = PortfolioLimits(max_gross_exposure=1_000)
    broken, real = _pair(limits, budgets, held_gap[2])
    a, b = interleave(
        held_gap,
        lambda: broken.try_enter("AAA", 600, side=Side.BUY, strategy="s1"),
        lambda: broken.try_enter("BBB", 600, side=Side.BUY, strategy="s2"),
    )
    assert a and b

    assert real.try_enter("AAA", 600, side=Side.BUY, strategy="s1")
    denied = real.try_enter("BBB", 600, side=Side.BUY, strategy="s2")
    assert denied.reason is DenyReason.MAX_GROSS_EXPOSURE


def test_a_strategy_without_a_budget_is_refused_and_reserves_nothing() -> None:
    """As ``PortfolioGate``: a typo must not trade without limits; bad budgets change nothing."""
    ledger = PendingEntryLedger(60.0, clock=ManualClock())
    gate = BrokenGate(ledger, PortfolioLimits(), budgets={"s1": PortfolioLimits()})
    for strategy in ("s9", "", 7):
        with pytest.raises(ValueError, match="strategy"):
            gate.try_enter("AAA", 10, strategy=strategy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="own book"):
        gate.try_enter("AAA", 10, {"AAA": 5}, strategy="s1")
    with pytest.raises(ValueError, match="loss limits"):
        BrokenGate(ledger, PortfolioLimits(), budgets={"s1": PortfolioLimits(max_daily_loss=5)})
    with pytest.raises(TypeError, match="budgets"):
        gate.budgets = {"s1": 5}  # type: ignore[dict-item]
    assert set(gate.budgets) == {"s1"}
    assert ledger.stats().reserved == 0
    gate.budgets = {"s2": PortfolioLimits(max_open_orders=1)}
    assert gate.try_enter("AAA", 10, strategy="s2")
    assert gate.try_enter("BBB", 10, strategy="s2").reason is DenyReason.MAX_OPEN_ORDERS


def _walk(
    broken: BrokenGate, real: PortfolioGate, clock: ManualClock, steps: int, seed: int
) -> list[tuple[Decision, Decision, str | None]]:
    """A seeded random walk of entries under strategies (and the account's own), with sides,
    fills that follow the reservation's strategy, positions of each strategy, releases, clock
    steps and state changes, on both gates; every pair of decisions made, with its strategy."""
    rng = random.Random(seed)
    held: list[str] = []
    pairs: list[tuple[Decision, Decision, str | None]] = []
    strategies: list[str | None] = ["s1", "s2", "s3", None]
    sides: list[Side | str | None] = [Side.BUY, Side.SELL, "buy", "sell", None]
    for step in range(steps):
        op = rng.random()
        if op < 0.6:
            symbol = rng.choice("ABCDE")
            notional = rng.randint(1, 30) * 100
            side = rng.choice(sides)
            strategy = rng.choice(strategies)
            oid = f"o{step}"
            want = real.try_enter(symbol, notional, order_id=oid, side=side, strategy=strategy)
            got = broken.try_enter(symbol, notional, order_id=oid, side=side, strategy=strategy)
            pairs.append((want, got, strategy))
            if want:
                held.append(oid)
        elif op < 0.7 and held:
            oid = held.pop(rng.randrange(len(held)))
            assert real.release_order(oid) == broken.release_order(oid)
        elif op < 0.8 and held:
            oid = held.pop(rng.randrange(len(held)))
            position = rng.randint(-40, 40) * 100
            assert real.confirm_fill(oid, position) == broken.confirm_fill(oid, position)
        elif op < 0.9:
            symbol = rng.choice("ABCDE")
            strategy = rng.choice(strategies)
            if rng.random() < 0.3:
                assert real.close_position(symbol, strategy=strategy) == broken.close_position(
                    symbol, strategy=strategy
                )
            else:
                position = rng.randint(-40, 40) * 100
                real.set_position(symbol, position, strategy=strategy)
                broken.set_position(symbol, position, strategy=strategy)
        elif op < 0.97:
            clock.advance(rng.choice((0.1, 0.25, 0.5)))
        else:
            change = rng.choice(["halt", "reduce_only", "resume", "resume", "resume"])
            getattr(real, change)()
            getattr(broken, change)()
    return pairs


_WALK_LIMITS = PortfolioLimits(
    max_concurrent_positions=4,
    max_gross_exposure=12_000,
    max_symbol_exposure=5_000,
    max_net_exposure=7_000,
    max_order_notional=2_800,
    max_open_orders=5,
    max_open_orders_per_symbol=3,
    max_orders_per_interval=(5, 1.0),
)
_WALK_BUDGETS = {
    "s1": PortfolioLimits(
        max_concurrent_positions=2, max_gross_exposure=6_000, max_symbol_exposure=4_000,
        max_net_exposure=4_000, max_open_orders=2, max_orders_per_interval=(2, 1.0),
    ),
    "s2": PortfolioLimits(
        max_gross_exposure=8_000, max_order_notional=2_000, max_open_orders_per_symbol=1,
    ),
    "s3": PortfolioLimits(),
}  # fmt: skip


def _walk_pair() -> tuple[BrokenGate, PortfolioGate, ManualClock]:
    clock = ManualClock()  # both ledgers read it: the rate windows see the same stamps
    broken, real = _pair(_WALK_LIMITS, _WALK_BUDGETS, lambda: None, clock)
    return broken, real, clock


@pytest.mark.timeout(60)
def test_sequentially_the_broken_gate_decides_every_step_as_the_real_one_with_budgets() -> None:
    """With nothing racing, the check-then-act gate's own figures at both scopes give the real
    gate's decisions, every one (so a race breach comes from the gap alone), every rule
    reached."""
    broken, real, clock = _walk_pair()
    pairs = _walk(broken, real, clock, 3_000, seed=13)
    for step, (want, got, _) in enumerate(pairs):
        assert (got.admitted, got.reason) == (want.admitted, want.reason), step
    seen = {want.reason for want, _, _ in pairs}
    assert seen >= set(DenyReason) - {
        DenyReason.BACKEND_UNAVAILABLE, DenyReason.BOOK_NOT_RESTORED, DenyReason.LOCK_TIMEOUT,
    }  # fmt: skip
    scopes = {want.scope for want, _, _ in pairs if not want}
    assert {"s1", "s2"} <= scopes


@pytest.mark.timeout(60)
def test_sequentially_both_gates_name_the_same_scope_for_every_denial() -> None:
    """A denial says whose limit it was: the strategy's budget, or the account's (None), also
    for an order made under a strategy; both scopes occur."""
    broken, real, clock = _walk_pair()
    pairs = _walk(broken, real, clock, 3_000, seed=13)
    for step, (want, got, _) in enumerate(pairs):
        assert got.scope == want.scope, (step, want, got)
    under_a_strategy = [want for want, _, strategy in pairs if not want and strategy is not None]
    assert {d.scope for d in under_a_strategy} >= {"s1", "s2", None}
    # the state is the account's: a halt denies at the account's scope
    assert all(d.scope is None for d in under_a_strategy if d.reason is DenyReason.HALTED)


# ------------------------------------------------------- the auditor, on synthetic histories


class _Stub:
    """A reservation as the auditor reads it: only its stamp matters."""

    def __init__(self, order_id: str, symbol: str, stamp: float, strategy: str | None) -> None:
        self.order_id = order_id
        self.symbol = symbol
        self.reserved_at = stamp
        self.expires_at = stamp + 60.0
        self.strategy = strategy
        self.side: Side | None = Side.BUY
        self.notional = 0
        self.initial_notional = 0
        self.active = True

    def release(self) -> bool:
        return False

    def reduce(self, amount: object) -> bool:
        return False


class _History:
    """Admissions, fills and rejects told to an auditor, as the simulation tells them."""

    def __init__(
        self, limits: PortfolioLimits, budgets: dict[str, PortfolioLimits] | None = None
    ) -> None:
        self.auditor = Auditor(limits, budgets)
        self.n = 0

    def admit(
        self,
        symbol: str,
        notional: int,
        *,
        strategy: str | None = None,
        side: Side = Side.BUY,
        stamp: float = 0.0,
        outcome: str = "fill",
    ) -> Order:
        self.n += 1
        oid = f"o{self.n}"
        order = Order(
            oid, symbol, notional, outcome, _Stub(oid, symbol, stamp, strategy), 0,
            side=side, strategy=strategy,
        )  # fmt: skip
        self.auditor.admit(order)
        return order

    def fill(self, order: Order, qty: int | None = None) -> None:
        qty = order.notional - order.filled if qty is None else qty
        self.auditor.fill(order, qty)
        order.filled += qty

    def scope(self, name: str = ACCOUNT) -> dict[str, Any]:
        scope = self.auditor.account if name == ACCOUNT else self.auditor.strategies[name]
        return scope.figures()


def test_the_auditor_catches_an_order_over_the_notional_cap_at_each_scope() -> None:
    """On the cap is no breach; over it at a strategy's budget or at the account's is."""
    h = _History(
        PortfolioLimits(max_order_notional=5_000),
        {"s1": PortfolioLimits(max_order_notional=3_000), "s2": PortfolioLimits()},
    )
    h.admit("AAA", 3_000, strategy="s1")  # on the cap: no breach
    h.admit("AAA", 5_000, strategy="s2")
    assert h.auditor.breaches == 0
    h.admit("BBB", 4_000, strategy="s1")
    assert h.scope("s1")["breaches_by_limit"]["order_notional"] == 1
    assert h.scope()["breaches"] == 0
    h.admit("BBB", 6_000, strategy="s2", outcome="lost")  # a lost order is still an order
    assert h.scope()["breaches_by_limit"]["order_notional"] == 1
    assert h.auditor.by_cap["order_notional"] == 2 and h.auditor.breaches == 2
    assert h.scope()["max_order_seen"] == 6_000


def test_the_auditor_catches_too_many_open_orders_in_all_and_on_a_symbol() -> None:
    """Open: admitted and not yet filled or rejected; a lost order is left out (its end is the
    gate's TTL, which the auditor cannot see)."""
    h = _History(
        PortfolioLimits(max_open_orders=3, max_open_orders_per_symbol=2),
        {"s1": PortfolioLimits(max_open_orders=2), "s2": PortfolioLimits()},
    )
    a = h.admit("AAA", 100, strategy="s1")
    h.admit("BBB", 100, strategy="s1")
    h.admit("LOST", 100, strategy="s1", outcome="lost")  # its end is the TTL: not counted
    assert h.auditor.breaches == 0
    h.admit("CCC", 100, strategy="s1")  # s1's third open order
    assert h.scope("s1")["breaches_by_limit"]["open_orders"] == 1
    h.fill(a)  # filled: no longer open
    h.auditor.reject(h.admit("DDD", 100, strategy="s2"))  # rejected right away
    assert h.scope()["breaches"] == 0
    h.admit("AAA", 100, strategy="s2")  # the account's third open order: on the cap
    assert h.scope()["breaches"] == 0
    h.admit("BBB", 100, strategy="s2")  # a fourth, and a second on BBB (on that cap)
    assert h.scope()["breaches_by_limit"]["open_orders"] == 1
    assert h.scope()["breaches_by_limit"]["symbol_orders"] == 0
    h.admit("BBB", 100, strategy="s2")  # a third on BBB
    assert h.scope()["breaches_by_limit"]["symbol_orders"] == 1
    assert h.scope()["max_symbol_orders_seen"] == 3
    assert h.scope()["max_open_orders_seen"] == 5
    assert h.scope("s2")["breaches"] == 0  # s2's budget has no caps


def test_the_auditor_catches_too_many_admissions_in_a_window_told_in_any_order() -> None:
    """(2, 1.0): the third admission within any 1 s window breaches, judged on the stamps."""
    h = _History(PortfolioLimits(max_orders_per_interval=(2, 1.0)))
    h.admit("AAA", 100, stamp=0.0)
    h.admit("AAA", 100, stamp=0.5)
    h.admit("AAA", 100, stamp=1.0)  # 0.0 is outside (0.0, 1.0]: as the rule reads it
    assert h.auditor.breaches == 0
    assert h.scope()["max_window_seen"] == 2
    h.admit("AAA", 100, stamp=0.9)  # told late: (-0.1, 0.9] and (0.0, 1.0] now hold 3
    assert h.scope()["breaches_by_limit"]["rate"] == 2  # 0.9's and 1.0's windows
    assert h.scope()["max_window_seen"] == 3
    h.admit("BBB", 100, stamp=5.0, outcome="lost")  # alone in its window
    assert h.auditor.by_cap["rate"] == 2


def test_the_auditor_checks_each_strategys_rate_apart_from_the_accounts() -> None:
    """A strategy's window counts its own admissions; the account's counts every one."""
    h = _History(
        PortfolioLimits(max_orders_per_interval=(3, 1.0)),
        {"s1": PortfolioLimits(max_orders_per_interval=(1, 1.0)), "s2": PortfolioLimits()},
    )
    h.admit("AAA", 100, strategy="s1", stamp=0.0)
    h.admit("AAA", 100, strategy="s2", stamp=0.1)
    h.admit("AAA", 100, strategy="s1", stamp=1.0)
    assert h.auditor.breaches == 0
    h.admit("AAA", 100, strategy="s1", stamp=1.5)  # s1's second in (0.5, 1.5]
    assert h.scope("s1")["breaches_by_limit"]["rate"] == 1
    assert h.scope()["breaches"] == 0  # the account's window (0.5, 1.5] holds 1.0 and 1.5
    h.admit("AAA", 100, strategy="s2", stamp=1.2)
    assert h.scope()["breaches"] == 0
    h.admit("AAA", 100, strategy="s2", stamp=1.3)  # now 1.0, 1.2, 1.3 and 1.5 in (0.5, 1.5]
    assert h.scope()["breaches_by_limit"]["rate"] == 1
    assert h.scope("s2")["breaches"] == 0


@pytest.mark.timeout(60)
def test_the_auditors_rate_is_the_one_rule_on_random_histories() -> None:
    """Admissions told in a random order: the auditor flags exactly those the rule denies
    when the history is replayed in stamp order (each admission against those before it)."""
    rng = random.Random(7)
    for trial in range(200):
        count = rng.randint(1, 4)
        seconds = rng.choice((0.5, 1.0, 2.5))
        limits = PortfolioLimits(max_orders_per_interval=(count, seconds))
        stamps = sorted(round(rng.uniform(0, 10), 1) for _ in range(rng.randint(1, 30)))
        h = _History(limits)
        order = list(range(len(stamps)))
        rng.shuffle(order)
        for i in order:
            h.admit("AAA", 100, stamp=stamps[i])
        unit = rules.unit_limits(limits)
        want = 0
        for i, now in enumerate(stamps):
            window = stamps[i - count] if i >= count else rules.NO_WINDOW
            code = rules.first_failing_rule(
                unit, rules.ACTIVE, 0, True, 0, 0, 0, 0, 0, 1, 0, 0, window, now
            )
            want += code == rules.MAX_ORDERS_PER_INTERVAL
        assert h.auditor.by_cap["rate"] == want, (trial, count, seconds, stamps)


def test_the_auditor_judges_each_strategys_exposure_and_the_accounts_sum() -> None:
    """A strategy's figures are its own orders' and positions'; the account's position on a
    symbol is the sum of its strategies' (a long and a short of two strategies offset)."""
    h = _History(
        PortfolioLimits(max_symbol_exposure=1_000, max_gross_exposure=3_000),
        {"s1": PortfolioLimits(max_gross_exposure=1_000), "s2": PortfolioLimits()},
    )
    h.admit("AAA", 600, strategy="s1")
    h.admit("BBB", 600, strategy="s1")  # s1's gross 1,200 > 1,000; the account is fine
    assert h.scope("s1")["breaches_by_limit"]["gross"] == 1
    assert h.scope()["breaches"] == 0
    long = h.admit("CCC", 1_000, strategy="s1", stamp=0.0)
    h.fill(long)
    short = h.admit("CCC", 1_000, strategy="s2", side=Side.SELL)
    h.fill(short)  # the account's position on CCC: +1,000 - 1,000 = 0
    assert h.auditor.account.books.get("CCC") is None
    assert h.scope()["breaches"] == 0
    h.admit("DDD", 600, strategy="s1")
    h.admit("DDD", 600, strategy="s2")  # each fits; the account's DDD is 1,200 > 1,000
    assert h.scope()["breaches_by_limit"]["symbol"] == 1
    assert h.scope("s2")["breaches"] == 0
    assert h.auditor.breaches == 4  # s1's gross thrice (BBB, CCC, DDD), the account's DDD


def test_closing_one_part_of_parts_that_net_to_nothing_is_counted_at_the_account() -> None:
    """Two strategies' parts that offset leave the account's book empty on the symbol; the
    final flattening then closes one part, which the account counts (a CI run found the
    auditor raising KeyError here, on a race where a long and a short had met)."""
    h = _History(PortfolioLimits(), {"s1": PortfolioLimits(), "s2": PortfolioLimits()})
    h.fill(h.admit("ETH", 4_600, strategy="s1"))
    h.fill(h.admit("ETH", 4_600, strategy="s2", side=Side.SELL))
    assert h.auditor.account.books.get("ETH") is None
    h.auditor.close("ETH", "s1")
    assert h.auditor.account.books["ETH"][0] == -4_600  # s2's short, the account's now
    h.auditor.close("ETH", "s2")
    assert h.auditor.account.books.get("ETH") is None
    assert h.auditor.breaches == 0
