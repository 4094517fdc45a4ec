"""The in-process gate's scopes: the account's positions as sums of their parts, the per-scope
totals kept through every change (``audit()`` against a model), ``lock()`` blocks that roll
back, per-scope stats, and a decision that reads the limits and budgets once.

The backend-neutral rules of budgets and order caps are in ``test_budget_conformance``.
"""

from __future__ import annotations

import random
import threading
from decimal import Decimal
from fractions import Fraction

import pytest

from pendingledger import (
    DenyReason,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Side,
    rules,
)
from pendingledger._units import SCALE
from pendingledger.protocols import ReservationHandle
from pendingledger.testing import ManualClock

WIDE = PortfolioLimits(max_gross_exposure=10**6)


def make(**budgets: PortfolioLimits) -> tuple[PortfolioGate, PendingEntryLedger, ManualClock]:
    clock = ManualClock()
    ledger = PendingEntryLedger(ttl=30.0, clock=clock)
    return PortfolioGate(ledger, WIDE, budgets=budgets), ledger, clock


def test_the_account_position_is_the_sum_of_its_parts() -> None:
    gate, ledger, _ = make(a=WIDE, b=WIDE)
    gate.set_position("X", 7, strategy="a")
    assert gate.positions() == {"X": 7}  # one part: as it was set
    gate.set_position("X", -2)
    gate.set_position("X", Decimal("1.5"), strategy="b")
    assert gate.positions() == {"X": Decimal("6.5")}  # a sum, in the kind of amounts given
    assert gate.positions(strategy="a") == {"X": 7}
    assert gate.positions(strategy="b") == {"X": Decimal("1.5")}
    assert gate.close_position("X", strategy="a")
    assert not gate.close_position("X", strategy="a")
    assert gate.positions() == {"X": Decimal("-0.5")}
    assert gate.close_position("X")
    assert gate.positions() == {"X": Decimal("1.5")}  # b's part alone, as it was set
    assert not gate.close_position("X")  # the account's own part is closed already
    assert gate.close_position("X", strategy="b")
    assert gate.positions() == {}
    assert ledger.audit() == []


def test_a_strategy_part_of_zero_still_holds_the_slot() -> None:
    gate, _, _ = make(a=PortfolioLimits(max_concurrent_positions=1))
    gate.set_position("X", 0, strategy="a")
    assert gate.positions() == {"X": 0}
    decision = gate.try_enter("Y", 1, strategy="a")
    assert decision.reason is DenyReason.MAX_CONCURRENT_POSITIONS and decision.scope == "a"
    assert gate.try_enter("X", 1, strategy="a")


def test_confirm_fill_sets_the_part_of_the_reservation_strategy() -> None:
    gate, ledger, _ = make(a=WIDE, b=WIDE)
    gate.set_position("X", 5)
    held = gate.try_enter("X", 10, order_id="o-1", strategy="a").reservation
    assert held is not None and held.strategy == "a"
    with pytest.raises(ValueError, match="strategy='b'"):
        gate.confirm_fill("o-1", 10, strategy="b")
    assert held.active and gate.positions(strategy="a") == {}  # nothing changed
    assert gate.confirm_fill("o-1", 10)
    assert gate.positions(strategy="a") == {"X": 10}
    assert gate.positions() == {"X": 15}
    # A late fill (the reservation ended) books the part of the strategy it names.
    assert not gate.confirm_fill("o-gone", 3, symbol="X", strategy="b")
    assert gate.positions() == {"X": 18}
    assert ledger.audit() == []


def test_a_strategy_reservation_made_in_a_lock_block_counts_in_its_budget() -> None:
    gate, ledger, _ = make(a=PortfolioLimits(max_open_orders=1))
    with ledger.lock() as pending:
        made = pending.reserve("X", 1, strategy="a")
    assert made.strategy == "a"
    decision = gate.try_enter("Y", 1, strategy="a")
    assert decision.reason is DenyReason.MAX_OPEN_ORDERS and decision.scope == "a"
    with pytest.raises(TypeError, match="strategy"), ledger.lock() as pending:
        pending.reserve("X", 1, strategy=3)


