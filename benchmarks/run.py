"""Benchmarks for pendingledger (issue 4): floor ratio, book size, contention, memory.

Run from a checkout with pendingledger installed (``pip install -e .``)::

    python benchmarks/run.py --quick            # under 30 s on 2 cores
    python benchmarks/run.py                    # full run, a few minutes
    python benchmarks/run.py --json results.json --plot results.png

Every figure is measured in this process, beside its baselines (the floor: a bare
``threading.Lock`` + dict cycle, and the straightforward port in ``baseline.py``), and compared
with its target as a ratio. Nothing here asserts: a missed target prints FAIL and the exit status
stays 0, unless ``--strict`` is given (then any FAIL exits 1). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import (  # the path above makes this sibling module importable
    Reservation,
    StraightforwardGate,
    StraightforwardLedger,
    floor_loop,
    floor_worker,
    gate_loop,
    gate_worker,
)

_ns = time.perf_counter_ns

# --- what is measured -----------------------------------------------------------------------------

TTL = 3600.0  # long enough that nothing expires during a run (the clock is time.monotonic)
NOTIONAL = 100.0
POSITIONS: dict[str, float] = {"OPEN0": 1_000.0, "OPEN1": -2_500.0, "OPEN2": 400.0}
NO_POSITIONS: dict[str, float] = {}
OWN_BOOK = "pendingledger own book"  # a contention subject: positions=None, not a mapping
HOT = [f"HOT{i}" for i in range(16)]  # the symbols the timed decisions enter and release


def _limits() -> Any:
    from pendingledger import PortfolioLimits

    # Generous, so every decision is admitted, but all three set, so every rule is evaluated.
    return PortfolioLimits(
        max_concurrent_positions=10**9,
        max_gross_exposure=1e15,
        max_symbol_exposure=1e12,
    )


def _subject(ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> tuple[Any, Any]:
    from pendingledger import PendingEntryLedger, PortfolioGate

    ledger = PendingEntryLedger(ttl, clock=clock)
    return ledger, PortfolioGate(ledger, _limits())


def _port() -> tuple[StraightforwardLedger, StraightforwardGate]:
    ledger = StraightforwardLedger(TTL)
    return ledger, StraightforwardGate(ledger, _limits())


def _book_symbols(n: int, prefix: str = "BOOK") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


def _prefill_subject(ledger: Any, n: int) -> None:
    with ledger.lock() as pending:
        for symbol in _book_symbols(n):
            pending.reserve(symbol, NOTIONAL)


def ledger_pending_count(ledger: Any) -> int:
    with ledger.lock() as pending:
        return len(pending)


@dataclass(frozen=True)
class Mode:
    name: str
    rounds: int  # interleaved repeats of each single-thread measurement
    batch_s: float  # target duration of one timed batch
    book_sizes: tuple[int, ...]
    port_max_book: int  # the port is O(N) per decision: bigger books are skipped
    threads: tuple[int, ...]
    peer_threads: tuple[int, ...]  # thread counts the floor and the port are run at
    contention_rounds: int
    window_s: float
    switch_interval: float  # 0: no extra row with sys.setswitchinterval
    mem_book: int
    mem_cycles: int  # reserve/release cycles traced for the no-growth check


QUICK = Mode(
    name="quick",
    rounds=5,
    batch_s=0.02,
    book_sizes=(10, 1_000, 10_000, 100_000),
    port_max_book=10_000,
    threads=(1, 4, 16, 64),
    peer_threads=(1, 64),
    contention_rounds=2,
    window_s=0.4,
    switch_interval=0.0,
    mem_book=20_000,
    mem_cycles=50_000,
)

FULL = Mode(
    name="full",
    rounds=9,
    batch_s=0.1,
    book_sizes=(10, 100, 1_000, 10_000, 100_000),
    port_max_book=100_000,
    threads=(1, 4, 16, 64),
    peer_threads=(1, 4, 16, 64),
    contention_rounds=3,
    window_s=1.5,
    switch_interval=1.0,
    mem_book=100_000,
    mem_cycles=1_000_000,
)


# --- results and targets --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    kind: str  # "max": value must be <= limit; "min": value must be >= limit
    unit: str = "x"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit

    def margin(self) -> str:
        if self.value is None:
            return "not measured"
        if self.kind == "max":
            slack = (self.limit - self.value) / self.limit
        else:
            slack = (self.value - self.limit) / self.limit
        word = "headroom" if slack >= 0 else "short"
        return f"{abs(slack) * 100:.0f}% {word}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "kind": self.kind,
            "unit": self.unit,
            "passed": self.passed,
            "margin": self.margin(),
            "note": self.note,
        }


@dataclass
class Results:
    meta: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    # (title, headers, rows) of every printed table, for --markdown
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


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


def _markdown(results: Results) -> str:
    def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        return out

    lines: list[str] = []
    for title, headers, rows in results.tables:
        lines += [f"**{title}**", "", *table(headers, rows), ""]
    lines += ["**Targets**", "", *table(*_target_rows(results)), ""]
    return "\n".join(lines)


# --- single-thread timing -------------------------------------------------------------------------


def _cycle(symbols: Sequence[str], n: int) -> list[str]:
    return [symbols[i % len(symbols)] for i in range(n)]


class _Timed:
    """One thing to time: ``run(symbols)`` does one operation per symbol."""

    def __init__(self, label: str, run: Callable[[list[str]], None]) -> None:
        self.label = label
        self.run = run
        self.symbols: list[str] = []
        self.samples: list[float] = []  # ns per operation, one per round

    def calibrate(self, batch_s: float, min_ops: int = 3, max_ops: int = 500_000) -> None:
        n = 16
        while True:
            symbols = _cycle(HOT, n)
            t0 = _ns()
            self.run(symbols)
            elapsed = _ns() - t0
            if elapsed >= batch_s * 1e9 / 8 or n >= max_ops:
                break
            n *= 4
        per_op = elapsed / n
        ops = int(min(max_ops, max(min_ops, batch_s * 1e9 / per_op)))
        self.symbols = _cycle(HOT, ops)

    def once(self) -> float:
        symbols = self.symbols
        t0 = _ns()
        self.run(symbols)
        per_op = (_ns() - t0) / len(symbols)
        self.samples.append(per_op)
        return per_op


def _interleave(timed: Sequence[_Timed], rounds: int) -> list[dict[str, float]]:
    """Run every item once per round, rotating the order; return each round's ns/op by label."""
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        gc.collect()
        order = list(timed[r % len(timed) :]) + list(timed[: r % len(timed)])
        per_round.append({item.label: item.once() for item in order})
    return per_round


