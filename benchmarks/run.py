"""Benchmarks for pendingledger's core: decision cost, book size, contention, memory, amounts,
expiry storms.

Run with the build to measure installed (``pip install .`` compiles the core with mypyc), from a
directory whose source tree cannot shadow it, or with ``-P``::

    python -P benchmarks/run.py --quick          # about 20 s on 2 vCPUs (CI prints it)
    python -P benchmarks/run.py                  # full run, a few minutes
    python -P benchmarks/run.py --json results.json --plot results.png
    python benchmarks/run.py --summarize a.json b.json   # one Markdown row per results file

Every figure is measured in this process beside its baselines (the floor: a bare
``threading.Lock`` + dict cycle; the straightforward port in ``baseline.py``), in interleaved
rounds, and reported as the minimum over rounds with its spread. Ratios are of minimums. Targets
apply to the compiled build on CPython 3.11 to 3.13; the pure build is reported with no target.
Nothing here asserts: a missed target prints "NOT met" and the exit status stays 0, unless
``--strict`` is given. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import functools
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import (  # the path above makes this sibling module importable
    PortReservation,
    StraightforwardGate,
    StraightforwardLedger,
    floor_loop,
    floor_worker,
    gate_loop,
    gate_worker,
    sided_loop,
    strategy_loop,
)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_ns = time.perf_counter_ns
# Single-thread costs are this thread's CPU time: a batch the scheduler preempts (on a machine
# shared with other work) is not charged for the time it was off the CPU.
_cpu_ns = time.thread_time_ns


def _timer_cost() -> int:
    """What reading ``_cpu_ns`` twice costs (a system call in some VMs): taken off each batch."""
    costs = []
    for _ in range(200):
        t0 = _cpu_ns()
        costs.append(_cpu_ns() - t0)
    return min(costs)


# --- what is measured -----------------------------------------------------------------------------

TTL = 3600.0  # long enough that nothing expires while a figure is measured (time.monotonic)
NOTIONAL = 100.0
BUDGET = "strategy-1"  # the one strategy of the budget subject
WINDOW_S = 1e-9  # the rate window's length in the caps section: it never fills up
BIG_WINDOW = 100_000  # the larger rate window timed there
TIMEOUT = 0.05
# A caller's position cache: 8 open positions on symbols other than the ones entered.
POSITIONS: dict[str, float] = {
    f"OPEN{i}": exposure
    for i, exposure in enumerate((1_000.0, -2_500.0, 400.0, 12.5, -80.25, 3_000.0, 7.0, -1.5))
}
HOT = [f"HOT{i}" for i in range(16)]  # the symbols the timed decisions enter and release
STORM = 100_000  # reservations that expire at once in the expiry storm
TARGET_PYTHONS = ((3, 11), (3, 12), (3, 13))
BUSY_SHARE = 0.9  # a lone thread with less of a CPU than this: the machine was busy


def _limits() -> Any:
    from pendingledger import PortfolioLimits

    # Generous, so every decision is admitted, but all three set, so every rule is evaluated.
    return PortfolioLimits(
        max_concurrent_positions=10**9, max_gross_exposure=1e14, max_symbol_exposure=1e12
    )


def _subject(ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> tuple[Any, Any]:
    from pendingledger import PendingEntryLedger, PortfolioGate

    ledger = PendingEntryLedger(ttl, clock=clock)
    return ledger, PortfolioGate(ledger, _limits())


def _budget_subject() -> Any:
    """A gate with the same limits as a strategy's budget: a decision under it is checked at
    the strategy's scope, then at the account's."""
    from pendingledger import PendingEntryLedger, PortfolioGate

    ledger = PendingEntryLedger(TTL, clock=time.monotonic)
    return PortfolioGate(ledger, _limits(), budgets={BUDGET: _limits()})


def _book_subject(side: object) -> Any:
    """A gate whose hot symbols are each long 10,000 with one order of ``side`` outstanding:
    with a side, every decision on them keeps the buys, sells and worst case of its symbol."""
    gate = _subject()[1]
    for symbol in HOT:
        gate.set_position(symbol, 10_000.0)
        gate.try_enter(symbol, NOTIONAL, order_id=symbol + "-held", side=side)
    return gate


def _port() -> tuple[StraightforwardLedger, StraightforwardGate]:
    ledger = StraightforwardLedger(TTL)
    return ledger, StraightforwardGate(ledger, _limits())


def _book_symbols(n: int, prefix: str = "BOOK") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


def _prefill_subject(ledger: Any, n: int) -> None:
    with ledger.lock() as pending:
        for symbol in _book_symbols(n):
            pending.reserve(symbol, NOTIONAL, order_id=symbol + "-b")


def _outstanding(ledger: Any) -> int:
    return int(ledger.stats().outstanding) if hasattr(ledger, "stats") else len(ledger)


@dataclass(frozen=True)
class Mode:
    name: str
    rounds: int  # interleaved repeats of each single-thread measurement
    batch_s: float  # target duration of one timed batch
    book_sizes: tuple[int, ...]
    port_sizes: tuple[int, ...]  # the port is O(N) per decision: only these sizes
    threads: tuple[int, ...]
    port_threads: tuple[int, ...]
    contention_rounds: int
    window_s: float
    mem_book: int
    mem_cycles: int  # reserve/release cycles traced for the growth figure
    storm_rounds: int


QUICK = Mode(
    name="quick",
    rounds=40,
    batch_s=0.002,
    book_sizes=(10, 10_000, 100_000),
    port_sizes=(10_000,),
    threads=(1, 64),
    port_threads=(),
    contention_rounds=8,
    window_s=0.1,
    mem_book=10_000,
    mem_cycles=10_000,
    storm_rounds=2,
)

FULL = Mode(
    name="full",
    rounds=150,
    batch_s=0.002,
    book_sizes=(10, 100, 1_000, 10_000, 100_000),
    port_sizes=(10, 1_000, 10_000),
    threads=(1, 4, 16, 64),
    port_threads=(1, 64),
    contention_rounds=15,
    window_s=0.3,
    mem_book=100_000,
    mem_cycles=1_000_000,
    storm_rounds=5,
)


# --- results and targets --------------------------------------------------------------------------


def _build() -> tuple[bool, str]:
    import pendingledger

    compiled = bool(pendingledger.COMPILED)
    return compiled, "compiled" if compiled else "pure"


def _targets_apply() -> bool:
    return _build()[0] and sys.version_info[:2] in TARGET_PYTHONS


@dataclass
class Target:
    key: str
    name: str
    value: float | None
    limit: float
    kind: str  # "max": value must be <= limit; "min": value must be >= limit
    spread: str = ""  # the per-round range behind the value
    unit: str = "x"
    caveat: str = ""  # why the verdict may not hold (printed beside it)

    @property
    def passed(self) -> bool | None:
        if self.value is None or not _targets_apply():
            return None
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if not _targets_apply():
            why = "pure build" if not _build()[0] else f"CPython {platform.python_version()}"
            return f"no target ({why})"
        verdict = "met" if self.passed else "NOT met"
        return f"{verdict} ({self.caveat})" if self.caveat else verdict

    def margin(self) -> str:
        if self.value is None or not _targets_apply():
            return "-"
        if self.kind == "max":
            slack = (self.limit - self.value) / self.limit
        else:
            slack = (self.value - self.limit) / self.limit
        word = "headroom" if slack >= 0 else "short"
        return f"{abs(slack) * 100:.0f}% {word}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "kind": self.kind,
            "unit": self.unit,
            "spread": self.spread,
            "passed": self.passed,
            "verdict": self.verdict(),
            "caveat": self.caveat,
            "margin": self.margin(),
        }


@dataclass
class Results:
    meta: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    # (title, headers, rows) of every printed table, for --markdown
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)


def _spread(values: Sequence[float]) -> float:
    """How far a typical round is from the best: median / min - 1 (the slowest rounds on a
    shared machine are preempted ones, so the maximum would say nothing)."""
    low = min(values)
    return float(statistics.median(values)) / low - 1 if low > 0 else 0.0


def _spread_high(values: Sequence[float]) -> float:
    """``_spread`` for figures where higher is better (throughput): 1 - median / max."""
    return 1 - float(statistics.median(values)) / max(values) if max(values) > 0 else 0.0


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (the middle half of the rounds)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def _fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M/s"
    return f"{rate / 1e3:.1f} k/s"


def _fmt_bytes(n: float) -> str:
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if abs(n) >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n:.0f} B"


def _fmt_value(value: float, unit: str) -> str:
    """A target's figure: 3 significant digits, whole numbers from 100 on (no e-notation)."""
    return (f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}") + unit


