"""Multi-process stress: 4 processes x 8 threads race one namespace on a real redis-server.

While they race, an auditor in the test process takes atomic snapshots of the namespace (one
script call each) and checks every one: no limit exceeded (open or reserved symbols, gross, per
symbol) and every incremental total equal to the total recomputed from the raw records. At the
end, once the namespace's clock is moved past the TTL (the server-side test clock of
``pendingledger.redis.testing``, not a sleep), every reservation must have ended exactly once:
the counters Redis kept
(admitted, released, filled, expired) must match what the workers' calls reported, nothing may
be outstanding, and no second release may ever have succeeded.

The same harness with the deliberately broken gate (check and reserve in two script calls) must
find breaches: a race test is only worth something if it can fail.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from redis_server import RedisServer

from pendingledger import PortfolioLimits

redis = pytest.importorskip("redis")

from pendingledger.redis import RedisGate, audit  # noqa: E402
from pendingledger.redis._audit import breaches  # noqa: E402
from pendingledger.redis.testing import advance_server_clock, enable_test_ops  # noqa: E402

pytestmark = pytest.mark.redis

PROCESSES = 4
THREADS = 8
TTL = 0.5
LIMITS = PortfolioLimits(
    max_concurrent_positions=5, max_gross_exposure=1_000, max_symbol_exposure=Decimal("400")
)


@dataclass
class Outcome:
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    snapshots: int = 0
    problems: list[str] = field(default_factory=list)
    breaches: int = 0


def race(server: RedisServer, *, broken: bool, ops: int) -> tuple[Outcome, RedisGate]:
    import redis_stress_worker

    namespace = f"stress-{uuid.uuid4().hex[:8]}"
    gate = RedisGate.from_url(server.url, LIMITS, ttl=TTL, namespace=namespace, timeout=10)
    gate.restore({})
    if broken:
        enable_test_ops(gate)  # the broken gate's 'check' and 'force' are test operations
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Semaphore(0)
    start = ctx.Event()
    out = ctx.Queue()
    common = (server.url, namespace, LIMITS, TTL, THREADS, ops)  # pickled to each worker
    procs = [
        ctx.Process(target=redis_stress_worker.run, args=(*common, seed, broken, ready, start, out))
        for seed in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    outcome = Outcome()
    done = threading.Event()

    def auditor() -> None:
        while not done.is_set():
            snap = gate.snapshot()
            outcome.snapshots += 1
            found = audit(snap, LIMITS)
            outcome.breaches += len(breaches(snap, LIMITS))
            outcome.problems.extend(found[: 20 - len(outcome.problems)])

    watcher = threading.Thread(target=auditor)
    watcher.start()
    try:
        for _ in procs:  # every child connected, its threads waiting: the race starts together
            assert ready.acquire(timeout=30), "a worker process did not get ready"
        start.set()
        for _ in procs:
            result: dict[str, Any] = out.get(timeout=50)
            outcome.counts.update(result["counts"])
            outcome.errors.extend(result["errors"])
    finally:
        done.set()
        watcher.join(10)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return outcome, gate


def test_no_breach_and_every_reservation_ends_exactly_once(server: RedisServer) -> None:
    outcome, gate = race(server, broken=False, ops=120)
    counts = outcome.counts
    print(f"\n{outcome.snapshots} snapshots audited; calls reported: {dict(counts)}")
    assert not outcome.errors, outcome.errors[0]
    assert outcome.problems == []
    assert outcome.breaches == 0
    assert outcome.snapshots > 10
    assert counts["admitted"] > 50, counts
    assert sum(v for k, v in counts.items() if k.startswith("denied:")) > 100, counts
    assert counts["double_release"] == 0

    advance_server_clock(gate, TTL)  # the lost orders expire
    gate.sweep()
    stats = gate.stats()
    assert stats.outstanding == 0 and stats.gross_notional == 0
    assert stats.admitted == counts["admitted"]
    assert stats.released == counts["released"]
    assert stats.filled == counts["filled"]
    assert stats.expired == counts["lost"] + counts["late"]
    assert stats.admitted == stats.released + stats.filled + stats.expired
    assert stats.corrupt == 0
    assert gate.audit(LIMITS) == []
    gate.client.close()


def test_the_broken_gate_is_caught(server: RedisServer) -> None:
    outcome, gate = race(server, broken=True, ops=60)
    print(f"\nbroken gate: {outcome.breaches} breaches in {outcome.snapshots} snapshots")
    assert not outcome.errors, outcome.errors[0]
    assert outcome.breaches > 0, f"no breach found in {outcome.snapshots} snapshots"
    gate.client.close()


def test_limits_can_be_sent_to_another_process() -> None:
    """Spawned workers get their arguments pickled: limits must survive a round trip (a
    PortfolioLimits compiled by mypyc once raised FrozenInstanceError on unpickling)."""
    assert pickle.loads(pickle.dumps(LIMITS)) == LIMITS
    assert copy.deepcopy(LIMITS) == LIMITS
