"""The simulation harness itself: configuration, seeding, results, and that it never hangs or leaks.

The race assertions live in ``test_stress.py``; these tests pin what callers of
``pendingledger.sim`` may rely on.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest

from pendingledger import Decision, Denied, DenyReason, Side
from pendingledger import sim as simmod
from pendingledger.sim import (
    MemoryBackend,
    SimConfig,
    SimResult,
    Simulation,
    SimulationError,
    run_simulation,
)
from pendingledger.testing import ManualClock

SMALL = SimConfig(seconds=0.5, threads=8, seed=3, ttl=1.0)


def _sim_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sim-")]


class _ScriptedBackend:
    """A backend around any gate object, to drive the simulation with gates that misbehave."""

    name = "scripted"

    def __init__(self, gate: Any) -> None:
        self._gate = gate

    @property
    def gate(self) -> Any:
        return self._gate

    def sweep(self) -> None:
        pass

    def outstanding(self) -> tuple[int, float]:
        return 0, 0.0

    def close(self) -> None:
        pass


def _backend_of(gate: Any) -> Callable[..., _ScriptedBackend]:
    def factory(**_: Any) -> _ScriptedBackend:
        return _ScriptedBackend(gate)

    return factory


class _DenyAll:
    """Records every entry a brain asks for and denies it."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, str | None, Side | str | None]] = []
        self._lock = threading.Lock()

    def try_enter(
        self,
        symbol: str,
        notional: int,
        positions: Callable[[], Mapping[str, int]],
        *,
        order_id: str | None = None,
        side: Side | str | None = None,
    ) -> Decision:
        positions()
        with self._lock:
            self.asked.append((symbol, notional, order_id, side))
        return Denied(DenyReason.MAX_GROSS_EXPOSURE)


@pytest.mark.parametrize(
    "changes",
    [
        {"seconds": 0},
        {"seconds": -1.0},
        {"seconds": float("nan")},
        {"threads": 0},
        {"threads": -4},
        {"threads": True},
        {"exchange_threads": 0},
        {"symbols": ()},
        {"symbols": ("A", "A")},
        {"notional": (50, 1000)},
        {"notional": (2000, 1000)},
        {"outcome_weights": (0.0, 0.0, 0.0, 0.0)},
        {"outcome_weights": (1.0, -1.0, 0.0, 0.0)},
        {"latency": (0.01, 0.001)},
        {"hold": (-1.0, 1.0)},
        {"ttl": 0.0},
        {"ttl": float("inf")},
        {"duplicate_rate": 1.5},
        {"max_decisions": 0},
        {"stop_after_breaches": -1},
        {"max_positions": -1},
        {"max_gross": float("nan")},
        {"max_symbol": -5},
        {"book": "ledger"},
        {"min_admitted": -1},
        {"max_net": -1},
        {"max_net": float("inf")},
        {"sell_share": 1.5},
        {"sell_share": "half"},
        {"reduce_share": -0.1},
    ],
)
def test_bad_config_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        replace(SimConfig(), **changes)


def test_limits_come_from_the_config() -> None:
    limits = SimConfig(max_positions=None, max_gross=10_000, max_symbol=None).limits()
    assert limits.max_concurrent_positions is None
    assert limits.max_gross_exposure == 10_000
    assert limits.max_symbol_exposure is None
    assert limits.max_net_exposure == SimConfig().max_net == 30_000
    assert SimConfig(max_net=None).limits().max_net_exposure is None


@pytest.mark.timeout(20)
def test_a_run_returns_figures_that_add_up_and_leaves_no_thread() -> None:
    result = run_simulation(SMALL, clock=ManualClock())

    assert isinstance(result, SimResult)
    assert result.gate == "pendingledger" and result.backend == "memory"
    assert result.decisions == result.admitted + sum(result.denied.values())
    assert result.admitted > 0
    answered = result.rejected + result.filled + result.partially_filled
    assert answered + result.lost == result.admitted
    assert result.ok
    assert not result.interrupted
    assert _sim_threads() == []


@pytest.mark.timeout(20)
def test_to_dict_is_json_ready_and_names_every_figure() -> None:
    result = run_simulation(replace(SMALL, seconds=0.2), clock=ManualClock())
    data = json.loads(json.dumps(result.to_dict()))

    for key in ("decisions", "admitted", "breaches", "denied", "breaches_by_limit", "ok"):
        assert key in data
    assert set(SimResult.field_names()) <= set(data)
    assert data["ok"] is True