def _fmt_pct(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _fmt_range(values: Sequence[float], digits: int = 2) -> str:
    low, high = _quartiles(values)
    return f"{low:.{digits}f}-{high:.{digits}f}x"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(out)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _show(results: Results, title: str, headers: list[str], rows: list[list[str]]) -> None:
    _say(_table(headers, rows))
    results.tables.append((title, headers, rows))


def _title(results: Results, text: str) -> None:
    _say(f"== {text} [{results.meta['tag']}] ==")


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return out


def _markdown(results: Results) -> str:
    lines: list[str] = [f"{results.meta['tag']}, {results.meta['mode']} run", ""]
    for title, headers, rows in results.tables:
        lines += [f"**{title}**", "", *_markdown_table(headers, rows), ""]
    lines += ["**Targets**", "", *_markdown_table(*_target_rows(results)), ""]
    return "\n".join(lines)


# --- single-thread timing -------------------------------------------------------------------------


def _orders(n: int) -> list[tuple[str, str]]:
    """``n`` decisions over the hot symbols, each with its own client order id (they repeat
    only once the reservation made with them has been released)."""
    return [(HOT[i % len(HOT)], f"{HOT[i % len(HOT)]}-o{i % 64}") for i in range(n)]


class _Timed:
    """One thing to time: ``run(inputs)`` does one operation per input; ``make(n)`` builds
    ``n`` inputs (outside the timing)."""

    def __init__(
        self,
        label: str,
        run: Callable[[list[Any]], None],
        make: Callable[[int], list[Any]] = _orders,
    ) -> None:
        self.label = label
        self.run = run
        self.make = make
        self.inputs: list[Any] = []
        self.samples: list[float] = []  # ns per operation, one per round

    def calibrate(self, batch_s: float, min_ops: int = 3, max_ops: int = 400_000) -> None:
        n = 16
        while True:
            inputs = self.make(n)
            t0 = _cpu_ns()
            self.run(inputs)
            elapsed = _cpu_ns() - t0
            if elapsed >= batch_s * 1e9 / 8 or n >= max_ops:
                break
            n *= 4
        ops = int(min(max_ops, max(min_ops, batch_s * 1e9 / (elapsed / n))))
        self.inputs = self.make(ops)

    def once(self) -> float:
        inputs = self.inputs
        t0 = _cpu_ns()
        self.run(inputs)
        per_op = (_cpu_ns() - t0 - TIMER_NS) / len(inputs)
        self.samples.append(per_op)
        return per_op

    @property
    def best(self) -> float:
        return min(self.samples)


TIMER_NS = 0  # set by main() (_timer_cost)


def _interleaved(subjects: Mapping[K, Callable[[], T]], rounds: int) -> list[dict[K, T]]:
    """Run every subject once per round, ``rounds`` times (A B C, B C A, C A B, ... rather than
    A A A, B B B, C C C), so a drift in the machine's speed falls on all of them alike; each
    round's results by key. Every section times its subjects through this."""
    keys = list(subjects)
    per_round: list[dict[K, T]] = []
    for r in range(rounds):
        k = r % len(keys)
        per_round.append({key: subjects[key]() for key in [*keys[k:], *keys[:k]]})
    return per_round


def _measure(items: Sequence[_Timed], mode: Mode) -> list[dict[str, float]]:
    """Calibrate and warm up each item, then time them in interleaved rounds: ns/op by label."""
    for item in items:
        item.calibrate(mode.batch_s)
        item.once()  # warm-up, discarded
        item.samples.clear()
    # Short batches, many rounds: on a shared machine the fastest of many short batches is one
    # that nothing preempted. The books made for the section are frozen out of the collector's
    # way (a full collection would walk them), once, instead of collecting every round.
    gc.collect()
    gc.freeze()
    try:
        return _interleaved({item.label: item.once for item in items}, mode.rounds)
    finally:
        gc.unfreeze()


@dataclass
class Ratio:
    """``top`` over ``bottom``: the ratio of their minimums, and the range of per-round ratios."""

    value: float
    rounds: list[float]

    @classmethod
    def of(cls, per_round: Sequence[dict[str, float]], top: str, bottom: str) -> Ratio:
        tops = [r[top] for r in per_round]
        bottoms = [r[bottom] for r in per_round]
        return cls(min(tops) / min(bottoms), [r[top] / r[bottom] for r in per_round])

    def text(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f}x"

    def range(self, digits: int = 2) -> str:
        return _fmt_range(self.rounds, digits)

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "per_round": self.rounds}


def _floor_timed(label: str, book_size: int) -> _Timed:
    lock = threading.Lock()
    book: dict[str, float] = dict.fromkeys(_book_symbols(book_size), 1.0)

    def make(n: int) -> list[str]:
        return [HOT[i % len(HOT)] for i in range(n)]

    return _Timed(label, lambda symbols: floor_loop(lock, book, symbols), make)


def _gate_timed(
    label: str, gate: Any, positions: dict[str, float] | None, timeout: float | None = None
) -> _Timed:
    try_enter = gate.try_enter
    return _Timed(label, lambda orders: gate_loop(try_enter, orders, NOTIONAL, positions, timeout))


def _sided_timed(label: str, gate: Any, side: object) -> _Timed:
    try_enter = gate.try_enter
    if side is None:
        return _Timed(label, lambda orders: gate_loop(try_enter, orders, NOTIONAL, None))
    return _Timed(label, lambda orders: sided_loop(try_enter, orders, NOTIONAL, side))


def _cost_row(
    item: _Timed, label: str, floor: _Timed, per_round: Sequence[dict[str, float]]
) -> list[str]:
    ratio = Ratio.of(per_round, item.label, floor.label)
    return [label, _fmt_ns(item.best), _fmt_pct(_spread(item.samples)), ratio.text(), ratio.range()]


