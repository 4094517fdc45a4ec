"""``python -m pendingledger race``: the race, shown in one command.

Why: a new user should see the problem and the fix before reading any code. ``race`` runs the
simulated threaded trading app of ``pendingledger.sim`` twice on the same seed, first with a
broken gate (check under the lock, reserve in a second acquisition) and then with pendingledger's
``PortfolioGate``, and prints what an independent auditor saw: the broken gate lets the portfolio
go over its limits, pendingledger never does. The app trades both sides (longs, shorts, and
orders that reduce a position), so every figure is a worst case (``pendingledger.rules``).

What callers (and scripts) may rely on:

* ``main(argv)`` returns the exit status instead of exiting: 0 when the pendingledger run had no
  breach, every reservation ended exactly once and nothing was admitted after its loss latch,
  1 otherwise, 2 for bad options (argparse's
  message on stderr; a ``--json`` path that cannot be written is one, checked before any run),
  a race that could not run (Redis unreachable, a worker process failed), or a ``--json`` file
  that still could not be written after a PASS (after a FAIL the status stays 1), 130 on
  Ctrl-C at any point (one line on stderr; a run stops its threads before the interrupt
  leaves it).
* Every line written to stdout fits 80 columns, or a narrower terminal's width (long text
  wraps, wide tables split); the live progress line fits the terminal's width.
* ``--backend redis --redis-url URL`` races the same app across ``--processes`` processes on a
  running Redis server (``pendingledger.sim.processes``): a namespace of its own per run,
  deleted afterwards. It needs the ``redis`` extra; nothing imports it for the memory backend.
* The table and the one-line verdict go to stdout; the progress display goes to stderr (a live
  line when stderr is a terminal, a few plain lines otherwise).
* After the two runs, a loss latch race on each gate (``pendingledger.sim.latch``): threads
  entering while another records losses until the daily loss limit latches the gate; any order
  admitted after the latching call returned fails pendingledger's run like a breach.
* ``--strategies N`` (N >= 2; memory backend only) races N strategies sharing the account,
  each with a budget, the account with order caps of its own
  (``pendingledger.sim.strategies_config``): the header names the caps and the strategies, the
  table gains the order caps' denials and breaches and both by scope, and a table after it
  shows each scope's limits, then per gate each scope's peaks and breaches (a column each:
  the account, then the strategies). ``--backend redis`` with it is an argparse error.
* ``--json PATH`` writes ``{"broken": {...}, "pendingledger": {...}, "latch": {...}, ...}``:
  each run's figures (``SimResult.to_dict()``: at least ``decisions``, ``admitted``,
  ``breaches``) under its own key, and the latch races' (``LatchRaceResult.to_dict()``) under
  ``latch`` (null when the backend cannot race a latch); ``strategies`` and ``budgets`` (each
  strategy's limits), and in each run ``scopes`` (``SimResult.scopes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

from . import COMPILED
from .sim import (
    LIMIT_KINDS,
    BackendFactory,
    Progress,
    SimConfig,
    SimResult,
    Simulation,
    SimulationError,
)
from .sim import memory_backend as _memory_backend
from .sim.config import ACCOUNT, CAP_KINDS, strategies_config
from .sim.latch import LatchRaceResult, memory_latch_race

__all__ = ["BACKENDS", "main"]

BACKENDS: Final[dict[str, BackendFactory]] = {"memory": _memory_backend}
"""In-process backends ``race --backend`` can race; another store registers its factory here.
``--backend redis`` is not one: it runs across processes (``pendingledger.sim.processes``)."""

_MAX_THREADS: Final = 1024
_MAX_PROCESSES: Final = 64
_MAX_STRATEGIES: Final = 16
_DEFAULTS: Final = SimConfig()
_REDIS_PROCESSES: Final = 4  # --processes default with --backend redis
_REDIS_THREADS_PER_PROCESS: Final = 8  # --threads default with --backend redis, per process
_RUNS: Final = (("broken", "broken gate"), ("pendingledger", "pendingledger"))
# The lines race prints to stdout fit a terminal's default 80 columns, or a narrower one's (down
# to 40), with the last column to spare: a line as wide as the terminal leaves the cursor past
# its end, and some terminals wrap it there onto a blank line.
_WIDTH: Final = 79
_NARROWEST: Final = 39


# --------------------------------------------------------------------------- option types


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= _MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {_MAX_THREADS}, got {text!r}")
    return value


def _process_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= _MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"must be between 1 and {_MAX_PROCESSES}, got {text!r}")
    return value


def _strategy_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= _MAX_STRATEGIES:
        raise argparse.ArgumentTypeError(f"must be between 0 and {_MAX_STRATEGIES}, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _position_limit(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 0 or 'none', got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or 'none'), got {text!r}")
    return value


def _amount_limit(text: str) -> int | float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or 'none', got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (or 'none'), got {text!r}")
    return int(value) if value.is_integer() else value


def _json_path(text: str) -> str:
    """A file race can write once both runs are done: checked now, so that a typo does not
    cost the runs (the file itself is neither created nor truncated here)."""
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {parent!r} does not exist")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r}: the file is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {parent!r} is not writable")
    return text


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser and its ``race`` subcommand's."""
    parser = argparse.ArgumentParser(
        prog="python -m pendingledger",
        description="pendingledger: race-free portfolio risk limits for threaded trading bots.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    race = commands.add_parser(
        "race",
        help="race a simulated trading bot on a broken gate, then on pendingledger's gate",
        description=(
            "Run a simulated threaded trading app (strategy threads buying and selling, longs, "
            "shorts and orders that reduce a position, a simulated exchange with rejects, "
            "partial fills and lost orders, a fill router) twice on the same seed: first with "
            "a broken gate that checks the limits and reserves in two separate steps, then with "
            "pendingledger's gate. An independent auditor tracks the true exposure (signed "
            "positions plus orders in flight, as worst cases) and counts every admission that "
            "took it over a limit. Then, on each gate, threads enter while another records "
            "losses until the daily loss limit latches it: no order may be admitted after "
            "that. With --backend redis the app runs across processes on a shared Redis "
            "server, and the auditor reads the shared state."
        ),
        epilog=(
            "Exit status: 0 when the pendingledger run had no breach, every reservation "
            "ended exactly once and nothing was admitted after its loss latch, 1 otherwise, 2 "
            "for bad options (an unwritable --json path included) or a race that could not "
            "run (Redis unreachable, a worker process failed), 130 on Ctrl-C."
        ),
    )
    race.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=_DEFAULTS.seconds,
        metavar="S",
        help=f"How long each of the two runs races, in seconds (default {_DEFAULTS.seconds:g}).",
    )
    race.add_argument(
        "--threads",
        type=_thread_count,
        default=None,
        metavar="N",
        help=(
            "How many strategy threads race for entries, in all: with --backend redis they are "
            f"split between the processes (default {_DEFAULTS.threads}; with redis "
            f"{_REDIS_THREADS_PER_PROCESS} per process)."
        ),
    )
    race.add_argument(
        "--seed",
        type=_seed,
        default=None,
        metavar="N",
        help="Seed of the random order flow, to replay a run (default: a fresh one, printed).",
    )
    race.add_argument(
        "--max-positions",
        type=_position_limit,
        default=_DEFAULTS.max_positions,
        metavar="N",
        help=(
            "Most positions open or in flight at once, 'none' for no limit "
            f"(default {_DEFAULTS.max_positions})."
        ),
    )
    race.add_argument(
        "--max-gross",
        type=_amount_limit,
        default=_DEFAULTS.max_gross,
        metavar="X",
        help=(
            "Most gross exposure (open plus in flight), 'none' for no limit "
            f"(default {_DEFAULTS.max_gross})."
        ),
    )
    race.add_argument(
        "--max-symbol",
        type=_amount_limit,
        default=_DEFAULTS.max_symbol,
        metavar="X",
        help=(
            "Most exposure on any one symbol (open plus in flight), 'none' for no limit "
            f"(default {_DEFAULTS.max_symbol})."
        ),
    )
    race.add_argument(
        "--max-net",
        type=_amount_limit,
        default=_DEFAULTS.max_net,
        metavar="X",
        help=(
            "Most net exposure (the worst case of the whole book's signed sum: longs and "
            f"shorts offset), 'none' for no limit (default {_DEFAULTS.max_net})."
        ),
    )
    race.add_argument(
        "--strategies",
        type=_strategy_count,
        default=0,
        metavar="N",
        help=(
            "Trade as N strategies sharing the account (N >= 2; 0 or 1: for the account, the "
            "default), each with a budget of its own: a share of the account's positions, "
            "gross and net (together twice the account's), two thirds of its symbol exposure, "
            "and order caps (one order's notional, open orders in all and on a symbol, orders "
            "per interval), with the account's order caps set too, so that both scopes bind. "
            "The auditor checks every scope. Memory backend only."
        ),
    )
    race.add_argument(
        "--json",
        type=_json_path,
        metavar="PATH",
        default=None,
        help="Also write both runs' figures as JSON to PATH, under keys broken and pendingledger.",
    )
    race.add_argument(
        "--backend",
        choices=sorted({*BACKENDS, "redis"}),
        default="memory",
        help=(
            "Where the gate keeps its reservations: memory (the default: one process, in memory) "
            "or redis (a running Redis server, shared by --processes processes; needs "
            "--redis-url and the redis extra)."
        ),
    )
    race.add_argument(
        "--redis-url",
        metavar="URL",
        default=None,
        help=(
            "The Redis server to race against with --backend redis, e.g. "
            "redis://localhost:6379/0. Each run uses a namespace of its own (race-<uuid>) and "
            "deletes it afterwards."
        ),
    )
    race.add_argument(
        "--processes",
        type=_process_count,
        default=None,
        metavar="N",
        help=(
            f"How many processes race with --backend redis (default {_REDIS_PROCESSES}); "
            "each trades its own share of the symbols and runs its share of --threads. "
            "The memory backend runs in one process."
        ),
    )
    return parser, race