@pytest.mark.timeout(20)
def test_each_brain_replays_the_same_wishes_for_the_same_seed() -> None:
    """Seeded: brain i draws from Random(seed + i), so a seed replays each brain's order flow.

    How far each brain gets depends on scheduling, so runs are compared brain by brain over
    the prefix both runs reached.
    """

    def wishes(seed: int) -> dict[str, list[tuple[str, int, Side | str | None]]]:
        gate = _DenyAll()
        config = SimConfig(seconds=0.3, threads=3, seed=seed, think=(0.0005, 0.001))
        Simulation(config, backend=_backend_of(gate)).run()
        numbered: dict[str, list[tuple[int, str, int, Side | str | None]]] = {}
        for symbol, notional, order_id, side in gate.asked:
            brain, n = str(order_id).split("-")
            numbered.setdefault(brain, []).append((int(n), symbol, notional, side))
        return {b: [(s, n, d) for _, s, n, d in sorted(ws)] for b, ws in numbered.items()}

    first, again, other = wishes(11), wishes(11), wishes(12)
    assert set(first) == set(again) == {"b0", "b1", "b2"}
    for brain in first:
        common = min(len(first[brain]), len(again[brain]), len(other[brain]))
        assert common >= 10
        assert first[brain][:common] == again[brain][:common]
        assert first[brain][:common] != other[brain][:common]
    assert all(1_000 <= n <= 8_000 and n % 100 == 0 for ws in first.values() for _, n, _ in ws)
    # Every order says its side, and both are traded (nothing is held, so none reduces).
    sides = {d for ws in first.values() for _, _, d in ws}
    assert sides == {Side.BUY, Side.SELL}


# The races below are given ten minutes; the test's timeout is what fails if they run it out
# instead of ending early (no wall-clock assertion).
_LONG = 600.0


@pytest.mark.timeout(20)
def test_max_decisions_and_stop_after_breaches_end_the_race_early() -> None:
    result = run_simulation(replace(SMALL, seconds=_LONG, max_decisions=200), clock=ManualClock())
    assert 200 <= result.decisions < 200 + SMALL.threads
    assert not result.interrupted

    caught = run_simulation(
        replace(SMALL, seconds=_LONG, threads=32, broken=True, stop_after_breaches=1, think=(0, 0)),
        clock=ManualClock(),
    )
    assert caught.breaches >= 1


@pytest.mark.timeout(20)
def test_stop_from_another_thread_drains_and_returns() -> None:
    simulation = Simulation(replace(SMALL, seconds=_LONG), clock=ManualClock())
    timer = threading.Timer(0.3, simulation.stop)
    timer.start()
    try:
        result = simulation.run()
    finally:
        timer.cancel()
    assert result.interrupted
    assert result.ok
    assert _sim_threads() == []


@pytest.mark.timeout(20)
def test_progress_is_reported_while_racing() -> None:
    seen: list[simmod.Progress] = []
    run_simulation(replace(SMALL, seconds=0.4), clock=ManualClock(), on_progress=seen.append)
    assert seen
    assert all(0 <= p.elapsed <= p.seconds == 0.4 for p in seen)
    assert seen[-1].decisions >= seen[0].decisions