def bench_decision(mode: Mode, results: Results) -> None:
    _title(results, "Decision: one admitted try_enter with a client order id + its release")
    floor = _floor_timed("floor", 0)
    own = _gate_timed("own", _subject()[1], None)
    own_timeout = _gate_timed("own_timeout", _subject()[1], None, TIMEOUT)
    caller = _gate_timed("dict8", _subject()[1], POSITIONS)
    port_own = _gate_timed("port_own", _port()[1], None)
    port_dict = _gate_timed("port_dict8", _port()[1], POSITIONS)
    from pendingledger import Side

    unsided = _sided_timed("book_none", _book_subject(None), None)
    sided = _sided_timed("book_sides", _book_subject(Side.SELL), Side.BUY)
    budget_gate = _budget_subject()
    budget = _Timed(
        "budget",
        lambda orders: strategy_loop(budget_gate.try_enter, orders, NOTIONAL, BUDGET),
    )
    items = [floor, own, own_timeout, caller, port_own, port_dict, unsided, sided, budget]
    per_round = _measure(items, mode)
    labels = {
        "floor": "floor: with lock: d[k] = 1.0, then with lock: del d[k]",
        "own": "pendingledger, the gate's own book (target <= 2.5x)",
        "own_timeout": f"pendingledger, own book, timeout={TIMEOUT:g}",
        "dict8": "pendingledger, a caller's dict of 8 positions (target <= 5x)",
        "port_own": "straightforward port, its own book",
        "port_dict8": "straightforward port, a caller's dict of 8 positions",
        "book_none": "own book, longs each with an order outstanding, side=None",
        "book_sides": "the same with sides: a buy beside an outstanding sell",
        "budget": "own book, under a strategy's budget (the same limits at both scopes)",
    }
    rows = [_cost_row(item, labels[item.label], floor, per_round) for item in items]
    headers = ["per decision + release", "min", "spread", "vs floor", "per round (middle half)"]
    _show(results, "Decision cost", headers, rows)
    timeout = Ratio.of(per_round, "own_timeout", "own")
    sides = Ratio.of(per_round, "book_sides", "book_none")
    budgeted = Ratio.of(per_round, "budget", "own")
    _say(f"with sides vs without (own book): {sides.text(3)} (per round {sides.range(3)})")
    _say(
        f"under a strategy's budget vs without (own book): {budgeted.text(3)} "
        f"(per round {budgeted.range(3)})"
    )
    _say(
        f"timeout={TIMEOUT:g} vs timeout=None (own book): {timeout.text(3)} "
        f"(per round {timeout.range(3)}), "
        f"{_fmt_ns(own_timeout.best - own.best)} more per decision"
    )
    _say(
        f"({mode.rounds} interleaved rounds; min = the fastest round; spread = how much slower "
        "the median round was; vs floor = ratio of minimums; per round = the middle half of the "
        "per-round ratios)\n"
    )
    ratios = {item.label: Ratio.of(per_round, item.label, "floor") for item in items}
    results.sections["decision"] = {
        "ns_min": {item.label: item.best for item in items},
        "spread": {item.label: _spread(item.samples) for item in items},
        "vs_floor": {label: ratio.as_dict() for label, ratio in ratios.items()},
        "timeout_vs_none": timeout.as_dict(),
        "sides_vs_none": sides.as_dict(),
        "budget_vs_none": budgeted.as_dict(),
        "per_round": per_round,
    }
    results.targets.append(
        Target(
            "sides", "a decision with sides vs one without", sides.value, 1.15, "max", sides.range()
        )
    )
    results.targets.append(
        Target(
            "budget",
            "a decision under a strategy's budget vs one without",
            budgeted.value,
            1.3,
            "max",
            budgeted.range(),
        )
    )
    for key, label, limit in (
        ("own", "own book: decision + release vs the floor", 2.5),
        ("dict8", "caller's dict of 8: decision + release vs the floor", 5.0),
    ):
        ratio = ratios[key]
        results.targets.append(
            Target(f"floor_{key}", label, ratio.value, limit, "max", ratio.range())
        )


def _capped_subject(count: int) -> Any:
    """A gate with every order cap set, generous (every decision admitted), and its rate
    window already full: ``count`` admissions within ``WINDOW_S``, which no ``count`` of
    decisions a microsecond apart can reach, so the window slides on every decision."""
    from dataclasses import replace

    from pendingledger import PendingEntryLedger, PortfolioGate

    limits = replace(
        _limits(),
        max_order_notional=1e6,
        max_open_orders=10**6,
        max_open_orders_per_symbol=10**6,
        max_orders_per_interval=(count, WINDOW_S),
    )
    gate = PortfolioGate(PendingEntryLedger(TTL, clock=time.monotonic), limits)
    for i in range(count):
        decision = gate.try_enter(HOT[i % len(HOT)], NOTIONAL)
        assert decision.admitted  # the limits are generous
        decision.reservation.release()
    return gate


def bench_caps(mode: Mode, results: Results) -> None:
    _title(results, "Order caps: decision + release with every cap set, by rate-window size")
    plain = _gate_timed("none", _subject()[1], None)
    small = _gate_timed("window10", _capped_subject(10), None)
    large = _gate_timed(f"window{BIG_WINDOW}", _capped_subject(BIG_WINDOW), None)
    items = [plain, small, large]
    per_round = _measure(items, mode)
    labels = {
        "none": "no order cap set",
        "window10": "every cap set, rate window of 10 admissions",
        f"window{BIG_WINDOW}": f"every cap set, rate window of {BIG_WINDOW:,} admissions",
    }
    rows = [_cost_row(item, labels[item.label], plain, per_round) for item in items]
    headers = ["per decision + release", "min", "spread", "vs none", "per round (middle half)"]
    _show(results, "Order caps", headers, rows)
    caps = Ratio.of(per_round, "window10", "none")
    flat = Ratio.of(per_round, f"window{BIG_WINDOW}", "window10")
    _say(f"every cap set vs none: {caps.text(3)} (per round {caps.range(3)})")
    _say(
        f"rate window of {BIG_WINDOW:,} vs 10: {flat.text(3)} (per round {flat.range(3)}): "
        "the window costs the same whatever its size\n"
    )
    results.sections["caps"] = {
        "ns_min": {item.label: item.best for item in items},
        "caps_vs_none": caps.as_dict(),
        "big_window_vs_small": flat.as_dict(),
        "per_round": per_round,
    }
    results.targets.append(
        Target(
            "window",
            f"a rate window of {BIG_WINDOW:,} vs one of 10 (O(1) a decision)",
            flat.value,
            1.1,
            "max",
            flat.range(),
        )
    )


def bench_book(mode: Mode, results: Results) -> None:
    _title(results, "Book size: cost per decision + release with N reservations outstanding")
    items: list[_Timed] = []
    keep: list[Any] = []  # every ledger stays alive for the whole section
    from pendingledger import PortfolioGate

    for size in mode.book_sizes:
        ledger, gate = _subject()
        _prefill_subject(ledger, size)
        dict_gate = PortfolioGate(ledger, _limits())  # the same book, read with a caller's dict
        keep.append(ledger)
        items += [
            _gate_timed(f"own@{size}", gate, None),
            _gate_timed(f"dict8@{size}", dict_gate, POSITIONS),
            _floor_timed(f"floor@{size}", size),
        ]
        if size in mode.port_sizes:
            port_ledger, port_gate = _port()
            port_ledger.prefill(_book_symbols(size), NOTIONAL)
            keep.append(port_ledger)
            items.append(_gate_timed(f"port@{size}", port_gate, None))
    per_round = _measure(items, mode)
    for ledger in keep:  # every timed decision was released again
        if _outstanding(ledger) not in mode.book_sizes:
            _say(f"warning: a benchmark book changed size during the run ({_outstanding(ledger)})")

    best = {item.label: item for item in items}
    smallest, largest = min(mode.book_sizes), max(mode.book_sizes)
    rows = []
    table: dict[str, dict[str, Any]] = {}
    for size in mode.book_sizes:
        own = best[f"own@{size}"]
        flat = Ratio.of(per_round, f"own@{size}", f"own@{smallest}")
        flat_dict = Ratio.of(per_round, f"dict8@{size}", f"dict8@{smallest}")
        port = best.get(f"port@{size}")
        speedup = Ratio.of(per_round, f"port@{size}", f"own@{size}") if port else None
        table[str(size)] = {
            "own_ns": own.best,
            "own_spread": _spread(own.samples),
            "own_vs_smallest": flat.as_dict(),
            "dict8_ns": best[f"dict8@{size}"].best,
            "dict8_vs_smallest": flat_dict.as_dict(),
            "floor_ns": best[f"floor@{size}"].best,
            "port_ns": port.best if port else None,
            "port_over_own": speedup.as_dict() if speedup else None,
        }
        rows.append(
            [
                f"{size:,}",
                _fmt_ns(own.best),
                _fmt_pct(_spread(own.samples)),
                f"{flat.text()} ({flat.range()})",
                _fmt_ns(best[f"dict8@{size}"].best),
                flat_dict.text(),
                _fmt_ns(port.best if port else None),
                f"{speedup.text(0)} ({speedup.range(0)})" if speedup else "-",
                _fmt_ns(best[f"floor@{size}"].best),
            ]
        )
    headers = [
        "outstanding",
        "own book",
        "spread",
        f"vs {smallest}",
        "dict of 8",
        f"vs {smallest}",
        "port (own book)",
        "port / own book",
        "floor",
    ]
    _show(results, "Book size", headers, rows)
    _say(f"({mode.rounds} interleaved rounds over all sizes; ratios are of minimums)\n")
    results.sections["book"] = {
        "sizes": list(mode.book_sizes),
        "by_size": table,
        "per_round": per_round,
    }
    flat = Ratio.of(per_round, f"own@{largest}", f"own@{smallest}")
    results.targets.append(
        Target(
            "flat",
            f"own book: cost at {largest:,} outstanding / cost at {smallest}",
            flat.value,
            1.3,
            "max",
            flat.range(),
        )
    )
    if 10_000 in mode.port_sizes and 10_000 in mode.book_sizes:
        speedup = Ratio.of(per_round, "port@10000", "own@10000")
        results.targets.append(
            Target(
                "port",
                "speed-up over the straightforward port at 10,000 outstanding",
                speedup.value,
                100.0,
                "min",
                speedup.range(0),
            )
        )