def _check_backend_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options that only make sense together; fills in the backend's defaults."""
    if args.strategies > 1 and args.backend != "memory":
        parser.error(
            f"--strategies {args.strategies} needs --backend memory: the race across "
            "processes trades for the account only"
        )
    if args.backend == "redis":
        if not args.redis_url:
            parser.error("--backend redis needs --redis-url URL (e.g. redis://localhost:6379/0)")
        if args.processes is None:
            args.processes = _REDIS_PROCESSES
        if args.threads is None:
            args.threads = min(_MAX_THREADS, _REDIS_THREADS_PER_PROCESS * args.processes)
        if args.processes > args.threads:
            parser.error(
                f"--processes {args.processes} needs at least as many --threads "
                f"(got {args.threads}): each process runs at least one"
            )
        if args.processes > len(_DEFAULTS.symbols):
            parser.error(
                f"--processes {args.processes}: at most {len(_DEFAULTS.symbols)}, one per symbol "
                "traded (each process trades its own symbols)"
            )
        return
    if args.redis_url is not None:
        parser.error(f"--redis-url only applies to --backend redis, not {args.backend}")
    if args.processes is not None and args.processes > 1:
        parser.error(
            f"--processes {args.processes} needs --backend redis: the {args.backend} backend "
            "keeps its reservations in one process"
        )
    args.processes = 1
    if args.threads is None:
        args.threads = _DEFAULTS.threads
    if args.strategies > args.threads:
        parser.error(
            f"--strategies {args.strategies} needs at least as many --threads "
            f"(got {args.threads}): each strategy trades in one at least"
        )


