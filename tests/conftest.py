"""Shared fixtures: a manual clock, a ledger and gate on it, tiny thread switch intervals, and a
real redis-server (one per test module) with a client for the Redis tests."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, running_server

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits
from pendingledger.testing import ManualClock

TTL = 30.0


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