# --- contention -----------------------------------------------------------------------------------


# A contender is what a contention window races: called once per window (so every window gets a
# fresh book), it returns the loop each thread runs on its own symbols, given the window's
# barrier, stop flag and deadline (``baseline.py``), as (operations, denials, latencies).
Worker = Callable[..., tuple[int, int, list[int]]]
Contender = Callable[[], Worker]


def _gate_contender(make_gate: Callable[[], Any], positions: dict[str, float] | None) -> Contender:
    def window() -> Worker:
        try_enter = make_gate().try_enter
        return lambda symbols, **sync: gate_worker(try_enter, symbols, NOTIONAL, positions, **sync)

    return window


def _floor_contender(shared: bool) -> Contender:
    def window() -> Worker:
        lock = threading.Lock()
        book: dict[str, float] = {}

        def work(symbols: list[str], **sync: Any) -> tuple[int, int, list[int]]:
            if shared:
                return floor_worker(lock, book, symbols, **sync)
            return floor_worker(threading.Lock(), {}, symbols, **sync)

        return work

    return window


# Every subject a contention window can race, by kind, and the label its rows print. A section
# that races another subject adds it here and names it in the runs it gives ``_Windows.measure``.
def _listened_gate() -> Any:
    """The own-book gate with the cheapest listener there is: a C method that keeps the last
    event (what a listener that hands events to a queue costs, less the queue's lock)."""
    gate = _subject()[1]
    gate.subscribe(collections.deque(maxlen=1).append)
    return gate


def _metered_gate() -> Any:
    """The own-book gate instrumented for Prometheus (its latency histogram is a listener)."""
    from prometheus_client import CollectorRegistry

    from pendingledger.metrics import instrument

    gate = _subject()[1]
    instrument(gate, "bench", registry=CollectorRegistry())
    return gate


CONTENDERS: dict[str, Contender] = {
    "own": _gate_contender(lambda: _subject()[1], None),
    "listened": _gate_contender(_listened_gate, None),
    "metered": _gate_contender(_metered_gate, None),
    "dict8": _gate_contender(lambda: _subject()[1], POSITIONS),
    "floor": _floor_contender(shared=True),
    "unshared": _floor_contender(shared=False),  # the floor's loop on a lock of each thread's own
    "port": _gate_contender(lambda: _port()[1], None),
}
CONTENTION_LABELS = {
    "own": "pendingledger, own book",
    "listened": "own book + a listener",
    "metered": "own book + metrics",
    "dict8": "pendingledger, dict of 8",
    "floor": "floor",
    "unshared": "floor, a lock per thread",
    "port": "port, own book",
}


@dataclass(frozen=True)
class _Window:
    rate: float  # operations per wall second
    cpu_rate: float  # operations per second of the process's CPU time
    denials: int
    latencies: list[int]


def _run_window(kind: str, nthreads: int, window_s: float) -> _Window:
    """Start ``nthreads`` workers of ``CONTENDERS[kind]`` behind a barrier, for one window.

    The workers stop themselves at a deadline fixed before the barrier opens (``baseline.py``),
    so the window does not depend on the main thread winning the GIL back.
    """
    barrier = threading.Barrier(nthreads + 1)
    stop = [False]
    deadline = [0]
    outcomes: list[tuple[int, int, list[int]] | None] = [None] * nthreads
    errors: list[BaseException] = []
    work = CONTENDERS[kind]()

    def run(index: int) -> None:
        symbols = [f"T{index}S{j}" for j in range(8)]
        try:
            outcomes[index] = work(symbols, barrier=barrier, stop=stop, deadline=deadline)
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)
            stop[0] = True
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(nthreads)]
    for thread in threads:
        thread.start()
    gc.collect()
    window_ns = int(window_s * 1e9)
    try:
        cpu0 = time.process_time_ns()
        deadline[0] = _ns() + window_ns  # the workers stop themselves there
        barrier.wait()
        time.sleep(window_s)
        for thread in threads:
            thread.join()
        cpu_s = (time.process_time_ns() - cpu0) / 1e9
    finally:
        stop[0] = True
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    done = [o for o in outcomes if o is not None]
    total = sum(o[0] for o in done)
    latencies = [x for o in done for x in o[2]]
    return _Window(total / (window_ns / 1e9), total / cpu_s, sum(o[1] for o in done), latencies)