# --------------------------------------------------------------------------- output


def _num(value: float | None) -> str:
    if value is None:
        return "none"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def _seen(seen: int, limit: float | None) -> str:
    return _num(seen) + (" !" if limit is not None and seen > limit else "  ")


def _header(config: SimConfig, backend: str, processes: int, width: int = _WIDTH) -> str:
    """What was raced, on which backend and core build, each line wrapped to ``width``."""
    threads = f"{config.threads} threads" + (f" in {processes} processes" if processes > 1 else "")
    core = "compiled (mypyc)" if COMPILED else "pure Python"
    lines = [
        f"pendingledger race: {threads} x {config.seconds:g} s per gate, seed {config.seed}",
        f"{backend} backend; core: {core}",
        f"limits: positions {_num(config.max_positions)}, gross {_num(config.max_gross)}, "
        f"symbol {_num(config.max_symbol)}, net {_num(config.max_net)}",
    ]
    if _has_caps(config):
        lines.append("order caps: " + _caps_text(config))
    names = config.strategy_names()
    if names:
        lines.append(
            f"{len(names)} strategies ({names[0]} to {names[-1]}) share the account, each "
            "with a budget (below)"
        )
    return "\n".join(_wrap(line, width, indent="  ") for line in lines)


def _has_caps(config: SimConfig) -> bool:
    return any(
        value is not None
        for value in (
            config.max_order_notional,
            config.max_open_orders,
            config.max_open_orders_per_symbol,
            config.max_orders_per_interval,
        )
    )


def _rate_text(rate: tuple[int, float] | None) -> str:
    return "none" if rate is None else f"{rate[0]:,} per {rate[1]:g} s"


def _caps_text(config: SimConfig) -> str:
    return (
        f"order {_num(config.max_order_notional)}, open {_num(config.max_open_orders)}, "
        f"{_num(config.max_open_orders_per_symbol)} on a symbol, "
        f"{_rate_text(config.max_orders_per_interval)}"
    )