def test_a_lock_block_that_raises_puts_every_scope_back() -> None:
    gate, ledger, _ = make(a=PortfolioLimits(max_gross_exposure=100))
    kept = gate.try_enter("X", 40, order_id="kept", side=Side.BUY, strategy="a").reservation
    assert kept is not None
    before = (ledger.audit(), gate.stats().scopes["a"].outstanding)
    with pytest.raises(RuntimeError), ledger.lock() as pending:
        pending.reserve("X", 50, strategy="a", side="sell")
        kept.reduce(10)
        assert pending.release_order("kept")
        raise RuntimeError("undo it all")
    assert kept.active and kept.notional == 40
    assert (ledger.audit(), gate.stats().scopes["a"].outstanding) == before
    assert gate.try_enter("Y", 60, strategy="a")  # 40 + 60 lands on the budget: room as before
    assert gate.try_enter("Y", 1, strategy="a").scope == "a"


@pytest.mark.parametrize("seed", range(6))
def test_every_scope_total_survives_random_operations(seed: int) -> None:
    """Random decisions, fills, partial fills, releases, expiries, positions and rolled-back
    blocks over three strategies and the account; ``audit()`` recomputes every scope's totals
    from its reservations and book after each step, and the account's book is held to a model
    of its parts."""
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    gate, ledger, clock = make(**dict.fromkeys(names, WIDE))
    parts: dict[tuple[str, str], Fraction] = {}  # (strategy or "", symbol) -> exposure
    live: list[ReservationHandle] = []
    for step in range(400):
        strategy = rng.choice([*names, None])
        symbol = rng.choice("WXYZ")
        action = rng.randrange(8)
        if action <= 2:
            side = rng.choice([None, Side.BUY, Side.SELL])
            decision = gate.try_enter(symbol, rng.randint(1, 50), side=side, strategy=strategy)
            if decision.reservation is not None:
                live.append(decision.reservation)
        elif action == 3 and live:
            res = live.pop(rng.randrange(len(live)))
            filled_at = rng.randint(-90, 90)
            if gate.confirm_fill(res.order_id, filled_at, filled=rng.choice([None, 5])):
                parts[(res.strategy or "", res.symbol)] = Fraction(filled_at)
        elif action == 4 and live:
            live.pop(rng.randrange(len(live))).release()
        elif action == 5:
            amount = rng.choice([Fraction(0), Fraction(3), Fraction(-12), Fraction(1, 4)])
            gate.set_position(symbol, amount, strategy=strategy)
            parts[(strategy or "", symbol)] = amount
        elif action == 6:
            closed = gate.close_position(symbol, strategy=strategy)
            assert closed == ((strategy or "", symbol) in parts)
            parts.pop((strategy or "", symbol), None)
        else:
            clock.advance(rng.choice([0.5, 31.0]))
            with pytest.raises(KeyError), ledger.lock() as pending:
                pending.reserve(symbol, 5, strategy=strategy, side="buy")
                raise KeyError("rolled back")
        assert ledger.audit() == [], f"step {step}"
        account: dict[str, Fraction] = {}
        for (_, sym), part in parts.items():
            account[sym] = account.get(sym, Fraction(0)) + part
        got = {sym: Fraction(value) for sym, value in gate.positions().items()}
        assert got == account, f"step {step}"
        mine = {sym: Fraction(v) for sym, v in gate.positions(strategy="a").items()}
        assert mine == {sym: v for (who, sym), v in parts.items() if who == "a"}, f"step {step}"


def test_stats_count_each_scope_and_add_up() -> None:
    gate, _, _ = make(a=PortfolioLimits(max_order_notional=10), b=WIDE)
    assert gate.try_enter("X", 5, strategy="a")
    assert gate.try_enter("X", 50, strategy="a").reason is DenyReason.MAX_ORDER_NOTIONAL
    assert gate.try_enter("X", 50, strategy="b")
    assert gate.try_enter("X", 1)
    gate.halt()
    assert gate.try_enter("X", 1, strategy="b").scope is None  # the state is the account's
    stats = gate.stats()
    assert set(stats.scopes) == {"a", "b", None}
    a, b, own = stats.scopes["a"], stats.scopes["b"], stats.scopes[None]
    assert (a.admitted, a.denied[DenyReason.MAX_ORDER_NOTIONAL], a.outstanding) == (1, 1, 1)
    assert (b.admitted, b.denied[DenyReason.HALTED], b.outstanding) == (1, 1, 1)
    assert (own.admitted, own.decisions, own.outstanding) == (1, 1, 1)
    assert stats.admitted == a.admitted + b.admitted + own.admitted
    for reason in DenyReason:
        assert stats.denied[reason] == sum(s.denied[reason] for s in stats.scopes.values())


