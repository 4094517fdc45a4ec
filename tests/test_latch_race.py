"""The latch race: no order is admitted after the call that latched the loss limit returned.

Many threads enter (every order raises a figure) while another records losses until the daily
loss latch fires; ``pendingledger.sim.latch`` says how an admission after the latch is told
apart, with the happens-before that proves it. Each broken variant is caught on an interleaving
the race drives with events, never by luck and never by a sleep.
"""

from __future__ import annotations

import pytest

from pendingledger import (
    Admitted,
    Decision,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Side,
    TradingState,
)
from pendingledger.limits import Number
from pendingledger.sim.latch import LatchRace, LatchRaceResult, memory_latch_race
from pendingledger.testing import ManualClock


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("fast_switching")
@pytest.mark.parametrize(
    ("on_loss", "reason"),
    [(TradingState.REDUCING, "reducing_only"), (TradingState.HALTED, "halted")],
)
def test_no_order_is_admitted_after_the_latching_call_returned(
    on_loss: TradingState, reason: str
) -> None:
    result = memory_latch_race(broken=False, threads=8, losses=5, on_loss=on_loss)

    assert result.latched and result.losses == 5
    assert result.latch_reason == "max_daily_loss" and result.latch_state == on_loss.value
    assert result.admitted_after == 0, result.first_breach
    assert result.admitted_before > 0  # the race admitted orders until the latch
    assert result.entered_after == 8 * 20
    assert result.denied_after == {reason: 8 * 20}
    assert result.ok


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("fast_switching")
def test_the_race_catches_a_gate_that_reads_the_latch_outside_its_critical_section() -> None:
    """BrokenGate reads the state before its check; the race holds a thread in the gap while
    the latch fires, and that thread's reservation lands after the count."""
    result = memory_latch_race(broken=True, threads=8, losses=5)

    assert result.latched
    assert result.admitted_after >= 1
    assert result.first_breach is not None and "after the latching" in result.first_breach
    assert not result.ok


class _LatchNeverRead:
    """A broken variant: it records losses and latches, but decides without the state (the
    latch is kept, and nothing reads it), so orders keep being admitted after it fired."""

    def __init__(self) -> None:
        self.ledger = PendingEntryLedger(3600.0, clock=ManualClock())
        self.book = PortfolioGate(self.ledger, PortfolioLimits(max_daily_loss=3))

    def __getattr__(self, name: str) -> object:
        return getattr(self.book, name)

    def try_enter(
        self,
        symbol: str,
        notional: Number,
        positions: None = None,
        *,
        order_id: str | None = None,
        side: Side | str | None = None,
    ) -> Decision:
        with self.ledger.lock() as pending:
            return Admitted(pending.reserve(symbol, notional, order_id=order_id))


@pytest.mark.timeout(60)
def test_the_race_catches_a_latch_that_decisions_never_read() -> None:
    """Decisions begun after the flag are admitted: caught by the flag read before try_enter,
    with the order named."""
    gate = _LatchNeverRead()
    race = LatchRace(name="never-read", threads=4, losses=3, decisions_after=5)
    result = race.run(gate, lambda: gate.ledger.stats().reserved)  # type: ignore[arg-type]

    assert result.latched and result.entered_after == 4 * 5
    assert result.admitted_after >= 4 * 5
    assert result.first_breach is not None and "begun after the latching" in result.first_breach
    assert result.denied_after == {}
    assert not result.ok


@pytest.mark.timeout(60)
def test_a_gate_that_never_latches_is_reported_as_not_latched() -> None:
    ledger = PendingEntryLedger(3600.0, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits())  # no loss limit: nothing to latch
    result = LatchRace(threads=2, losses=2, decisions_after=3).run(
        gate, lambda: ledger.stats().reserved
    )
    assert not result.latched and result.latch_reason is None
    assert result.losses == 2 and result.admitted_after == 0
    assert not result.ok


def test_the_result_is_json_ready() -> None:
    result = LatchRaceResult(
        gate="x", threads=1, decisions=2, loss_limit=1, losses=1, latched=True,
        latch_reason="max_daily_loss", latch_state="reducing", admitted_before=1,
        admitted_after=0, entered_after=1,
    )  # fmt: skip
    data = result.to_dict()
    assert data["ok"] is True and data["denied_after"] == {}


@pytest.mark.parametrize(
    "changes", [{"threads": 0}, {"losses": 0}, {"decisions_after": -1}, {"threads": True}]
)
def test_bad_race_options_are_refused(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(changes))):
        LatchRace(**changes)  # type: ignore[arg-type]


@pytest.mark.timeout(20)
def test_a_latch_race_runs_once() -> None:
    ledger = PendingEntryLedger(3600.0, clock=ManualClock())
    gate = PortfolioGate(ledger, PortfolioLimits(max_daily_loss=1))
    race = LatchRace(threads=1, losses=1, decisions_after=1)
    race.run(gate, lambda: ledger.stats().reserved)
    with pytest.raises(RuntimeError):
        race.run(gate, lambda: ledger.stats().reserved)
