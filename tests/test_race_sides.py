"""The race with both sides: longs, shorts and reducing orders, worst-case figures, the net limit.

The simulated app buys and sells from flat and sends orders that reduce the position it holds,
all with ``side=`` given; its auditor measures the worst cases (``rules.worst_case``) of the
true state. The real gate must never let a figure over its limit; the check-then-act gate
must, and the interleavings that prove it are driven with events here (the race itself only
makes them likely, so the race test for the broken gate stops at its first breaches).
"""

from __future__ import annotations

import random
from dataclasses import replace
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
    TradingState,
)
from pendingledger.sim import BrokenGate, MemoryBackend, SimConfig, SimResult, Simulation
from pendingledger.testing import ManualClock

# Every limit binds, the net one too (below the gross limit, so longs and shorts must offset).
SIDES = SimConfig(
    seconds=1.5,
    threads=64,
    seed=20261202,
    max_positions=4,
    max_gross=30_000,
    max_symbol=9_000,
    max_net=12_000,
    think=(0.0, 0.0),
    ttl=1.0,
    outcome_weights=(0.15, 0.40, 0.35, 0.10),
    min_admitted=300,
)


def _run(config: SimConfig) -> tuple[SimResult, MemoryBackend]:
    made: list[MemoryBackend] = []

    def backend(**kwargs: Any) -> MemoryBackend:
        made.append(MemoryBackend(**kwargs))
        return made[-1]

    result = Simulation(config, backend=backend, clock=ManualClock()).run()
    return result, made[0]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("fast_switching")
@pytest.mark.parametrize("book", ["cache", "gate"])
def test_both_sides_and_reducing_orders_never_breach_any_limit(book: str) -> None:
    config = replace(SIDES, book=book)  # type: ignore[arg-type]
    result, backend = _run(config)

    assert result.breaches == 0, result.first_breach
    assert result.breaches_by_limit == {"positions": 0, "gross": 0, "symbol": 0, "net": 0}
    assert result.max_positions_seen <= 4
    assert result.max_gross_seen <= 30_000
    assert result.max_symbol_seen <= 9_000
    assert result.max_net_seen <= 12_000
    # Both sides were traded, positions went long and short, and reducing orders got in.
    assert result.admitted_buys > 0 and result.admitted_sells > 0
    assert result.longs_opened > 0 and result.shorts_opened > 0
    assert result.reducing_admitted > 0
    for reason in ("max_concurrent_positions", "max_gross_exposure", "max_net_exposure"):
        assert result.denied[reason] > 0, reason
    assert result.late_answers == 0
    assert_books_balance(result, backend)
    assert result.ok


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("fast_switching")
def test_the_harness_catches_the_broken_gate_with_both_sides_traded() -> None:
    result, backend = _run(replace(SIDES, broken=True, stop_after_breaches=25))

    assert result.breaches > 0 and not result.ok
    assert result.first_breach is not None
    assert result.admitted_buys > 0 and result.admitted_sells > 0
    assert_books_balance(result, backend)


# ---------------------------------------------------------------- the bug, driven with events


@pytest.mark.timeout(20)
def test_two_reducing_sells_that_together_flip_past_the_limit_both_get_through_the_gap(
    held_gap: Gap,
) -> None:
    """Long 10,000, symbol limit 12,000: a sell of 13,000 alone only flips to -3,000 (the worst
    case stays 10,000); with a sell of 10,000 beside it the worst case is 13,000."""
    limits = PortfolioLimits(max_symbol_exposure=12_000)
    gate = BrokenGate(PendingEntryLedger(60.0, clock=ManualClock()), limits, between=held_gap[2])
    gate.set_position("AAA", 10_000)
    a, b = interleave(
        held_gap,
        lambda: gate.try_enter("AAA", 13_000, order_id="a", side=Side.SELL),
        lambda: gate.try_enter("AAA", 10_000, order_id="b", side="sell"),
    )
    assert a and b  # both admitted: a worst case of 13,000 > 12,000

    real = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    real.set_position("AAA", 10_000)
    assert real.try_enter("AAA", 13_000, side=Side.SELL)
    assert real.try_enter("AAA", 10_000, side=Side.SELL).reason is DenyReason.MAX_SYMBOL_EXPOSURE


@pytest.mark.timeout(20)
def test_two_buys_past_the_net_limit_both_get_through_the_gap(
    held_gap: Gap,
) -> None:
    limits = PortfolioLimits(max_net_exposure=1_000)
    gate = BrokenGate(PendingEntryLedger(60.0, clock=ManualClock()), limits, between=held_gap[2])
    a, b = interleave(
        held_gap,
        lambda: gate.try_enter("AAA", 600, side=Side.BUY),
        lambda: gate.try_enter("BBB", 600, side=Side.BUY),
    )
    assert a and b  # net 1,200 > 1,000

    real = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    assert real.try_enter("AAA", 600, side=Side.BUY)
    assert real.try_enter("BBB", 600, side=Side.BUY).reason is DenyReason.MAX_NET_EXPOSURE
    assert real.try_enter("BBB", 600, side=Side.SELL)  # a short beside the long lowers the net


@pytest.mark.timeout(20)
def test_a_halt_in_the_gap_does_not_stop_the_broken_gate(
    held_gap: Gap,
) -> None:
    """The broken gate reads the trading state before its lock: a halt that lands between its
    check and its reservation is not seen."""
    gate = BrokenGate(
        PendingEntryLedger(60.0, clock=ManualClock()), PortfolioLimits(), between=held_gap[2]
    )

    def halt_then_enter() -> Decision:
        gate.halt()
        return gate.try_enter("BBB", 100)

    a, after_halt = interleave(
        held_gap, lambda: gate.try_enter("AAA", 100, side=Side.BUY), halt_then_enter
    )
    assert after_halt.reason is DenyReason.HALTED
    assert a  # admitted, though the halt() returned before it reserved
    assert gate.state is TradingState.HALTED