def _ratio(per_round: Sequence[dict[str, float]], top: str, bottom: str) -> float:
    return _median([r[top] / r[bottom] for r in per_round])


def _floor_timed(label: str, book_size: int) -> _Timed:
    lock = threading.Lock()
    book: dict[str, Any] = dict.fromkeys(_book_symbols(book_size), NOTIONAL)
    return _Timed(label, lambda symbols: floor_loop(lock, book, symbols, NOTIONAL))


def _gate_timed(label: str, gate: Any, positions: dict[str, float] | None = POSITIONS) -> _Timed:
    try_enter = gate.try_enter
    return _Timed(label, lambda symbols: gate_loop(try_enter, symbols, NOTIONAL, positions))


def bench_floor(mode: Mode, results: Results) -> None:
    _say("== Floor ratio: one admitted try_enter + release of its reservation, empty book ==")
    _, gate = _subject()
    _, port = _port()
    # The target row passes no open positions: the gate's own cost against the floor's. The
    # "+3 positions" rows add the O(positions) work every gate does on a real position cache.
    items = [
        _floor_timed("floor", 0),
        _gate_timed("pendingledger", gate, NO_POSITIONS),
        _gate_timed("port", port, NO_POSITIONS),
        _gate_timed("pendingledger+pos", gate, POSITIONS),
        _gate_timed("port+pos", port, POSITIONS),
    ]
    if hasattr(gate, "set_position"):  # the gate's own position book: positions=None
        _, owned_empty = _subject()
        _, owned = _subject()
        for symbol, exposure in POSITIONS.items():
            owned.set_position(symbol, exposure)
        items += [
            _gate_timed("pendingledger owned", owned_empty, None),
            _gate_timed("pendingledger owned+pos", owned, None),
        ]
    for item in items:
        item.calibrate(mode.batch_s)
        item.once()  # warm-up, discarded below
        item.samples.clear()
    per_round = _interleave(items, mode.rounds)
    cost = {item.label: _median(item.samples) for item in items}
    ratios = {item.label: _ratio(per_round, item.label, "floor") for item in items}
    ratio = ratios["pendingledger"]
    labels = {
        "floor": "floor (bare Lock + dict insert, then delete)",
        "pendingledger": "pendingledger try_enter + release (target)",
        "port": "straightforward port",
        "pendingledger+pos": "pendingledger, 3 open positions",
        "port+pos": "straightforward port, 3 open positions",
        "pendingledger owned": "pendingledger, own position book, empty",
        "pendingledger owned+pos": "pendingledger, own position book, 3 open",
    }
    rows = [
        [labels[item.label], _fmt_ns(cost[item.label]), f"{ratios[item.label]:.2f}x"]
        for item in items
    ]
    _show(results, "Floor ratio", ["per decision", "median cost", "vs floor"], rows)
    _say(f"({mode.rounds} interleaved rounds; ratio = median of per-round ratios)\n")
    results.sections["floor"] = {
        "ns_per_op": cost,
        "ratio_vs_floor": ratios,
        "per_round": per_round,
    }
    results.targets.append(
        Target("floor ratio (try_enter + release vs bare lock cycle)", ratio, 3.0, "max")
    )