Latches = tuple[LatchRaceResult, LatchRaceResult]
"""The latch race's results, broken gate first."""


def _table(
    broken: SimResult, good: SimResult, latches: Latches | None = None, width: int = _WIDTH
) -> str:
    rows: list[tuple[str, Callable[[SimResult], str]]] = [
        ("decisions", lambda r: _num(r.decisions)),
        ("admitted: buys / sells", lambda r: f"{r.admitted_buys:,} / {r.admitted_sells:,}"),
        ("  of them reducing a position", lambda r: _num(r.reducing_admitted)),
        ("denied: max concurrent positions", lambda r: _num(r.denied["max_concurrent_positions"])),
        ("denied: max gross exposure", lambda r: _num(r.denied["max_gross_exposure"])),
        ("denied: max symbol exposure", lambda r: _num(r.denied["max_symbol_exposure"])),
        ("denied: max net exposure", lambda r: _num(r.denied.get("max_net_exposure", 0))),
    ]
    caps = any(_has_caps_result(r) for r in (broken, good))
    if caps:
        rows += [
            (f"denied: {reason.replace('_', ' ')}", _denied_of(reason)) for reason in _CAP_REASONS
        ]
    if good.strategies or broken.strategies:
        rows += [
            ("  of all denials, by a strategy's budget", lambda r: _num(_denied_by(r, False))),
            ("  of all denials, by the account's limits", lambda r: _num(_denied_by(r, True))),
        ]
    if broken.denied.get("lock_timeout") or good.denied.get("lock_timeout"):
        # The gate read the app's positions again and again while reservations kept ending.
        rows.append(("denied: lock timeout", lambda r: _num(r.denied.get("lock_timeout", 0))))
    rows += [
        ("orders rejected by the exchange", lambda r: _num(r.rejected)),
        ("orders filled in full", lambda r: _num(r.filled)),
        ("orders filled in parts", lambda r: _num(r.partially_filled)),
        ("orders never answered, expired by TTL", lambda r: f"{r.lost:,}/{r.expired:,}"),
        ("positions opened: long / short", lambda r: f"{r.longs_opened:,} / {r.shorts_opened:,}"),
        ("positions closed by the router", lambda r: _num(r.closes)),
        (
            f"highest concurrent positions (limit {_num(good.max_positions)})",
            lambda r: _seen(r.max_positions_seen, r.max_positions),
        ),
        (
            f"highest gross exposure (limit {_num(good.max_gross)})",
            lambda r: _seen(r.max_gross_seen, r.max_gross),
        ),
        (
            f"highest symbol exposure (limit {_num(good.max_symbol)})",
            lambda r: _seen(r.max_symbol_seen, r.max_symbol),
        ),
        (
            f"highest net exposure (limit {_num(good.max_net)})",
            lambda r: _seen(r.max_net_seen, r.max_net),
        ),
        ("BREACHES", lambda r: _num(r.breaches)),
    ]
    for kind in LIMIT_KINDS:
        rows.append((f"  of the {kind} limit", _breaches_of(kind)))
    if caps:
        for kind in CAP_KINDS:
            rows.append((f"  of the {_CAP_NAMES[kind]} cap", _cap_breaches_of(kind)))
    if good.strategies or broken.strategies:
        rows += [
            ("  at a strategy's budget", lambda r: _num(_breaches_at(r, False))),
            ("  at the account's limits", lambda r: _num(_breaches_at(r, True))),
        ]
    if good.processes > 1 or broken.processes > 1:
        rows.append(
            (
                "shared-state readings over a limit",
                lambda r: f"{r.sampled_breaches:,} / {r.samples:,}",
            )
        )
    rows.append(
        ("reservations leaked / ended twice", lambda r: f"{r.leaked:,} / {r.double_ended:,}")
    )
    cells = [("", "broken gate", "pendingledger")]
    cells += [(label, get(broken), get(good)) for label, get in rows]
    latch_cells = [] if latches is None else _latch_cells(*latches)
    layout = _layout([*cells, *latch_cells], 14, width)
    lines = [line for row in cells for line in _row_lines(row, *layout)]
    if latches is not None:
        good_latch = latches[1]
        title = (
            f"loss latch race: {good_latch.threads} threads enter while another records "
            f"losses to the limit ({good_latch.loss_limit:,})"
        )
        lines += ["", *textwrap.wrap(title, width, subsequent_indent="  ")]
        lines += [line for row in latch_cells for line in _row_lines(row, *layout)]
    return "\n".join(lines)