def _percentile(sorted_values: Sequence[int], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


@dataclass
class _Windows:
    """Each run's (kind, threads) windows, one per interleaved round: per-round figures by run."""

    rates: dict[tuple[str, int], list[float]]
    cpu_rates: dict[tuple[str, int], list[float]]
    denials: dict[tuple[str, int], int]
    latencies: dict[tuple[str, int], list[int]]

    @classmethod
    def measure(cls, runs: Sequence[tuple[str, int]], mode: Mode, rounds: int = 0) -> _Windows:
        """``rounds`` (0: the mode's) interleaved rounds of a window of each run."""
        subjects = {run: functools.partial(_run_window, *run, mode.window_s) for run in runs}
        per_round = _interleaved(subjects, rounds or mode.contention_rounds)
        return cls(
            {run: [r[run].rate for r in per_round] for run in runs},
            {run: [r[run].cpu_rate for r in per_round] for run in runs},
            {run: sum(r[run].denials for r in per_round) for run in runs},
            {run: [x for r in per_round for x in r[run].latencies] for run in runs},
        )


def bench_contention(mode: Mode, results: Results) -> None:
    _title(
        results,
        f"Contention: threads looping try_enter + release on their own 8 symbols, "
        f"{mode.window_s:g} s windows, switch interval {sys.getswitchinterval():g} s",
    )
    # A thread count's runs sit next to each other in every round, so a 64-thread window is
    # measured close in time to its 1-thread window.
    runs = [(kind, n) for kind in ("own", "dict8", "floor", "unshared") for n in mode.threads]
    runs += [("port", n) for n in mode.port_threads]
    windows = _Windows.measure(runs, mode)
    rates, cpu_rates, denials, lats = (
        windows.rates,
        windows.cpu_rates,
        windows.denials,
        windows.latencies,
    )

    most = max(mode.threads)
    rows = []
    table: dict[str, dict[str, Any]] = {}
    efficiency: dict[str, tuple[Ratio, Ratio]] = {}
    for kind, n in runs:
        wall = _vs_one(rates, kind, n)
        cpu = _vs_one(cpu_rates, kind, n)
        if n == most:
            efficiency[kind] = (wall, cpu)
        ordered = sorted(lats[(kind, n)])
        p50, p99 = _percentile(ordered, 0.5), _percentile(ordered, 0.99)
        table[f"{kind}@{n}"] = {
            "kind": kind,
            "threads": n,
            "ops_per_s_best": max(rates[(kind, n)]),
            "ops_per_s_rounds": rates[(kind, n)],
            "ops_per_cpu_s_best": max(cpu_rates[(kind, n)]),
            "ops_per_cpu_s_rounds": cpu_rates[(kind, n)],
            "vs_1_thread": wall.as_dict(),
            "vs_1_thread_cpu": cpu.as_dict(),
            "denials": denials[(kind, n)],
            "p50_ns": p50,
            "p99_ns": p99,
        }
        rows.append(
            [
                CONTENTION_LABELS[kind],
                str(n),
                _fmt_rate(max(rates[(kind, n)])),
                _fmt_pct(_spread_high(rates[(kind, n)])),
                f"{wall.value:.2f} ({wall.range()})",
                _fmt_rate(max(cpu_rates[(kind, n)])),
                f"{cpu.value:.2f} ({cpu.range()})",
                str(denials[(kind, n)]),
                _fmt_ns(p50),
                _fmt_ns(p99),
            ]
        )
    headers = [
        "subject",
        "threads",
        "best decisions/s",
        "spread",
        "vs 1 thread",
        "per CPU-second",
        "vs 1 thread",
        "denied",
        "p50",
        "p99",
    ]
    _show(results, "Contention", headers, rows)
    _say(
        f"({mode.contention_rounds} rounds; best = the fastest round; spread = how much slower "
        "the median round was; vs 1 thread = best / best at 1 thread (then the middle half of "
        "the per-round ratios); per CPU-second = decisions / the process's CPU time in the "
        "window, which other processes on the machine do not dilute; latency of try_enter "
        "alone, 1 in 9 sampled, pooled over rounds)\n"
    )
    pinned = _pinned_scaling(mode, most)
    results.sections["contention"] = {
        "window_s": mode.window_s,
        "switch_interval": sys.getswitchinterval(),
        "by_run": table,
        "one_cpu": {kind: scaling.as_dict() for kind, scaling in pinned.items()},
    }
    _contention_targets(results, pinned, efficiency, most)


@dataclass
class _Scaling:
    """One subject's ``most``-thread throughput over its 1-thread throughput on one CPU."""

    cpu: int | None  # the CPU the process was pinned to; None where it could not be
    wall: Ratio
    per_cpu_s: Ratio
    share: float  # CPU time / wall time of the best 1-thread window
    rounds: dict[str, list[float]]  # each round's wall-clock rate, by thread count

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "vs_1_thread": self.wall.as_dict(),
            "vs_1_thread_cpu": self.per_cpu_s.as_dict(),
            "cpu_share_best": self.share,
            "ops_per_s_rounds": self.rounds,
        }


def _pinned_scaling(mode: Mode, most: int) -> dict[str, _Scaling]:
    """1 and ``most`` threads of each target's subject, and of the loop on a lock per thread,
    with the process on one CPU (the one it ran on first), rounds interleaved as above."""
    cpu = _pin_to_one_cpu()
    runs = [(kind, n) for kind in ("own", "dict8", "unshared") for n in (1, most)]
    try:
        windows = _Windows.measure(runs, mode)
    finally:
        _unpin(cpu)
    rates, cpu_rates = windows.rates, windows.cpu_rates
    scaling: dict[str, _Scaling] = {}
    for kind in ("own", "dict8", "unshared"):
        share = max(rates[(kind, 1)]) / max(cpu_rates[(kind, 1)])
        wall, per_cpu_s = _vs_one(rates, kind, most), _vs_one(cpu_rates, kind, most)
        rounds = {str(n): rates[(kind, n)] for n in (1, most)}
        scaling[kind] = _Scaling(None if cpu is None else cpu[0], wall, per_cpu_s, share, rounds)
    return scaling


def _pin_to_one_cpu() -> tuple[int, set[int]] | None:
    """Pin this thread (and so the workers it starts) to one CPU: ``(that CPU, the CPUs it had)``,
    or None where affinity cannot be set (not Linux) or there is one CPU anyway."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    one = min(allowed)
    os.sched_setaffinity(0, {one})
    return one, allowed


def _unpin(pinned: tuple[int, set[int]] | None) -> None:
    if pinned is not None:
        os.sched_setaffinity(0, pinned[1])


def _contention_targets(
    results: Results,
    pinned: dict[str, _Scaling],
    efficiency: dict[str, tuple[Ratio, Ratio]],
    most: int,
) -> None:
    """The 64-thread targets: on one CPU, over what the interpreter itself keeps.

    On two cores the GIL hops from core to core at every switch, and the thread that takes it
    finds its data in the other core's cache: a cost to any code. Pinned to one CPU the process
    no longer pays it, but every thread waiting for the GIL still wakes once per switch interval
    to ask for it (``perf stat``: about 25,000 context switches a second at 64 threads). The loop
    on a lock per thread shares nothing, so what it loses is that cost alone; the verdict is on
    each subject's 64-thread / 1-thread ratio over that loop's, in the same rounds.

    Unlike every other verdict, this one is the median of the per-round ratios, not a ratio of
    best figures: it divides four windows, and on a shared virtual machine a window can run fast
    as well as slow (the loop's 1-thread windows on one CPU: 0.71 to 2.46 M/s in one quick run),
    so best over best moves with whichever window was luckiest. Three quick runs of 8 windows,
    2026-12-03: own book 1.28, 1.00, 1.00 best over best, 1.00, 1.03, 1.08 as the median; dict
    of 8 1.82, 0.78, 0.92 against 0.97, 0.90, 0.91. The best-over-best figures are printed
    beside it.

    A busy machine inflates wall-clock throughput at one thread less than at 64 (each new GIL
    holder has slept, and the scheduler favours it). The best 1-thread window's CPU share (CPU
    time / wall time, at most 1 for one thread) says whether that happened; if so, the verdict
    is on throughput per CPU-second, which the machine's load does not dilute.
    """
    for kind in ("own", "dict8"):
        scaling = pinned[kind]
        busy = scaling.share < BUSY_SHARE
        mine = scaling.per_cpu_s if busy else scaling.wall
        bare = pinned["unshared"].per_cpu_s if busy else pinned["unshared"].wall
        rounds = [a / b for a, b in zip(mine.rounds, bare.rounds, strict=True)]
        judged = Ratio(statistics.median(rounds), rounds)
        where = "one CPU" if scaling.cpu is not None else "all CPUs (affinity not settable)"
        measure = "per CPU-second" if busy else "wall-clock"
        caveat = (
            f"{measure} on {where}, median of {len(rounds)} rounds; best over best: "
            f"{mine.value / bare.value:.2f}x ({mine.value:.2f}x, the loop on a lock per thread "
            f"{bare.value:.2f}x); "
            f"all CPUs, best: {efficiency[kind][1 if busy else 0].value:.2f}x"
        )
        if busy:
            caveat = f"busy machine: 1 thread had {scaling.share:.0%} of a CPU; {caveat}"
        results.targets.append(
            Target(
                f"contention_{kind}",
                f"{most} threads / 1 thread, {CONTENTION_LABELS[kind]}, over the interpreter's",
                judged.value,
                0.85,
                "min",
                judged.range(),
                caveat=caveat,
            )
        )


def _vs_one(rates: dict[tuple[str, int], list[float]], kind: str, n: int) -> Ratio:
    """Best rate at ``n`` threads over the best at 1, with the per-round ratios."""
    ones = rates.get((kind, 1), rates[(kind, n)])
    mine = rates[(kind, n)]
    return Ratio(max(mine) / max(ones), [a / b for a, b in zip(mine, ones, strict=True)])


# --- memory ---------------------------------------------------------------------------------------


def _traced(fill: Callable[[], Any], n: int) -> dict[str, float]:
    """Bytes per reservation that ``fill()`` makes (kept alive until measured), and the peak."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        held = fill()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del held
    return {"per_reservation": (current - base) / n, "peak_per_reservation": (peak - base) / n}