def test_a_timeout_counts_in_its_strategy() -> None:
    gate, ledger, _ = make(a=WIDE)
    inside, done = threading.Event(), threading.Event()

    def hold() -> None:
        with ledger.lock():
            inside.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        decision = gate.try_enter("X", 1, strategy="a", timeout=0)
        assert decision.reason is DenyReason.LOCK_TIMEOUT and decision.scope is None
    finally:
        done.set()
        holder.join(30)
    assert gate.stats().scopes["a"].denied[DenyReason.LOCK_TIMEOUT] == 1
    assert gate.stats().scopes[None].denied[DenyReason.LOCK_TIMEOUT] == 0


def test_a_decision_reads_the_limits_and_the_budgets_once() -> None:
    """The pair is replaced while a decision is under way (from the ledger's clock, which a
    decision reads after the limits and before the lock). Each pair alone denies an order of
    50; the old account limits with the new budget admit it (the rule function shows it
    below), so an admission here would be a mixed read: the catch is certain."""
    old = (PortfolioLimits(max_gross_exposure=100), PortfolioLimits(max_gross_exposure=10))
    new = (PortfolioLimits(max_gross_exposure=10), PortfolioLimits(max_gross_exposure=100))
    manual = ManualClock()
    swapped: list[bool] = []
    gate: PortfolioGate | None = None

    def clock() -> float:
        if gate is not None and not swapped:
            swapped.append(True)
            gate.limits, gate.budgets = new[0], {"a": new[1]}
        return manual()

    gate = PortfolioGate(PendingEntryLedger(30.0, clock=clock), old[0], budgets={"a": old[1]})
    decision = gate.try_enter("X", 50, strategy="a")
    assert swapped
    assert decision.reason is DenyReason.MAX_GROSS_EXPOSURE and decision.scope == "a"  # old
    assert gate.try_enter("X", 50, strategy="a").scope is None  # the new pair, whole
    figures = (0, False, 0, 0, 50 * SCALE, 0, 0, 50 * SCALE, 0, 0, rules.NO_WINDOW, 0.0)
    for mixed in (old[0], new[1]):
        assert rules.first_failing_rule(rules.unit_limits(mixed), rules.ACTIVE, *figures) == 0


def test_a_rate_limit_changed_counts_the_admissions_kept() -> None:
    """Lowered, the count applies at once to the admissions kept; raised, the admissions kept
    (the old count's worth, all a full window can hold) count toward the new one."""
    gate, ledger, clock = make()
    gate.limits = PortfolioLimits(max_orders_per_interval=(5, 10.0))
    for _ in range(4):
        assert gate.try_enter("X", 1)
    gate.limits = PortfolioLimits(max_orders_per_interval=(3, 10.0))
    assert gate.try_enter("X", 1).reason is DenyReason.MAX_ORDERS_PER_INTERVAL
    clock.advance(10.0)
    for _ in range(3):
        assert gate.try_enter("X", 1)
    gate.limits = PortfolioLimits(max_orders_per_interval=(5, 10.0))
    for _ in range(2):
        assert gate.try_enter("X", 1)
    assert gate.try_enter("X", 1).reason is DenyReason.MAX_ORDERS_PER_INTERVAL
    with ledger.lock() as pending:  # not a decision of the gate: not in its window
        pending.reserve("Y", 1)
    clock.advance(10.0)
    for _ in range(5):
        assert gate.try_enter("X", 1)
    assert gate.try_enter("X", 1).reason is DenyReason.MAX_ORDERS_PER_INTERVAL