def _layout(rows: Sequence[Sequence[str]], min_col: int, width: int) -> tuple[int, list[int]]:
    """The label column's width and each value column's, to fit ``width`` columns: the values
    keep their widths, the labels get the room left."""
    cols = [max(min_col, *(len(row[i]) for row in rows)) for i in range(1, len(rows[0]))]
    room = max(16, width - sum(col + 2 for col in cols))
    return min(room, max(len(row[0]) for row in rows)), cols


def _row_lines(row: Sequence[str], width: int, cols: Sequence[int]) -> list[str]:
    """One row; a label wider than ``width`` wraps onto lines of its own (indented under it),
    and the values go on its last line."""
    label, *values = row
    indent = " " * (len(label) - len(label.lstrip()) + 2)
    *first, last = textwrap.wrap(label, width, subsequent_indent=indent) or [""]
    cells = "".join(f"  {value:>{col}}" for value, col in zip(values, cols, strict=True))
    return [*first, f"{last:<{width}}{cells}".rstrip()]


def _latch_cells(broken: LatchRaceResult, good: LatchRaceResult) -> list[tuple[str, str, str]]:
    """The latch race's rows: threads entering while another records losses of 1 until the
    daily loss limit latches the gate."""

    def latched(r: LatchRaceResult) -> str:
        return f"after {r.losses:,} losses" if r.latched else "never"

    rows: list[tuple[str, Callable[[LatchRaceResult], str]]] = [
        ("  latch fired", latched),
        ("  decisions begun after the latch", lambda r: _num(r.entered_after)),
        ("  ORDERS ADMITTED AFTER THE LATCH", lambda r: _num(r.admitted_after)),
    ]
    return [(label, get(broken), get(good)) for label, get in rows]


def _breaches_of(kind: str) -> Callable[[SimResult], str]:
    return lambda r: _num(r.breaches_by_limit[kind])


def _cap_breaches_of(kind: str) -> Callable[[SimResult], str]:
    return lambda r: _num(r.breaches_by_cap.get(kind, 0))


def _denied_of(reason: str) -> Callable[[SimResult], str]:
    return lambda r: _num(r.denied.get(reason, 0))


def _has_caps_result(result: SimResult) -> bool:
    account = result.scopes.get(ACCOUNT)
    if account is None:
        return False
    limits = account["limits"]
    return any(limits.get(name) is not None for name in _CAP_FIELDS)


def _denied_by(result: SimResult, account: bool) -> int:
    return sum(
        sum(figures["denied_here"].values())
        for scope, figures in result.scopes.items()
        if (scope == ACCOUNT) == account
    )


def _breaches_at(result: SimResult, account: bool) -> int:
    return sum(
        int(figures["breaches"])
        for scope, figures in result.scopes.items()
        if (scope == ACCOUNT) == account
    )


_CAP_REASONS: Final = (
    "max_order_notional",
    "max_open_orders",
    "max_open_orders_per_symbol",
    "max_orders_per_interval",
)
_CAP_FIELDS: Final = _CAP_REASONS
_CAP_NAMES: Final = {
    "order_notional": "order notional",
    "open_orders": "open orders",
    "symbol_orders": "open orders per symbol",
    "rate": "order rate",
}


# --------------------------------------------------------------------------- by scope