def _fill_subject(n: int, with_ids: bool) -> Callable[[], Any]:
    symbols = _book_symbols(n, prefix="MEM")  # the caller's strings: made before tracing
    ids = [s + "-o" for s in symbols]
    ledger, gate = _subject()

    def fill() -> Any:
        try_enter = gate.try_enter
        if with_ids:
            held = [
                try_enter(s, NOTIONAL, order_id=o).reservation
                for s, o in zip(symbols, ids, strict=True)
            ]
        else:
            held = [try_enter(s, NOTIONAL).reservation for s in symbols]
        return ledger, held

    return fill


def _fill_port(n: int) -> Callable[[], Any]:
    # Filling through the port's try_enter is O(N^2): fill its dict directly (order id = symbol)
    # and make the reservation object its caller would hold for each.
    symbols = _book_symbols(n, prefix="MEM")
    ledger = StraightforwardLedger(TTL)

    def fill() -> Any:
        ledger.prefill(symbols, NOTIONAL)
        return ledger, [PortReservation(ledger, s, s, NOTIONAL) for s in symbols]

    return fill


def _churn(gate: Any, ledger: Any, clock: Any, cycles: int, start: int) -> int:
    """Reserve/end cycles through every way a reservation ends; the book is empty afterwards."""
    try_enter = gate.try_enter
    step = TTL + 1.0
    for i in range(start, start + cycles):
        symbol = HOT[i & 15]
        order_id = f"c{i}"
        res = try_enter(symbol, NOTIONAL, order_id=order_id).reservation
        path = i % 9
        if path < 3:
            res.release()
        elif path == 3:
            ledger.release(symbol)
        elif path == 4:
            ledger.release_order(order_id)
        elif path == 5:
            res.reduce(NOTIONAL / 2)
            res.reduce(NOTIONAL / 2)
        elif path == 6:
            res.release()
            res.release()  # a second release does nothing
        elif path == 7:
            gate.confirm_fill(order_id, 250.0)
            gate.close_position(symbol)
        else:
            clock.advance(step)  # expires; the next acquisition sweeps it
    with ledger.lock():
        pass
    return start + cycles


def bench_memory(mode: Mode, results: Results) -> None:
    _title(results, "Memory (tracemalloc)")
    n = mode.mem_book
    own = _traced(_fill_subject(n, True), n)
    generated = _traced(_fill_subject(n, False), n)
    port = _traced(_fill_port(n), n)

    from pendingledger.testing import ManualClock

    clock = ManualClock()
    ledger, gate = _subject(TTL, clock)
    at = _churn(gate, ledger, clock, 2_000, 0)  # warm-up: free lists, dict tables, counters
    cycles = mode.mem_cycles
    gc.collect()
    blocks0 = sys.getallocatedblocks()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = _ns()
        _churn(gate, ledger, clock, cycles, at)
        churn_s = (_ns() - t0) / 1e9
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - base
        blocks = sys.getallocatedblocks() - blocks0
    finally:
        tracemalloc.stop()
    left = _outstanding(ledger)
    rows = [
        [
            f"bytes per outstanding reservation ({n:,}, caller keeps each; client order ids)",
            _fmt_bytes(own["per_reservation"]),
            _fmt_bytes(port["per_reservation"]),
        ],
        ["the same, ids generated by the ledger", _fmt_bytes(generated["per_reservation"]), "-"],
        [
            "peak per reservation while filling (client order ids)",
            _fmt_bytes(own["peak_per_reservation"]),
            _fmt_bytes(port["peak_per_reservation"]),
        ],
        [f"traced growth over {cycles:,} reserve/end cycles", _fmt_bytes(growth), "-"],
        [f"allocated blocks growth over {cycles:,} cycles", f"{blocks:+d}", "-"],
        ["outstanding at the end (must be 0)", str(left), "-"],
    ]
    _show(results, "Memory", ["memory", "pendingledger", "straightforward port"], rows)
    _say(
        "(cycles end reservations every way: release, ledger.release, release_order, reduce "
        "to zero, a double release, confirm_fill, TTL expiry; measured after gc.collect(); "
        f"{cycles / churn_s / 1e3:.0f} k cycles/s under tracemalloc)\n"
    )
    results.sections["memory"] = {
        "book": n,
        "own": own,
        "generated_ids": generated,
        "port": port,
        "cycles": cycles,
        "traced_growth_bytes": growth,
        "allocated_blocks_growth": blocks,
        "outstanding_at_end": left,
    }


# --- amounts --------------------------------------------------------------------------------------

UNIT_VALUES: dict[str, list[Any]] = {
    "float": [100.0, 0.1, 2500.75, 1234.5678, 0.003, 65000.12, 99.99, 1.5],
    "float >= 2**22 with a fraction": [5_000_000.25, 12_345_678.9, 4_200_000.5, 9_999_999.99],
    "int": [100, 2500, 1, 65000],
    "Decimal": [Decimal("100.25"), Decimal("0.1"), Decimal("2500"), Decimal("1234.5678")],
    "Fraction": [Fraction(1, 3), Fraction(201, 2), Fraction(7, 8), Fraction(1001, 10)],
}


def _cycled(values: list[Any]) -> Callable[[int], list[Any]]:
    return lambda n: [values[i % len(values)] for i in range(n)]


def _run_units(inputs: list[Any]) -> None:
    from pendingledger._units import units

    for value in inputs:
        units("notional", value, True)


def _run_round(inputs: list[Any]) -> None:
    for value in inputs:
        round(value * 1e9)


def _run_decimal_repr(inputs: list[Any]) -> None:
    for value in inputs:
        int((Decimal(repr(value)) * 1_000_000_000).to_integral_value(ROUND_UP))


def _run_empty(inputs: list[Any]) -> None:
    for _ in inputs:
        pass


UNIT_REFERENCES = {
    "round(v * 1e9)": "inexact, no checks: for scale",
    "Decimal(repr(v)) * 10**9, rounded up": "exact, the plain way: for scale",
}


def bench_units(mode: Mode, results: Results) -> None:
    _title(results, "Amounts: pendingledger._units.units(name, value, up=True), ns per call")
    floats = UNIT_VALUES["float"]
    items = [_Timed(label, _run_units, _cycled(values)) for label, values in UNIT_VALUES.items()]
    items += [
        _Timed("round(v * 1e9)", _run_round, _cycled(floats)),
        _Timed("Decimal(repr(v)) * 10**9, rounded up", _run_decimal_repr, _cycled(floats)),
        _Timed("loop", _run_empty, _cycled(floats)),
    ]
    per_round = _measure(items, mode)
    loop = min(r["loop"] for r in per_round)
    rows = []
    table: dict[str, dict[str, float]] = {}
    for item in items[:-1]:
        net = [r[item.label] - r["loop"] for r in per_round]
        table[item.label] = {"ns_min": item.best - loop, "spread": _spread(net)}
        note = f" ({UNIT_REFERENCES[item.label]})" if item.label in UNIT_REFERENCES else ""
        rows.append([item.label + note, _fmt_ns(item.best - loop), _fmt_pct(_spread(net))])
    _show(results, "Amounts", ["value kind", "ns per call", "spread"], rows)
    _say(
        f"(the loop's own {loop:.0f} ns per item subtracted; the floats: "
        f"{', '.join(map(repr, floats))}; the others: "
        + "; ".join(
            f"{label}: {', '.join(map(repr, values))}"
            for label, values in UNIT_VALUES.items()
            if label != "float"
        )
        + ")\n"
    )
    results.sections["units"] = {"loop_ns": loop, "by_kind": table, "per_round": per_round}


# --- expiry storm ---------------------------------------------------------------------------------