def bench_book(mode: Mode, results: Results) -> None:
    _say("== Book size: cost per decision with N reservations outstanding ==")
    items: list[_Timed] = []
    subject_by_size: dict[int, _Timed] = {}
    port_by_size: dict[int, _Timed] = {}
    floor_by_size: dict[int, _Timed] = {}
    keep: list[Any] = []  # keep every ledger alive for the whole section
    for size in mode.book_sizes:
        ledger, gate = _subject()
        _prefill_subject(ledger, size)
        keep.append(ledger)
        subject_by_size[size] = _gate_timed(f"pendingledger@{size}", gate)
        floor_by_size[size] = _floor_timed(f"floor@{size}", size)
        items += [subject_by_size[size], floor_by_size[size]]
        if size <= mode.port_max_book:
            port_ledger, port = _port()
            port_ledger.prefill(_book_symbols(size), NOTIONAL)
            keep.append(port_ledger)
            port_by_size[size] = _gate_timed(f"port@{size}", port)
            items.append(port_by_size[size])
    for item in items:
        item.calibrate(mode.batch_s)
        item.once()
        item.samples.clear()
    per_round = _interleave(items, mode.rounds)
    # The book must not have moved: every timed decision was released again.
    for ledger in keep:
        count = ledger_pending_count(ledger) if hasattr(ledger, "stats") else len(ledger)
        if count not in mode.book_sizes:
            _say(f"warning: a benchmark book changed size during the run ({count})")

    smallest, largest = min(mode.book_sizes), max(mode.book_sizes)
    rows = []
    table: dict[str, dict[str, float | None]] = {}
    for size in mode.book_sizes:
        subject = _median(subject_by_size[size].samples)
        floor = _median(floor_by_size[size].samples)
        port = _median(port_by_size[size].samples) if size in port_by_size else None
        flat = _ratio(per_round, f"pendingledger@{size}", f"pendingledger@{smallest}")
        speedup = (
            _ratio(per_round, f"port@{size}", f"pendingledger@{size}")
            if size in port_by_size
            else None
        )
        table[str(size)] = {
            "pendingledger_ns": subject,
            "port_ns": port,
            "floor_ns": floor,
            "vs_smallest_book": flat,
            "port_over_pendingledger": speedup,
        }
        rows.append(
            [
                f"{size:,}",
                _fmt_ns(subject),
                f"{flat:.2f}x",
                _fmt_ns(port),
                "-" if speedup is None else f"{speedup:,.0f}x",
                _fmt_ns(floor),
            ]
        )
    _show(
        results,
        "Book size",
        [
            "outstanding",
            "pendingledger",
            f"vs {smallest}",
            "straightforward port",
            "port / pendingledger",
            "floor",
        ],
        rows,
    )
    _say(
        f"({mode.rounds} interleaved rounds over all sizes; "
        "ratios are medians of per-round ratios)\n"
    )
    results.sections["book"] = {"sizes": list(mode.book_sizes), "by_size": table}
    results.targets.append(
        Target(
            f"flat in book size (cost at {largest:,} / cost at {smallest})",
            table[str(largest)]["vs_smallest_book"],
            1.3,
            "max",
        )
    )
    speedup_10k = table.get("10000", {}).get("port_over_pendingledger")
    results.targets.append(
        Target(
            "speed-up over the straightforward port at 10,000 outstanding",
            speedup_10k,
            100.0,
            "min",
        )
    )