def _scope_tables(broken: SimResult, good: SimResult, width: int = _WIDTH) -> str:
    """With strategies: each scope's limits, then per gate each scope's peaks and breaches
    (one column per scope: the account, then each strategy)."""
    names = [ACCOUNT, *(name for name in good.scopes if name != ACCOUNT)]
    limit_rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("positions", lambda lim: _num(lim["max_concurrent_positions"])),
        ("gross exposure", lambda lim: _num(lim["max_gross_exposure"])),
        ("symbol exposure", lambda lim: _num(lim["max_symbol_exposure"])),
        ("net exposure", lambda lim: _num(lim["max_net_exposure"])),
        ("order notional", lambda lim: _num(lim["max_order_notional"])),
        ("open orders", lambda lim: _num(lim["max_open_orders"])),
        ("open orders on a symbol", lambda lim: _num(lim["max_open_orders_per_symbol"])),
        ("orders per window", lambda lim: _window(lim["max_orders_per_interval"])),
    ]
    peak_rows: list[tuple[str, str, str | None]] = [
        ("highest positions", "max_positions_seen", "max_concurrent_positions"),
        ("highest gross exposure", "max_gross_seen", "max_gross_exposure"),
        ("highest symbol exposure", "max_symbol_seen", "max_symbol_exposure"),
        ("highest net exposure", "max_net_seen", "max_net_exposure"),
        ("largest order", "max_order_seen", "max_order_notional"),
        ("most open orders", "max_open_orders_seen", "max_open_orders"),
        ("most open on a symbol", "max_symbol_orders_seen", "max_open_orders_per_symbol"),
        ("most in one rate window", "max_window_seen", "max_orders_per_interval"),
    ]
    limits: list[list[str]] = [["limits, by scope", *names]]
    for label, get in limit_rows:
        limits.append([f"  {label}", *(get(good.scopes[n]["limits"]) for n in names)])
    sections = [limits]
    for title, result in (("broken gate", broken), ("pendingledger", good)):
        section = [[f"{title}, by scope", *names]]
        section.append(["  decisions", *(_num(_scope_decisions(result, n)) for n in names)])
        section.append(
            [
                "  denied by its limits",
                *(_num(sum(result.scopes[n]["denied_here"].values())) for n in names),
            ]
        )
        for label, peak, limit in peak_rows:
            section.append(
                [f"  {label}", *(_peak_cell(result.scopes[n], peak, limit) for n in names)]
            )
        section.append(["  BREACHES", *(_num(result.scopes[n]["breaches"]) for n in names)])
        sections.append(section)
    return "\n\n".join(_scope_section(section, sections, width) for section in sections)