def _storm_round(size: int) -> dict[str, Any]:
    """One storm: ``size`` reservations stamped at one clock reading, then the clock moves past
    their TTL. Times each decision until all are expired (each sweeps up to ``SWEEP_LIMIT``)."""
    from pendingledger import PendingEntryLedger, PortfolioGate
    from pendingledger._core import SWEEP_LIMIT
    from pendingledger.testing import ManualClock

    clock = ManualClock()
    ttl = 60.0
    expired: list[Any] = []
    # on_expire is a C-level append: it counts the expired without Python code (it runs after
    # the lock is released, inside the timed decision), and keeps them alive, so freeing them
    # is not timed either.
    ledger = PendingEntryLedger(ttl, clock=clock, on_expire=expired.append)
    gate: Any = PortfolioGate(ledger, _limits())
    with ledger.lock() as pending:
        for symbol in _book_symbols(size, prefix="STORM"):
            pending.reserve(symbol, NOTIONAL)
    try_enter = gate.try_enter
    calm = []  # decisions with the whole book outstanding, none due
    for i in range(200):
        t0 = _cpu_ns()
        res = try_enter("CALM", NOTIONAL, order_id=f"calm{i}").reservation
        calm.append(_cpu_ns() - t0 - TIMER_NS)
        res.release()
    clock.advance(ttl + 1.0)
    decisions: list[int] = []
    while len(expired) < size and len(decisions) < size:
        t0 = _cpu_ns()
        res = try_enter("NOW", NOTIONAL, order_id=f"now{len(decisions)}").reservation
        decisions.append(_cpu_ns() - t0 - TIMER_NS)
        res.release()
    if len(expired) != size:
        _say(f"warning: the storm expired {len(expired)} of {size}")
    return {"calm_ns": min(calm), "decisions_ns": decisions, "sweep_limit": SWEEP_LIMIT}


def bench_storm(mode: Mode, results: Results) -> None:
    _title(results, f"Expiry storm: {STORM:,} reservations expire at once")
    storms = _interleaved({"storm": functools.partial(_storm_round, STORM)}, mode.storm_rounds)
    rounds = [r["storm"] for r in storms]
    # The k-th decision's time is the minimum over rounds of the k-th decision: a single
    # round's slowest one is usually the scheduler or a neighbour, not the sweep.
    decisions = [min(ts) for ts in zip(*(r["decisions_ns"] for r in rounds), strict=False)]
    limit = rounds[0]["sweep_limit"]
    first = [r["decisions_ns"][0] for r in rounds]
    calm = [r["calm_ns"] for r in rounds]
    figures = {
        "calm_ns": min(calm),
        "first_ns": min(first),
        "median_ns": float(statistics.median(decisions)),
        "slowest_ns": max(decisions),
        "drain_ns": sum(decisions),
        "decisions": len(decisions),
    }
    n = len(decisions)
    rows = [
        [
            f"a decision with {STORM:,} outstanding, none due",
            _fmt_ns(figures["calm_ns"]),
            _fmt_pct(_spread(calm)),
        ],
        [
            f"the first decision once all {STORM:,} are due (sweeps {limit:,})",
            _fmt_ns(figures["first_ns"]),
            _fmt_pct(_spread(first)),
        ],
        [f"the median of the {n} decisions that sweep them", _fmt_ns(figures["median_ns"]), ""],
        [f"the slowest of the {n}", _fmt_ns(figures["slowest_ns"]), ""],
        [
            f"all {n} together (what one unbounded sweep would hold the lock for)",
            _fmt_ns(figures["drain_ns"]),
            "",
        ],
    ]
    _show(results, "Expiry storm", ["decision", "min", "spread"], rows)
    _say(
        f"({mode.storm_rounds} rounds; thread CPU time; each decision's time is its minimum "
        "over the rounds and bounds how long it held the lock; each decision expires at "
        f"most {limit:,}; each is followed by its release, untimed)\n"
    )
    results.sections["storm"] = {
        "size": STORM,
        "sweep_limit": limit,
        "min": figures,
        "decisions_ns": decisions,
        "rounds": rounds,
    }


# --- report ---------------------------------------------------------------------------------------