@pytest.mark.timeout(20)
@pytest.mark.parametrize("nth", [1, 3, 6])
def test_ctrl_c_while_its_threads_start_propagates_and_leaves_no_thread(
    nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C landing in ``Thread.start()`` (raised here as the ``nth`` simulation thread is
    started) leaves that thread listed but never started. The shutdown joined it, and
    ``RuntimeError: cannot join thread before it is started`` replaced the KeyboardInterrupt
    (seen failing so for each ``nth``): ``race`` printed a traceback instead of exiting 130."""
    real_start = threading.Thread.start
    starts = itertools.count(1)

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("sim-") and next(starts) == nth:
            raise KeyboardInterrupt
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        Simulation(SMALL).run()
    monkeypatch.undo()
    assert _sim_threads() == []


@pytest.mark.timeout(20)
def test_a_gate_that_raises_fails_the_run_with_its_exception_and_no_thread_left() -> None:
    class Exploding:
        def try_enter(self, *args: Any, **kwargs: Any) -> Decision:
            raise ZeroDivisionError("gate bug")

    with pytest.raises(SimulationError, match="gate bug") as info:
        Simulation(SMALL, backend=_backend_of(Exploding())).run()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert _sim_threads() == []


@pytest.mark.timeout(20)
def test_a_gate_that_hangs_is_reported_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bounded in time: a deadlocked gate turns into SimulationError, not a hung test."""
    monkeypatch.setattr(simmod.app, "_JOIN_TIMEOUT", 0.5)
    release = threading.Event()

    class Hanging:
        def try_enter(self, *args: Any, **kwargs: Any) -> Decision:
            release.wait(15)
            return Denied(DenyReason.HALTED)

    try:
        with pytest.raises(SimulationError, match="deadlock"):
            Simulation(replace(SMALL, seconds=0.1), backend=_backend_of(Hanging())).run()
    finally:
        release.set()
    for thread in _sim_threads():
        thread.join(5)
    assert _sim_threads() == []


@pytest.mark.timeout(20)
def test_a_store_on_its_own_clock_is_swept_until_its_lost_orders_are_gone() -> None:
    """server_clock backends (a shared store's time) are waited for, boundedly, at the drain."""
    sweeps: list[int] = []

    class ServerClock(MemoryBackend):
        server_clock = True

        def sweep(self) -> None:
            sweeps.append(1)
            if len(sweeps) == 3:  # the "server" expires them on the third look
                self.ledger.clock.advance(60.0)  # type: ignore[attr-defined]
            super().sweep()

    config = replace(SMALL, outcome_weights=(0.0, 0.0, 0.0, 1.0), seconds=0.2)  # all lost
    clock = ManualClock()

    def factory(**kwargs: Any) -> ServerClock:
        return ServerClock(**{**kwargs, "clock": clock})

    # A plain function as the clock, so the simulation neither drives nor jumps it.
    result = Simulation(config, backend=factory, clock=lambda: 0.0).run()
    assert result.lost == result.admitted > 0
    assert result.ok and result.expired == result.lost
    assert len(sweeps) >= 3


def test_book_mode_needs_a_gate_that_keeps_a_book() -> None:
    with pytest.raises(TypeError, match="position book"):
        Simulation(replace(SMALL, book="gate"), backend=_backend_of(_DenyAll())).run()
    assert _sim_threads() == []


@pytest.mark.timeout(20)
def test_a_simulation_runs_once() -> None:
    simulation = Simulation(replace(SMALL, seconds=0.1), clock=ManualClock())
    simulation.run()
    with pytest.raises(RuntimeError):
        simulation.run()


@pytest.mark.timeout(20)
def test_the_memory_backend_builds_the_real_gate_or_the_broken_one() -> None:
    from pendingledger import PortfolioGate

    def build(broken: bool) -> MemoryBackend:
        return MemoryBackend(
            limits=SMALL.limits(),
            ttl=1.0,
            clock=ManualClock(),
            on_expire=lambda r: None,
            broken=broken,
        )

    assert isinstance(build(False).gate, PortfolioGate)
    assert isinstance(build(True).gate, simmod.BrokenGate)


def test_broken_gate_applies_the_same_rules_as_the_real_one() -> None:
    """Sequentially (no race) the broken gate decides exactly like PortfolioGate."""
    from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits

    limits = PortfolioLimits(
        max_concurrent_positions=2, max_gross_exposure=8_500, max_symbol_exposure=4_000
    )
    real = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    broken = simmod.BrokenGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    positions = {"AAA": 1_000}
    script = [
        ("AAA", 3_000), ("AAA", 100), ("BBB", 2_000), ("CCC", 500), ("BBB", 2_000),
        ("BBB", 100), ("AAA", 1), ("DDD", 1), ("BBB", 1_000),
    ]  # fmt: skip
    outcomes = set()
    for n, (symbol, notional) in enumerate(script):
        want = real.try_enter(symbol, notional, lambda: positions, order_id=f"o{n}")
        got = broken.try_enter(symbol, notional, lambda: positions, order_id=f"o{n}")
        assert (got.admitted, got.reason) == (want.admitted, want.reason), (symbol, notional)
        outcomes.add(want.reason)
    assert outcomes == {
        None,
        DenyReason.MAX_CONCURRENT_POSITIONS,
        DenyReason.MAX_GROSS_EXPOSURE,
        DenyReason.MAX_SYMBOL_EXPOSURE,
    }


@pytest.mark.timeout(20)
def test_broken_gate_lets_two_entries_into_one_slot_when_they_interleave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bug itself, driven with events: A checks, B checks and reserves, A reserves."""
    from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits

    in_gap, go_on = threading.Event(), threading.Event()
    gaps: list[float] = []

    class GapClock:
        """Stands in for the ``time`` module of ``broken``: the first gap waits for the test."""

        @staticmethod
        def sleep(seconds: float) -> None:
            gaps.append(seconds)
            if len(gaps) == 1:
                in_gap.set()
                assert go_on.wait(10)

    monkeypatch.setattr(simmod.broken, "time", GapClock)
    limits = PortfolioLimits(max_concurrent_positions=1)
    ledger = PendingEntryLedger(60.0, clock=ManualClock())
    broken = simmod.BrokenGate(ledger, limits)
    first: list[Decision] = []
    a = threading.Thread(target=lambda: first.append(broken.try_enter("AAA", 10)))
    a.start()
    try:
        assert in_gap.wait(10)  # A has checked and not reserved yet
        second = broken.try_enter("BBB", 10)
    finally:
        go_on.set()
        a.join(10)
    assert second and first and first[0]  # both admitted: two positions, limit 1
    assert ledger.stats().outstanding == 2
    assert gaps == [simmod.broken.GAP] * 2

    real = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), limits)
    assert real.try_enter("AAA", 10)
    assert real.try_enter("BBB", 10).reason is DenyReason.MAX_CONCURRENT_POSITIONS