def _scope_section(section: list[list[str]], sections: list[list[list[str]]], width: int) -> str:
    """One section of the scope tables, its columns split into as many tables of ``width``
    columns as it takes (each repeating the labels); every section laid out alike."""
    rows = [row for each in sections for row in each]
    labels = max(len(row[0]) for row in rows)
    col = max(8, *(len(c) for row in rows for c in row[1:]))
    per_table = max(1, (width - labels) // (col + 2))
    tables = []
    for start in range(1, len(section[0]), per_table):
        lines = [
            (
                f"{row[0]:<{labels}}"
                + "".join(f"  {c:>{col}}" for c in row[start : start + per_table])
            ).rstrip()
            for row in section
        ]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _scope_decisions(result: SimResult, scope: str) -> int:
    if scope == ACCOUNT:
        return result.decisions  # every decision is checked against the account's limits
    return int(result.scopes[scope]["decisions"])


def _window(rate: Any) -> str:
    return "none" if rate is None else f"{rate[0]:,}/{rate[1]:g}s"


def _peak_cell(figures: dict[str, Any], peak: str, limit: str | None) -> str:
    seen = int(figures[peak])
    bound = None if limit is None else figures["limits"][limit]
    if isinstance(bound, (list, tuple)):
        bound = bound[0]  # a rate's count
    return _seen(seen, bound)


def _wrap(text: str, width: int = _WIDTH, indent: str = "") -> str:
    """``text`` in lines of ``width`` columns, options such as ``--seed 5`` kept whole."""
    return textwrap.fill(
        text, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def _verdict(broken: SimResult, good: SimResult, latches: Latches | None = None) -> str:
    latch_broken, latch_good = (None, None) if latches is None else latches
    latch_ok = latch_good is None or latch_good.ok
    if not good.ok or not latch_ok:
        problems = []
        if latch_good is not None and not latch_good.latched:
            problems.append("never latched on the daily loss limit")
        elif latch_good is not None and latch_good.admitted_after:
            problems.append(
                f"admitted {latch_good.admitted_after:,} order(s) after the loss latch fired "
                f"({latch_good.first_breach})"
            )
        if good.breaches or good.sampled_breaches:
            problems.append(f"breached the limits {good.breaches:,} times ({good.first_breach})")
        if good.sampled_breaches:
            problems.append(
                f"{good.sampled_breaches:,} of {good.samples:,} readings of the shared state were "
                "over a limit"
            )
        if good.store_problems:
            problems.append(f"the store's own audit failed in {good.store_problems:,} readings")
        if good.leaked or good.double_ended or good.ledger_outstanding:
            problems.append(
                f"lost track of reservations ({good.leaked} leaked, {good.double_ended} ended "
                f"twice, {good.ledger_outstanding} left in the ledger)"
            )
        return f"FAIL: pendingledger {'; '.join(problems)}. Replay with --seed {good.seed}."
    scopes = " at every scope" if good.strategies else ""
    held = f"pendingledger held every limit{scopes} in {good.decisions:,} decisions (0 breaches)"
    if latch_good is not None:
        held += " and admitted nothing after its loss latch"
    caught = ""
    if latch_broken is not None and latch_broken.admitted_after:
        n = latch_broken.admitted_after
        caught = f" and admitted {n:,} order{'' if n == 1 else 's'} past its loss latch"
    if broken.breaches or broken.sampled_breaches:
        return (
            f"PASS: the broken gate breached the limits {broken.breaches:,} times in "
            f"{broken.decisions:,} decisions{caught}; {held}."
        )
    return (
        f"PASS: {held}. The broken gate happened not to breach this time; "
        "try more --threads or --seconds."
    )


_BAR: Final = 24  # the progress bar's width, when the terminal has room for it


def _progress_line(label: str, progress: Progress, width: int) -> str:
    """The live line, at most ``width`` characters: the figures that fit (the breaches the
    last to go), and the bar if all of it fits too (a bar that shrank as the figures grew would
    jump about)."""
    head = f"  {label:<13} "
    figures = _progress_figures(progress, width - len(head))
    if len(head) + _BAR + 2 + len(figures) > width:
        return (head + figures.lstrip())[:width]
    share = 0.0 if progress.seconds <= 0 else min(1.0, progress.elapsed / progress.seconds)
    filled = int(share * _BAR)
    return f"{head}[{'#' * filled}{'-' * (_BAR - filled)}]{figures}"


def _progress_figures(progress: Progress, room: int) -> str:
    """The most figures that fit ``room`` (the shortest choice if none does)."""
    time_taken = f" {progress.elapsed:4.1f}/{progress.seconds:g} s"
    decisions = f"  decisions {progress.decisions:,}"
    admitted = f"  admitted {progress.admitted:,}"
    breaches = f"  breaches {progress.breaches:,}"
    choices = (
        time_taken + decisions + admitted + breaches,
        time_taken + decisions + breaches,
        time_taken + breaches,
    )
    return next((text for text in choices if len(text) <= room), choices[-1])


def _output_width(stream: TextIO) -> int:
    """``_WIDTH``, or less on a narrower terminal (down to ``_NARROWEST``)."""
    if not stream.isatty():
        return _WIDTH
    return max(_NARROWEST, min(_WIDTH, _columns(stream) - 1))


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to; ``shutil.get_terminal_size`` (COLUMNS,
    then stdout, then 80) when the stream cannot say, e.g. a terminal that reports 0."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size(fallback=(80, 24)).columns


class _ProgressDisplay:
    """A live line on a terminal; a start and an end line otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._label = ""

    def start(self, label: str, config: SimConfig, processes: int = 1) -> None:
        self._label = label
        if not self._live:
            where = f" in {processes} processes" if processes > 1 else ""
            self._write(
                f"race: {label}: {config.threads} threads{where} for {config.seconds:g} s "
                f"(seed {config.seed})...\n"
            )

    def update(self, progress: Progress) -> None:
        if not self._live:
            return
        self._write("\r\x1b[2K" + _progress_line(self._label, progress, _columns(self._stream) - 1))

    def done(self, result: SimResult) -> None:
        if self._live:
            self._write("\r\x1b[2K")
        else:
            self._write(
                f"race: {self._label}: done in {result.elapsed:.1f} s, {result.decisions:,} "
                f"decisions, {result.breaches:,} breaches\n"
            )

    def abort(self) -> None:
        if self._live:
            self._write("\r\x1b[2K")

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


# --------------------------------------------------------------------------- main


def _race(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    chosen: dict[str, Any] = {
        "seconds": args.seconds,
        "threads": args.threads,
        "seed": seed,
        "max_positions": args.max_positions,
        "max_gross": args.max_gross,
        "max_symbol": args.max_symbol,
        "max_net": args.max_net,
    }
    base = (
        strategies_config(args.strategies, **chosen)
        if args.strategies > 1
        else (SimConfig(**chosen))
    )
    run = _runner(args, err)
    if run is None:
        return 2
    display = _ProgressDisplay(err)
    results: dict[str, SimResult] = {}
    started = time.monotonic()
    label = ""
    try:
        for key, label in _RUNS:
            config = dataclasses.replace(base, broken=key == "broken")
            display.start(label, config, args.processes)
            results[key] = run(config, display.update)
            display.done(results[key])
        label = "loss latch"
        latches = _latch_races(args)
    except KeyboardInterrupt:
        display.abort()  # the live line goes; main writes the one line
        raise
    except _RaceFailed as exc:
        display.abort()
        err.write(f"race: {label}: {exc}\n")
        return 2
    broken, good = results["broken"], results["pendingledger"]
    width = _output_width(out)
    out.write(_header(base, args.backend, args.processes, width) + "\n\n")
    out.write(_table(broken, good, latches, width) + "\n\n")
    if base.strategies > 1:
        out.write(_scope_tables(broken, good, width) + "\n\n")
    verdict = _verdict(broken, good, latches)
    ok = good.ok and (latches is None or latches[1].ok)
    out.write(_wrap(verdict, width) + "\n")
    out.flush()
    if args.json is not None:
        document: dict[str, Any] = {
            "seed": seed,
            "threads": base.threads,
            "seconds": base.seconds,
            "backend": args.backend,
            "processes": args.processes,
            "limits": {
                "max_positions": base.max_positions,
                "max_gross": base.max_gross,
                "max_symbol": base.max_symbol,
                "max_net": base.max_net,
                "max_order_notional": base.max_order_notional,
                "max_open_orders": base.max_open_orders,
                "max_open_orders_per_symbol": base.max_open_orders_per_symbol,
                "max_orders_per_interval": base.max_orders_per_interval,
            },
            "strategies": base.strategies,
            "budgets": {
                name: dataclasses.asdict(budget) for name, budget in base.budgets().items()
            },
            "broken": broken.to_dict(),
            "pendingledger": good.to_dict(),
            "latch": None
            if latches is None
            else {"broken": latches[0].to_dict(), "pendingledger": latches[1].to_dict()},
            "ok": ok,
            "verdict": verdict,
            "wall_seconds": round(time.monotonic() - started, 3),
        }
        try:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.write("\n")
        except OSError as exc:
            err.write(f"race: cannot write --json {args.json}: {exc.strerror or exc}\n")
            return 2 if ok else 1  # a FAIL's status is not hidden by a file it could not write
    return 0 if ok else 1


def _latch_races(args: argparse.Namespace) -> Latches | None:
    """The loss latch race on the broken gate, then on pendingledger's (None: the backend
    cannot run it)."""
    if args.backend != "redis":
        return (memory_latch_race(broken=True), memory_latch_race(broken=False))
    from .redis import StoreUnavailable  # noqa: PLC0415 -- the redis extra, checked already
    from .sim.redis_backend import redis_latch_race  # noqa: PLC0415 -- needs it too

    try:
        broken = redis_latch_race(args.redis_url, broken=True)
        good = redis_latch_race(args.redis_url, broken=False)
    except (StoreUnavailable, SimulationError) as exc:
        raise _RaceFailed(str(exc)) from exc
    return None if broken is None or good is None else (broken, good)


class _RaceFailed(Exception):
    """A run could not be done (the store unreachable, a worker process failed)."""


_Run = Callable[[SimConfig, Callable[[Progress], object]], SimResult]


def _runner(args: argparse.Namespace, err: TextIO) -> _Run | None:
    """How to run one gate's race on the chosen backend (None, after a message, if it can't)."""
    if args.backend != "redis":
        backend = BACKENDS[args.backend]
        return lambda config, progress: Simulation(config, backend=backend).run(progress)
    try:
        from .redis import StoreUnavailable  # noqa: PLC0415 -- the redis extra, only if asked
        from .sim.processes import ProcessRace  # noqa: PLC0415 -- needs the redis extra too
    except ImportError as exc:
        err.write(
            f"race: --backend redis needs the redis client ({exc}): "
            "pip install '.[redis]' from a checkout\n"
        )
        return None
    url, processes = args.redis_url, args.processes

    def run(config: SimConfig, progress: Callable[[Progress], object]) -> SimResult:
        try:
            return ProcessRace(config, redis_url=url, processes=processes).run(progress)
        except (StoreUnavailable, SimulationError) as exc:
            raise _RaceFailed(str(exc)) from exc

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (see the module docstring)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # wherever it lands: the runs stopped their threads already
        return _interrupted()


def _interrupted() -> int:
    """Ctrl-C's one line on stderr (``__main__`` writes the same), and its exit status."""
    sys.stderr.write("race: interrupted\n")
    sys.stderr.flush()
    return 130


def _main(argv: Sequence[str] | None) -> int:
    parser, race = _parsers()
    try:
        args = parser.parse_args(argv)
        _check_backend_options(race, args)
    except SystemExit as exc:  # argparse exits 2 on bad options, 0 after --help
        return exc.code if isinstance(exc.code, int) else 2
    assert args.command == "race"  # argparse refuses any other
    return _race(args, sys.stdout, sys.stderr)
