"""The latch race: many threads entering while another records losses until the loss latch fires.

Why: the promise of the loss latch is that no order is admitted after the call that latched it
returns ("the kill switch fired but orders kept being created" is the bug it rules out). This
module races that promise, backend-neutrally, on any ``pendingledger.Gate`` whose limits set
``max_daily_loss``:

* ``threads`` **entering threads**, started together behind a barrier, each send orders on a
  symbol of its own, all on one side (thread ``i`` buys if ``i`` is even, sells if odd), so
  every order raises its symbol's worst case: in ``REDUCING`` or ``HALTED`` each must be denied.
* A **latcher** records ``losses`` losses of 1 (``record_pnl(-1)``) with ``max_daily_loss``
  equal to ``losses``, so the last call latches. Between two calls it waits (on a condition,
  not a clock) until the entering threads have made ``threads`` more decisions, so the calls
  land in the middle of the race.

What counts as an order admitted after the latch, with the happens-before that proves it:

1. **Reservations made after the latching call returned.** Right after that call returns the
   latcher counts the reservations the store holds (``reserved()``; the race ends none, so it
   counts every admission made so far). A correct gate decides and reserves in one critical
   section, and the latch fires in another: an admission missing from that count reserved
   after the latch, so it was decided after it. Any admission the race makes beyond the count
   is a breach. (An admission decided before the latch but not yet counted cannot exist: its
   reservation was in the store before the latching call began.)
2. **Decisions begun after the latch.** The latcher sets a flag after it counted; each
   entering thread reads the flag *before* calling ``try_enter``. A decision that read it set
   began after the latching call returned; each is counted (``entered_after``) and must be
   denied. Such an admission is also one of (1).

The entering threads stop once each has made ``decisions_after`` decisions begun after the
flag. Every wait is bounded; a thread that does not finish raises ``SimulationError``.

``hold_gap``: for a gate with a check-then-act gap that calls ``LatchRace.between`` there (the
broken gate, ``BrokenGate(between=race.between)``), the latcher makes its latching call only
once a thread is inside the gap, and that thread goes on only after the count: the
interleaving the bug needs, driven by events, so the catch is certain, not likely. A correct
gate has no gap to hold.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from pendingledger.gate import PortfolioGate
from pendingledger.ledger import PendingEntryLedger
from pendingledger.limits import DenyReason, PortfolioLimits
from pendingledger.protocols import Gate
from pendingledger.sim.app import SimulationError
from pendingledger.sim.broken import BrokenGate
from pendingledger.testing import ManualClock
from pendingledger.trading import Side, TradingState

__all__ = ["LatchRace", "LatchRaceResult", "memory_latch_race"]

_WAIT: Final = 30.0  # seconds any one wait of the race may take before it is called a hang
_TTL: Final = 3600.0  # the race ends no reservation, and its ManualClock never moves


@dataclass(frozen=True)
class LatchRaceResult:
    """The figures of one latch race (see the module docstring). ``ok``: the latch fired and
    no order was admitted after the latching call returned."""

    gate: str
    threads: int
    decisions: int
    loss_limit: int
    """``max_daily_loss``: the race records losses of 1 up to it."""
    losses: int
    """``record_pnl`` calls made until the latch fired (all of them if it never did)."""
    latched: bool
    latch_reason: str | None
    latch_state: str | None
    admitted_before: int
    """Reservations the store held right after the latching call returned."""
    admitted_after: int
    """Admissions beyond that count: each an order admitted after the latch (a breach)."""
    entered_after: int
    """Decisions begun after the latching call returned (each must be denied)."""
    denied_after: dict[str, int] = field(default_factory=dict)
    first_breach: str | None = None

    @property
    def ok(self) -> bool:
        return self.latched and self.admitted_after == 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


class LatchRace:
    """One latch race: ``run(gate, reserved)`` once (the gate's limits must set
    ``max_daily_loss`` to ``losses``). Made before the gate, so a broken gate can take
    ``between`` for its gap. ``name`` labels the result.
    """

    def __init__(
        self,
        *,
        name: str = "pendingledger",
        threads: int = 8,
        losses: int = 5,
        decisions_after: int = 20,
        hold_gap: bool = False,
    ) -> None:
        for what, value, low in (("threads", threads, 1), ("losses", losses, 1),
                                 ("decisions_after", decisions_after, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
        self._name = name
        self._threads = threads
        self._losses = losses
        self._after = decisions_after
        self._hold_gap = hold_gap
        self._flag = threading.Event()  # set once the latching call returned and was counted
        self._stop = threading.Event()
        self._in_gap = threading.Event()
        self._counted = threading.Event()
        self._gaps = itertools.count()
        self._progress = threading.Condition()
        self._decisions = 0
        self._entered_after = 0
        self._denied_after: dict[str, int] = {}
        self._admitted = 0
        self._first_breach: str | None = None
        self._errors: list[BaseException] = []
        self._used = False
        self._gate: Gate | None = None
        self._reserved: Callable[[], int] = int

    def between(self) -> None:
        """The broken gate's gap (pass it as ``BrokenGate(between=...)``): the first thread in
        it waits there until the latching call returned and was counted."""
        if next(self._gaps) == 0:
            self._in_gap.set()
            if not self._counted.wait(_WAIT):
                raise SimulationError("the latching call never came while a gap was held open")

    def run(self, gate: Gate, reserved: Callable[[], int]) -> LatchRaceResult:
        """Race ``gate``; ``reserved`` returns how many reservations its store has made so far
        (the race ends none: an outstanding count does)."""
        if self._used:
            raise RuntimeError("a LatchRace runs once; make a new one")
        self._used = True
        self._gate = gate
        self._reserved = reserved
        barrier = threading.Barrier(self._threads + 1)
        workers = [
            threading.Thread(target=self._guard, args=(self._enter, i, barrier),
                             name=f"latch-race-{i}", daemon=True)
            for i in range(self._threads)
        ]  # fmt: skip
        for worker in workers:
            worker.start()
        losses = 0
        counted: int | None = None
        try:
            barrier.wait(_WAIT)
            losses, counted = self._latch()
        except BaseException:
            self._stop.set()
            barrier.abort()
            raise
        finally:
            self._flag.set()
            self._counted.set()
            for worker in workers:
                worker.join(_WAIT)
        if any(worker.is_alive() for worker in workers):
            self._stop.set()
            raise SimulationError("a latch race thread did not finish (deadlock in the gate?)")
        if self._errors:
            raise SimulationError(f"a latch race thread raised {self._errors[0]!r}") from (
                self._errors[0]
            )
        latch = gate.latch
        before = counted if counted is not None else self._admitted
        after = 0 if counted is None else max(0, self._reserved() - counted)
        first = self._first_breach
        if after and first is None:
            first = f"{after} reservation(s) made after the latching record_pnl returned"
        return LatchRaceResult(
            gate=self._name,
            threads=self._threads,
            decisions=self._decisions,
            loss_limit=self._losses,
            losses=losses,
            latched=counted is not None,
            latch_reason=None if latch is None else latch.reason,
            latch_state=None if latch is None else latch.state.value,
            admitted_before=before,
            admitted_after=after,
            entered_after=self._entered_after,
            denied_after=dict(self._denied_after),
            first_breach=first,
        )

    # ---------------------------------------------------------------- the threads

    def _guard(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except BaseException as exc:
            with self._progress:
                self._errors.append(exc)
                self._progress.notify_all()
            self._stop.set()

    def _latch(self) -> tuple[int, int | None]:
        """Record losses until the latch fires; ``(calls made, reservations counted right
        after the latching call returned)`` (None if it never fired)."""
        gate = self._gate
        assert gate is not None
        for call in range(1, self._losses + 1):
            if not self._wait_for_decisions(call * self._threads):
                raise SimulationError("the entering threads stopped making decisions")
            if call == self._losses and self._hold_gap and not self._in_gap.wait(_WAIT):
                raise SimulationError("no entering thread reached the gate's gap")
            gate.record_pnl(-1)
            if gate.latch is not None:
                counted = self._reserved()  # after the latching call returned
                self._flag.set()
                self._counted.set()
                return call, counted
        return self._losses, None

    def _wait_for_decisions(self, count: int) -> bool:
        """Until the entering threads made ``count`` decisions in all (False: they stopped)."""
        with self._progress:
            self._progress.wait_for(lambda: self._decisions >= count or self._errors, _WAIT)
            return self._decisions >= count and not self._errors

    def _enter(self, index: int, barrier: threading.Barrier) -> None:
        gate = self._gate
        assert gate is not None
        symbol = f"L{index}"
        side = Side.BUY if index % 2 == 0 else Side.SELL
        after_flag = 0
        barrier.wait(_WAIT)
        for n in itertools.count():
            if self._stop.is_set() or after_flag >= self._after:
                return
            late = self._flag.is_set()  # read before try_enter: happens-before the decision
            order_id = f"L{index}-{n}"
            decision = gate.try_enter(symbol, 100, order_id=order_id, side=side)
            with self._progress:
                self._decisions += 1
                if decision:
                    self._admitted += 1
                if late:
                    self._entered_after += 1
                    if decision:
                        if self._first_breach is None:
                            self._first_breach = (
                                f"{order_id} ({symbol} {side.value} 100) admitted in a decision "
                                "begun after the latching record_pnl returned"
                            )
                    else:
                        reason = (decision.reason or DenyReason.HALTED).value
                        self._denied_after[reason] = self._denied_after.get(reason, 0) + 1
                self._progress.notify_all()
            if late:
                after_flag += 1


def memory_latch_race(
    *,
    broken: bool,
    threads: int = 8,
    losses: int = 5,
    decisions_after: int = 20,
    on_loss: TradingState = TradingState.REDUCING,
) -> LatchRaceResult:
    """The latch race in process: ``PortfolioGate`` (or ``BrokenGate`` on it, its gap held
    open) on a fresh ledger whose TTL outlasts the race, ``max_daily_loss=losses``."""
    ledger = PendingEntryLedger(_TTL, clock=ManualClock())
    limits = PortfolioLimits(max_daily_loss=losses)
    book = PortfolioGate(ledger, limits, on_loss=on_loss)
    race = LatchRace(
        name="broken" if broken else "pendingledger", threads=threads, losses=losses,
        decisions_after=decisions_after, hold_gap=broken,
    )  # fmt: skip
    gate: Gate = BrokenGate(ledger, limits, book=book, between=race.between) if broken else book
    return race.run(gate, lambda: ledger.stats().reserved)