# --- contention -----------------------------------------------------------------------------------


def _run_window(
    kind: str, nthreads: int, window_s: float, switch_interval: float | None = None
) -> tuple[float, list[int]]:
    """Start ``nthreads`` workers behind a barrier, count operations over a wall window.

    The workers stop themselves at a deadline fixed before the barrier opens (see
    ``baseline.py``), so the window does not depend on the main thread winning the GIL back.
    With ``switch_interval`` the interpreter's switch interval is set for the window only.
    """
    barrier = threading.Barrier(nthreads + 1)
    stop = [False]
    deadline = [0]
    outcomes: list[tuple[int, list[int]] | None] = [None] * nthreads
    errors: list[BaseException] = []
    if kind == "floor":
        lock = threading.Lock()
        book: dict[str, Any] = {}
    else:
        gate = _subject()[1] if kind.startswith("pendingledger") else _port()[1]
    # "pendingledger own book": the gate's own position book (positions=None), empty; the rest
    # pass the three open positions as a mapping, which the port needs.
    positions = None if kind == OWN_BOOK else POSITIONS

    def run(index: int) -> None:
        symbols = [f"T{index}S{j}" for j in range(8)]
        try:
            if kind == "floor":
                outcomes[index] = floor_worker(
                    lock, book, symbols, NOTIONAL, barrier=barrier, stop=stop, deadline=deadline
                )
            else:
                outcomes[index] = gate_worker(
                    gate.try_enter,
                    symbols,
                    NOTIONAL,
                    positions,
                    barrier=barrier,
                    stop=stop,
                    deadline=deadline,
                )
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)
            stop[0] = True
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(nthreads)]
    for thread in threads:
        thread.start()
    gc.collect()
    previous = sys.getswitchinterval()
    window_ns = int(window_s * 1e9)
    try:
        if switch_interval is not None:
            sys.setswitchinterval(switch_interval)
        deadline[0] = _ns() + window_ns  # the workers stop themselves there
        barrier.wait()
        time.sleep(window_s)
        for thread in threads:
            thread.join()
    finally:
        stop[0] = True
        sys.setswitchinterval(previous)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    total = sum(o[0] for o in outcomes if o is not None)
    latencies = [lat for o in outcomes if o is not None for lat in o[1]]
    return total / (window_ns / 1e9), latencies


