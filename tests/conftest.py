"""Shared fixtures: a manual clock, a ledger and gate on it, tiny thread switch intervals, and a
real redis-server (one per test module) with a client for the Redis tests.

Also the build check: the report header names the build imported (compiled by mypyc or pure
Python) and the interpreter, and ``PENDINGLEDGER_EXPECT_BUILD=compiled|pure`` (set by .ci/run)
fails the session at its start if the build imported is another, because a failed mypyc compile
falls back to the pure build with only a warning in pip's output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from gaps import Gap, hold_first_call
from redis_server import RedisServer, running_server

import pendingledger
from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits, _core
from pendingledger.testing import ManualClock

TTL = 30.0


def imported_build() -> str:
    return "compiled" if pendingledger.COMPILED else "pure"


def pytest_report_header(config: pytest.Config) -> list[str]:
    version = ".".join(map(str, sys.version_info[:3]))
    return [
        f"pendingledger build: {imported_build()} (_core: {_core.__file__})",
        f"interpreter: {sys.implementation.name} {version} ({sys.executable})",
    ]


def pytest_sessionstart(session: pytest.Session) -> None:
    expected = os.environ.get("PENDINGLEDGER_EXPECT_BUILD", "")
    if not expected:
        return
    if expected not in ("compiled", "pure"):
        problem = f"PENDINGLEDGER_EXPECT_BUILD={expected!r} is not 'compiled' or 'pure'"
    elif imported_build() != expected:
        problem = f"expected the {expected} build, imported the {imported_build()} one"
    elif session.config.rootpath in Path(pendingledger.__file__).resolve().parents:
        # The installed package is under test, not the checkout (.ci/run uses python -P).
        problem = "pendingledger was imported from the source tree, not the installed package"
    else:
        return
    pytest.exit(f"build check: {problem} (_core: {_core.__file__})", pytest.ExitCode.USAGE_ERROR)


@pytest.fixture
def clock() -> ManualClock:
    """A clock that only moves on ``advance()``: TTL tests never sleep."""
    return ManualClock()


@pytest.fixture
def ledger(clock: ManualClock) -> PendingEntryLedger:
    """A ledger on the manual clock with a 30 s TTL."""
    return PendingEntryLedger(TTL, clock=clock)


@pytest.fixture
def gate(ledger: PendingEntryLedger) -> PortfolioGate:
    """A gate with no limits at all (tests set ``gate.limits`` to what they need)."""
    return PortfolioGate(ledger, PortfolioLimits())


Unchanged = Callable[..., AbstractContextManager[None]]


@pytest.fixture
def unchanged() -> Unchanged:
    """``with unchanged(ledger, gate): ...`` asserts the body changed nothing observable.

    Compares ledger stats, what the ``PendingMap`` shows, and the gate's counters and owned
    position book before and after, and checks the lock is free afterwards.
    """

    @contextmanager
    def check(ledger: PendingEntryLedger, gate: PortfolioGate | None = None) -> Iterator[None]:
        stats = ledger.stats()
        book = snapshot(ledger)
        gate_stats = gate.stats() if gate is not None else None
        positions = gate.positions() if gate is not None else None
        yield
        with ledger.lock(timeout=0):  # the lock is free (LockTimeout otherwise)
            pass
        assert ledger.stats() == stats
        assert snapshot(ledger) == book
        if gate is not None:
            assert gate.stats() == gate_stats
            assert gate.positions() == positions

    return check


def snapshot(ledger: PendingEntryLedger) -> dict[str, object]:
    """Everything a ``PendingMap`` shows, for before/after comparisons."""
    with ledger.lock(timeout=0) as pending:
        symbols = sorted(pending, key=repr)
        return {
            "len": len(pending),
            "gross": pending.gross_notional(),
            "symbols": symbols,
            "per_symbol": [pending.symbol_notional(s) for s in symbols],
            "new_slots": pending.new_slots(lambda s: False),
        }


@pytest.fixture
def fast_switching() -> Iterator[float]:
    """Make CPython switch threads every microsecond so races show up; restore afterwards."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield sys.getswitchinterval()
    finally:
        sys.setswitchinterval(previous)


@pytest.fixture
def held_gap() -> Iterator[Gap]:
    """A ``between`` for ``BrokenGate`` whose first call waits (bounded) for the test."""
    with hold_first_call() as gap:
        yield gap


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port for this test module, stopped after it."""
    with running_server(Path(tmp_path_factory.mktemp("redis"))) as srv:
        yield srv


@pytest.fixture
def client(server: RedisServer) -> Iterator[Any]:
    """A redis client on ``server``."""
    redis = pytest.importorskip("redis")
    c = redis.Redis.from_url(server.url, socket_timeout=5)
    yield c
    c.close()