def _meta(mode: Mode) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import pendingledger

    package_dir = Path(pendingledger.__file__).resolve().parent
    commit = _git_commit(Path(__file__).resolve().parent)
    compiled, build = _build()
    return {
        "mode": mode.name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "compiled": compiled,
        "build": build,
        "tag": f"{build} build, {platform.python_implementation()} {platform.python_version()}",
        "targets_apply": _targets_apply(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "switch_interval": sys.getswitchinterval(),
        "timer_ns": TIMER_NS,
        "checkout_commit": commit,
        "pendingledger_version": pendingledger.__version__,
        "pendingledger_path": str(package_dir),
    }


def _git_commit(where: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def _target_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    rows = []
    for t in results.targets:
        bound = ("<= " if t.kind == "max" else ">= ") + f"{t.limit:g}{t.unit}"
        value = "-" if t.value is None else _fmt_value(t.value, t.unit)
        rows.append([t.name, value, t.spread, bound, t.verdict(), t.margin()])
    headers = ["target", "measured", "per round (middle half)", "target", "verdict", "margin"]
    return headers, rows


PLOT_STYLES = {  # kind: (marker and line, label); the book and contention plots share them
    "own": ("o-", "pendingledger, own book"),
    "dict8": ("d-", "pendingledger, a caller's dict of 8"),
    "port": ("s--", "straightforward port, own book"),
    "floor": ("^:", "floor (bare Lock + dict)"),
    "unshared": ("v:", "floor, a lock per thread"),
}


def _plot_series(
    ax: Any, kind: str, points: dict[int, list[float]], best: Callable[..., float]
) -> None:
    """Every round's figure as a faint dot, the best of each x as the line."""
    if not points:
        return
    style, label = PLOT_STYLES[kind]
    xs = sorted(points)
    line = ax.plot(xs, [best(points[x]) for x in xs], style, label=label)[0]
    dots = [(x, y) for x in xs for y in points[x]]
    ax.scatter(*zip(*dots, strict=True), s=9, alpha=0.25, color=line.get_color(), linewidths=0)


def _log_axes(ax: Any, ticks: Sequence[int], label: str, unit: str) -> None:
    """Log axes labelled in plain numbers: x at the measured values (1, 4, 16, 64), y in
    engineering notation with ``unit`` (500ns, 1us; 500k/s, 1M/s), not 5x10^-7 or 10^6."""
    ticker = importlib.import_module("matplotlib.ticker")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{t:,}" for t in ticks]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(label)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.EngFormatter(unit=unit, sep=""))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


def _plot_book(ax: Any, book: dict[str, Any]) -> None:
    sizes = [int(s) for s in book["sizes"]]
    for kind in ("own", "dict8", "port", "floor"):
        points = {
            size: [r[f"{kind}@{size}"] / 1e9 for r in book["per_round"]]
            for size in sizes
            if f"{kind}@{size}" in book["per_round"][0]
        }
        _plot_series(ax, kind, points, min)
    _log_axes(ax, sizes, "reservations outstanding", "s")
    ax.set_ylabel("time per decision + release (lower is better)")
    ax.set_title("Cost vs book size: each round, and the fastest (line)")
    ax.legend(fontsize="small")


def _plot_contention(ax: Any, contention: dict[str, Any]) -> None:
    by_run = contention["by_run"]
    threads = sorted({v["threads"] for v in by_run.values()})
    for kind in PLOT_STYLES:
        points = {v["threads"]: v["ops_per_s_rounds"] for v in by_run.values() if v["kind"] == kind}
        _plot_series(ax, kind, points, max)
    _log_axes(ax, threads, "threads", "/s")
    ax.set_ylabel("decisions per second, all threads (higher is better)")
    ax.set_title("Throughput vs threads: each round, and the best (line)")
    ax.legend(fontsize="small")


def _plot(results: Results, path: str) -> None:
    try:  # imported by name: matplotlib is optional, and mypy need not know it
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        _say(
            f"--plot {path}: matplotlib is not installed; get it with "
            "pip install '.[bench]' from a checkout  (or: pip install matplotlib)"
        )
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    book = results.sections.get("book")
    if book:
        _plot_book(left, book)
    contention = results.sections.get("contention")
    if contention:
        _plot_contention(right, contention)
    meta = results.meta
    fig.suptitle(
        f"pendingledger {meta['checkout_commit']} | {meta['tag']} | "
        f"{meta['cpu']} ({meta['cpus']} CPUs) | {meta['mode']} run"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _say(f"plot written to {path}")


SUMMARY_COLUMNS = (
    ("floor_own", "own book vs floor (<= 2.5x)"),
    ("floor_dict8", "dict of 8 vs floor (<= 5x)"),
    ("flat", "100,000 / 10 (<= 1.3x)"),
    ("port", "vs port at 10,000 (>= 100x)"),
    ("contention_own", "64 threads, own book (>= 0.85)"),
    ("contention_dict8", "64 threads, dict of 8 (>= 0.85)"),
)


def summarize(paths: Sequence[str]) -> str:
    """One Markdown row per results file (``--json``): the targets, and the other figures."""
    headers = ["build", "CPython", "mode"] + [title for _, title in SUMMARY_COLUMNS]
    headers += ["B per reservation", "float -> units", "storm: first decision", "timeout cost"]
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        meta, sections = data["meta"], data["sections"]
        targets = {t["key"]: t for t in data["targets"]}
        row = [meta["build"], meta["python"], meta["mode"]]
        for key, _ in SUMMARY_COLUMNS:
            t = targets.get(key)
            if t is None or t["value"] is None:
                row.append("-")
                continue
            verdict = {True: " met", False: " **NOT met**"}.get(t["passed"], "")
            if t.get("caveat"):
                verdict += f" ({t['caveat']})"
            row.append(f"{_fmt_value(t['value'], t['unit'])} ({t['spread']}){verdict}")
        memory, units = sections.get("memory"), sections.get("units")
        storm, decision = sections.get("storm"), sections.get("decision")
        row.append(_fmt_bytes(memory["own"]["per_reservation"]) if memory else "-")
        row.append(_fmt_ns(units["by_kind"]["float"]["ns_min"]) if units else "-")
        row.append(_fmt_ns(storm["min"]["first_ns"]) if storm else "-")
        row.append(f"{decision['timeout_vs_none']['value']:.2f}x" if decision else "-")
        rows.append(row)
    return "\n".join(_markdown_table(headers, rows))


def bench_listeners(mode: Mode, results: Results) -> None:
    """What subscribing costs a trading thread: the own book's decisions and releases with and
    without a listener (and with the Prometheus metrics, when prometheus_client is there), at 1
    and the most threads, in interleaved windows."""
    _title(results, "Listeners: try_enter + release with events told, own book")
    kinds = ["own", "listened"] + (["metered"] if _has("prometheus_client") else [])
    most = max(mode.threads)
    runs = [(kind, n) for n in (1, most) for kind in kinds]
    # A fifth of a decision's cost is measured here, so three times the contention rounds:
    # the windows are short, and one window's luck moves a ratio of two of them by 20%.
    rates = _Windows.measure(runs, mode, 3 * mode.contention_rounds).rates
    rows, table = [], {}
    for kind, n in runs:
        slowdown = _slowdown(rates[("own", n)], rates[(kind, n)])
        table[f"{kind}@{n}"] = {
            "ops_per_s_rounds": rates[(kind, n)],
            "slowdown": slowdown.as_dict(),
        }
        cells = [f"{slowdown.value:.2f}x", slowdown.range()] if kind != "own" else ["-", "-"]
        rows.append([CONTENTION_LABELS[kind], str(n), _fmt_rate(max(rates[(kind, n)])), *cells])
    _show(
        results, "Listeners", ["subject", "threads", "best decisions/s", "slowdown", "rounds"], rows
    )
    _say(
        "(slowdown = the own book's rate over the subject's, the median of the per-round "
        "ratios of windows run side by side, as for the 64-thread targets)\n"
    )
    results.sections["listeners"] = {"by_run": table}
    judged = _slowdown(rates[("own", most)], rates[("listened", most)])
    results.targets.append(
        Target(
            "listener",
            f"{most} threads with a listener subscribed, slowdown of each trading thread",
            judged.value,
            1.2,
            "max",
            judged.range(),
        )
    )


def _slowdown(bare: Sequence[float], listened: Sequence[float]) -> Ratio:
    rounds = [a / b for a, b in zip(bare, listened, strict=True)]
    return Ratio(statistics.median(rounds), rounds)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


SECTIONS: dict[str, Callable[[Mode, Results], None]] = {
    "decision": bench_decision,
    "caps": bench_caps,
    "book": bench_book,
    "contention": bench_contention,
    "listeners": bench_listeners,
    "memory": bench_memory,
    "units": bench_units,
    "storm": bench_storm,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="pendingledger benchmarks: " + ", ".join(SECTIONS) + ".",
    )
    parser.add_argument("--quick", action="store_true", help="short run (about 20 s on 2 vCPUs)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="draw the results as a PNG (matplotlib)")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument(
        "--only",
        metavar="SECTION",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable): " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is not met (default: print)"
    )
    parser.add_argument(
        "--summarize",
        metavar="JSON",
        nargs="+",
        help="print one Markdown row per --json results file, and run nothing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.summarize:
        _say(summarize(args.summarize))
        return 0
    mode = QUICK if args.quick else FULL
    try:
        import pendingledger  # noqa: F401
    except ImportError as exc:
        _say(f"pendingledger is not importable ({exc}); install it with pip install .")
        return 2

    global TIMER_NS  # noqa: PLW0603 - measured once per run, read by every timed batch
    TIMER_NS = _timer_cost()
    started = time.perf_counter()
    results = Results(meta=_meta(mode))
    meta = results.meta
    _say(
        f"pendingledger benchmarks, {mode.name} run\n"
        f"  build: {meta['build']} (pendingledger.COMPILED = {meta['compiled']}), "
        f"imported from {meta['pendingledger_path']}\n"
        f"  interpreter: {meta['implementation']} {meta['python']} ({sys.executable})\n"
        f"  machine: {meta['cpu']}, {meta['cpus']} CPUs; checkout {meta['checkout_commit']}\n"
        + (
            ""
            if meta["targets_apply"]
            else "  targets apply to the compiled build on CPython 3.11 to 3.13 only: "
            "figures are reported with no target\n"
        )
    )
    section_s: dict[str, float] = {}
    for name, bench in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        bench(mode, results)
        section_s[name] = round(time.perf_counter() - t0, 1)
    meta["section_s"] = section_s
    elapsed = time.perf_counter() - started
    meta["elapsed_s"] = round(elapsed, 1)

    _title(results, "Targets")
    _say(_table(*_target_rows(results)))
    _say(
        "(measured: the ratio of the best rounds' figures, except the two '64 threads / 1 "
        "thread' targets: the median of their per-round ratios; per round: the middle half of "
        "the per-round ratios)"
    )
    failed = [t for t in results.targets if t.passed is False]
    judged = [t for t in results.targets if t.passed is not None]
    verdicts = (
        f"{len(judged) - len(failed)}/{len(judged)} targets met"
        if judged or not results.targets
        else "no targets apply"
    )
    _say(
        f"\n{verdicts} [{meta['tag']}] in {elapsed:.1f} s ("
        + ", ".join(f"{name} {seconds:g} s" for name, seconds in section_s.items())
        + ")"
    )
    if args.json:
        payload = {
            "meta": meta,
            "sections": results.sections,
            "targets": [t.as_dict() for t in results.targets],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        _say(f"results written to {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(_markdown(results), encoding="utf-8")
        _say(f"Markdown tables written to {args.markdown}")
    if args.plot:
        _plot(results, args.plot)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