def _percentile(sorted_values: Sequence[int], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def bench_contention(mode: Mode, results: Results) -> None:
    _say(
        "== Contention: threads released by a barrier, each looping try_enter + release on its "
        f"own symbols, {mode.window_s:g} s windows, "
        f"switch interval {sys.getswitchinterval():g} s =="
    )
    kinds = ("pendingledger", OWN_BOOK, "floor", "port")
    rates: dict[tuple[str, int], list[float]] = {}
    lats: dict[tuple[str, int], list[int]] = {}
    rounds: list[dict[str, float]] = []
    for _ in range(mode.contention_rounds):
        this_round: dict[str, float] = {}
        for nthreads in mode.threads:
            for kind in kinds:
                if kind != "pendingledger" and nthreads not in mode.peer_threads:
                    continue
                rate, latencies = _run_window(kind, nthreads, mode.window_s)
                rates.setdefault((kind, nthreads), []).append(rate)
                lats.setdefault((kind, nthreads), []).extend(latencies)
                this_round[f"{kind}@{nthreads}"] = rate
        rounds.append(this_round)

    most = max(mode.threads)
    rows = []
    table: dict[str, Any] = {}
    for kind in kinds:
        for nthreads in mode.threads:
            if (kind, nthreads) not in rates:
                continue
            rate = _median(rates[(kind, nthreads)])
            eff = _median([r[f"{kind}@{nthreads}"] / r[f"{kind}@1"] for r in rounds])
            ordered = sorted(lats[(kind, nthreads)])
            p50, p99 = _percentile(ordered, 0.50), _percentile(ordered, 0.99)
            table[f"{kind}@{nthreads}"] = {
                "kind": kind,
                "threads": nthreads,
                "ops_per_s": rate,
                "efficiency_vs_1_thread": eff,
                "p50_ns": p50,
                "p99_ns": p99,
                "latency_samples": len(ordered),
            }
            rows.append(
                [kind, str(nthreads), _fmt_rate(rate), f"{eff:.2f}", _fmt_ns(p50), _fmt_ns(p99)]
            )

    extra: dict[str, Any] = {}
    if mode.switch_interval > 0:
        # Not a target: shows how much of a subject's loss is the convoy (a long interval all
        # but removes switches while the lock is held). Set for the window only, then restored.
        window = max(mode.window_s, 4 * mode.switch_interval)
        for kind in ("pendingledger", "port"):
            rate, latencies = _run_window(kind, most, window, mode.switch_interval)
            ordered = sorted(latencies)
            eff = rate / _median(rates[(kind, 1)])
            extra[kind] = {
                "ops_per_s": rate,
                "efficiency_vs_1_thread": eff,
                "p50_ns": _percentile(ordered, 0.5),
                "p99_ns": _percentile(ordered, 0.99),
            }
            rows.append(
                [
                    f"{kind} (switch {mode.switch_interval:g} s)",
                    str(most),
                    _fmt_rate(rate),
                    f"{eff:.2f}",
                    _fmt_ns(extra[kind]["p50_ns"]),
                    _fmt_ns(extra[kind]["p99_ns"]),
                ]
            )

    headers = ["subject", "threads", "decisions/s", "vs 1 thread", "p50", "p99"]
    _show(results, "Contention", headers, rows)
    _say(
        f"({mode.contention_rounds} rounds; rate = median; efficiency = median of per-round "
        "ratios; latency of try_enter alone, 1 op in 9 sampled, pooled over rounds)\n"
    )
    results.sections["contention"] = {
        "window_s": mode.window_s,
        "switch_interval": sys.getswitchinterval(),
        "by_run": table,
        "extra_switch_interval": {"interval": mode.switch_interval, **extra} if extra else None,
    }
    results.targets.append(
        Target(
            f"contention efficiency ({most} threads / 1 thread, default switch interval)",
            table[f"pendingledger@{most}"]["efficiency_vs_1_thread"],
            0.6,
            "min",
        )
    )


# --- memory ---------------------------------------------------------------------------------------


def _traced_book(
    make: Callable[[], Any], fill: Callable[[Any, list[str]], Any], n: int
) -> dict[str, float]:
    symbols = _book_symbols(n, prefix="MEM")  # the caller's strings: not counted
    state = make()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        held = fill(state, symbols)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del held
    return {
        "current_per_reservation": (current - base) / n,
        "peak_per_reservation": (peak - base) / n,
    }


def _fill_subject(state: Any, symbols: list[str]) -> list[Any]:
    gate = state[1]
    held: list[Any] = [None] * len(symbols)
    try_enter = gate.try_enter
    for i, symbol in enumerate(symbols):
        held[i] = try_enter(symbol, NOTIONAL, POSITIONS).reservation
    return held


def _fill_port(state: Any, symbols: list[str]) -> list[Any]:
    # Filling through the port's try_enter is O(N^2); fill its dict directly and build the
    # Reservation the caller would hold for each entry, as _fill_subject keeps the real ones.
    ledger = state[0]
    ledger.prefill(symbols, NOTIONAL)
    return [Reservation(ledger, symbol) for symbol in symbols]


def _churn(gate: Any, ledger: Any, clock: Any, cycles: int, start: int) -> int:
    """Reserve/release cycles over every release path; the book is empty afterwards."""
    try_enter = gate.try_enter
    ttl_step = TTL + 1.0
    order = start
    symbols = HOT
    nsym = len(symbols)
    for i in range(cycles):
        order += 1
        symbol = symbols[i % nsym]
        reservation = try_enter(symbol, NOTIONAL, POSITIONS, order_id=order).reservation
        path = i & 7
        if path < 3:
            reservation.release()
        elif path == 3:
            ledger.release(symbol)
        elif path == 4:
            ledger.release_order(order)
        elif path == 5:
            reservation.reduce(NOTIONAL / 2)
            reservation.reduce(NOTIONAL / 2)
        elif path == 6:
            reservation.release()
            reservation.release()  # idempotent
        else:
            clock.advance(ttl_step)  # expires; dropped by the next acquisition
    with ledger.lock():
        pass
    return order


def bench_memory(mode: Mode, results: Results) -> None:
    _say("== Memory ==")
    n = mode.mem_book
    subject = _traced_book(_subject, _fill_subject, n)
    port = _traced_book(_port, _fill_port, n)

    from pendingledger.testing import ManualClock

    clock = ManualClock()
    ledger, gate = _subject(TTL, clock)
    order = _churn(gate, ledger, clock, 20_000, 0)  # warm-up: free lists, dict tables, counters
    cycles = mode.mem_cycles
    gc.collect()
    blocks0 = sys.getallocatedblocks()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = _ns()
        order = _churn(gate, ledger, clock, cycles, order)
        churn_s = (_ns() - t0) / 1e9
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - base
        blocks_growth = sys.getallocatedblocks() - blocks0
    finally:
        tracemalloc.stop()
    left = ledger_pending_count(ledger)
    stats = ledger.stats()

    rows = [
        [
            f"bytes per outstanding reservation ({n:,} held, caller keeps each Reservation)",
            _fmt_bytes(subject["current_per_reservation"]),
            _fmt_bytes(port["current_per_reservation"]),
        ],
        [
            "peak bytes per reservation while filling (tracemalloc)",
            _fmt_bytes(subject["peak_per_reservation"]),
            _fmt_bytes(port["peak_per_reservation"]),
        ],
        [f"traced growth after {cycles:,} reserve/release cycles", _fmt_bytes(traced_growth), "-"],
        [f"allocated blocks growth after {cycles:,} cycles", f"{blocks_growth:+d}", "-"],
        ["outstanding at the end (book must be empty)", str(left), "-"],
    ]
    _show(results, "Memory", ["memory", "pendingledger", "straightforward port"], rows)
    _say(
        "(cycles go through every release path: Reservation.release, ledger.release, "
        "release_order, reduce to zero, TTL expiry; after gc.collect(); "
        f"{cycles / churn_s / 1e3:.0f} k cycles/s under tracemalloc; "
        f"stats: outstanding={getattr(stats, 'outstanding', '?')}, "
        f"expired={getattr(stats, 'expired', '?')})\n"
    )
    results.sections["memory"] = {
        "book": n,
        "pendingledger": subject,
        "port": port,
        "cycles": cycles,
        "traced_growth_bytes": traced_growth,
        "allocated_blocks_growth": blocks_growth,
        "outstanding_at_end": left,
    }
    # "No growth": a leak of one small object per cycle would be megabytes here; allow 16 KiB
    # for allocator noise (free lists, a dict table resize). The book must be empty as well.
    results.targets.append(
        Target(
            f"no growth after {cycles:,} reserve/release cycles (traced bytes, book empty)",
            float(max(traced_growth, 0)) if left == 0 else float("inf"),
            16 * 1024.0,
            "max",
            unit=" B",
        )
    )


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
    try:
        commit = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        # An installed copy (CI installs a wheel, not the checkout): say which release it is.
        commit = f"{pendingledger.__version__} (installed, no git commit)"
    return {
        "mode": mode.name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "switch_interval": sys.getswitchinterval(),
        "pendingledger_commit": commit,
        "pendingledger_path": str(package_dir),
    }


def _target_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    rows = []
    for target in results.targets:
        passed = target.passed
        verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        bound = ("<= " if target.kind == "max" else ">= ") + f"{target.limit:g}{target.unit}"
        value = "-" if target.value is None else f"{target.value:.3g}{target.unit}"
        rows.append([target.name, value, bound, verdict, target.margin()])
    return ["target", "measured", "target", "verdict", "margin"], rows


def _summary(results: Results) -> str:
    return _table(*_target_rows(results))


def _plot(results: Results, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say(
            f"--plot {path}: matplotlib is not installed; get it with "
            "pip install 'pendingledger[bench]'  (or: pip install matplotlib)"
        )
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    book = results.sections.get("book")
    if book:
        by_size = book["by_size"]
        sizes = [int(s) for s in by_size]
        for key, label, style in (
            ("pendingledger_ns", "pendingledger", "o-"),
            ("port_ns", "straightforward port", "s--"),
            ("floor_ns", "floor (bare Lock + dict)", "^:"),
        ):
            points = [(s, by_size[str(s)][key]) for s in sizes if by_size[str(s)][key]]
            if points:
                left.plot([p[0] for p in points], [p[1] / 1e3 for p in points], style, label=label)
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("reservations outstanding")
        left.set_ylabel("cost per decision (us)")
        left.set_title("Cost vs book size")
        left.grid(True, which="both", alpha=0.3)
        left.legend()
    contention = results.sections.get("contention")
    if contention:
        by_run = contention["by_run"]
        for kind, label, style in (
            ("pendingledger", "pendingledger", "o-"),
            ("port", "straightforward port", "s--"),
            ("floor", "floor (bare Lock + dict)", "^:"),
        ):
            runs = sorted(
                (v["threads"], v["ops_per_s"]) for v in by_run.values() if v["kind"] == kind
            )
            if runs:
                right.plot([r[0] for r in runs], [r[1] for r in runs], style, label=label)
        right.set_xscale("log", base=2)
        right.set_yscale("log")
        right.set_xlabel("threads")
        right.set_ylabel("decisions per second (total)")
        right.set_title("Throughput vs threads")
        right.grid(True, which="both", alpha=0.3)
        right.legend()
    meta = results.meta
    fig.suptitle(
        f"pendingledger {meta['pendingledger_commit']} | CPython {meta['python']} | "
        f"{meta['cpu']} ({meta['cpus']} CPUs) | {meta['mode']} run"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _say(f"plot written to {path}")


SECTIONS: dict[str, Callable[[Mode, Results], None]] = {
    "floor": bench_floor,
    "book": bench_book,
    "contention": bench_contention,
    "memory": bench_memory,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="pendingledger benchmarks: floor ratio, book size, contention, memory.",
    )
    parser.add_argument("--quick", action="store_true", help="short run (under 30 s on 2 cores)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="draw the results as a PNG (matplotlib)")
    parser.add_argument(
        "--markdown", metavar="PATH", help="write the tables as Markdown (for the README)"
    )
    parser.add_argument(
        "--only",
        metavar="SECTION",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable): " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when any target is missed (default: print)"
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL

    try:
        from pendingledger import PendingEntryLedger, PortfolioGate  # noqa: F401
    except ImportError as exc:
        _say(f"pendingledger's core is not importable ({exc}); install it with pip install -e .")
        return 2

    started = time.perf_counter()
    results = Results(meta=_meta(mode))
    meta = results.meta
    _say(
        f"pendingledger benchmarks, {mode.name} run: CPython {meta['python']} on {meta['cpu']} "
        f"({meta['cpus']} CPUs), pendingledger {meta['pendingledger_commit']}\n"
    )
    section_s: dict[str, float] = {}
    for name, bench in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        bench(mode, results)
        section_s[name] = round(time.perf_counter() - t0, 1)
    results.meta["section_s"] = section_s
    elapsed = time.perf_counter() - started
    results.meta["elapsed_s"] = round(elapsed, 1)

    _say("== Targets ==")
    _say(_summary(results))
    failed = [t for t in results.targets if t.passed is False]
    _say(
        f"\n{len(results.targets) - len(failed)}/{len(results.targets)} targets met "
        f"in {elapsed:.1f} s ("
        + ", ".join(f"{name} {seconds:g} s" for name, seconds in section_s.items())
        + ")"
        + ("" if not failed or args.strict else "; a FAIL is reported, not asserted")
    )

    if args.json:
        payload = {
            "meta": results.meta,
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