# ---------------------------------------------------------------- the broken gate's figures


@pytest.mark.timeout(60)
def test_sequentially_the_broken_gate_decides_every_step_as_the_real_one() -> None:
    """A seeded random walk of entries with sides, signed positions, releases, fills and state
    changes: with nothing racing, the check-then-act gate's own figures give the real gate's
    decisions, every one (so a race breach comes from the gap alone)."""
    limits = PortfolioLimits(
        max_concurrent_positions=3,
        max_gross_exposure=9_000,
        max_symbol_exposure=4_000,
        max_net_exposure=5_000,
    )
    real = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    broken = BrokenGate(PendingEntryLedger(60.0, clock=ManualClock()), limits, between=lambda: None)
    rng = random.Random(12)
    held: list[str] = []
    seen: set[DenyReason | None] = set()
    sides: list[Side | str | None] = [Side.BUY, Side.SELL, "buy", "sell", None]
    for step in range(2_000):
        op = rng.random()
        if op < 0.6:
            symbol = rng.choice("ABCDE")
            notional = rng.randint(1, 30) * 100
            side = rng.choice(sides)
            oid = f"o{step}"
            want = real.try_enter(symbol, notional, order_id=oid, side=side)
            got = broken.try_enter(symbol, notional, order_id=oid, side=side)
            assert (got.admitted, got.reason) == (want.admitted, want.reason), step
            seen.add(want.reason)
            if want:
                held.append(oid)
        elif op < 0.75 and held:
            oid = held.pop(rng.randrange(len(held)))
            assert real.release_order(oid) == broken.release_order(oid)
        elif op < 0.85 and held:
            oid = held.pop(rng.randrange(len(held)))
            position = rng.randint(-40, 40) * 100
            assert real.confirm_fill(oid, position) == broken.confirm_fill(oid, position)
        elif op < 0.95:
            symbol = rng.choice("ABCDE")
            if rng.random() < 0.3:
                assert real.close_position(symbol) == broken.close_position(symbol)
            else:
                position = rng.randint(-40, 40) * 100
                real.set_position(symbol, position)
                broken.set_position(symbol, position)
        else:
            change = rng.choice(["halt", "reduce_only", "resume", "resume"])
            getattr(real, change)()
            getattr(broken, change)()
            assert real.state is broken.state
    assert seen == {
        None,
        DenyReason.HALTED,
        DenyReason.REDUCING_ONLY,
        DenyReason.MAX_CONCURRENT_POSITIONS,
        DenyReason.MAX_GROSS_EXPOSURE,
        DenyReason.MAX_SYMBOL_EXPOSURE,
        DenyReason.MAX_NET_EXPOSURE,
    }


def test_the_broken_gate_passes_states_and_the_latch_on_to_its_book() -> None:
    gate = BrokenGate(
        PendingEntryLedger(60.0, clock=ManualClock()), PortfolioLimits(max_daily_loss=50)
    )

    def state() -> TradingState:  # read afresh (mypy would keep a narrowed property)
        return gate.state

    assert state() is TradingState.ACTIVE and gate.stats().latch is None
    gate.reduce_only()
    assert state() is TradingState.REDUCING
    assert gate.try_enter("AAA", 10, side=Side.BUY).reason is DenyReason.REDUCING_ONLY
    gate.resume()
    gate.set_equity(1_000)
    gate.record_pnl(-50)
    latch = gate.latch
    assert latch is not None and latch.reason == "max_daily_loss"
    assert state() is TradingState.REDUCING and gate.stats().latch == latch
    gate.resume()
    assert state() is TradingState.ACTIVE and gate.latch is None


@pytest.mark.parametrize(
    ("side", "error"), [("long", ValueError), (1, TypeError), ("", ValueError)]
)
def test_a_bad_side_is_refused_naming_it_and_reserves_nothing(side: object, error: type) -> None:
    ledger = PendingEntryLedger(60.0, clock=ManualClock())
    gate = BrokenGate(ledger, PortfolioLimits())
    with pytest.raises(error, match="side"):
        gate.try_enter("AAA", 10, side=side)  # type: ignore[arg-type]
    assert ledger.stats().reserved == 0


def test_a_fill_counted_twice_lets_a_sell_raise_the_true_net_past_its_limit() -> None:
    """Why the simulation's router hands a fill over in one step (the cache and the release
    under the lock the gate's positions read takes; confirm_fill on the gate's book): with
    sides, a fill seen both in the position and still reserved is not the safe direction.
    The buy counted twice inflates the buy side of the net; a sell judged against that raises
    nothing there, yet once the reservation ends the true net is the sell side, past the limit.
    """
    limits = PortfolioLimits(max_net_exposure=1_000)
    gate = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    cache: dict[str, int] = {}
    buy = gate.try_enter("AAA", 1_000, cache, side=Side.BUY).reservation
    assert buy is not None
    cache["AAA"] = 1_000  # the fill is in the cache, the reservation not yet released
    assert gate.try_enter("BBB", 2_500, cache, side=Side.SELL)  # net 2,000 before and after
    buy.release()
    # The true book: long 1,000, a sell of 2,500 pending: worst case 1,500 > 1,000.

    handed_over = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    cache = {}
    buy = handed_over.try_enter("AAA", 1_000, cache, side=Side.BUY).reservation
    assert buy is not None
    cache["AAA"] = 1_000
    buy.release()  # in one step with the cache change, as the router does
    sell = handed_over.try_enter("BBB", 2_500, cache, side=Side.SELL)
    assert sell.reason is DenyReason.MAX_NET_EXPOSURE
