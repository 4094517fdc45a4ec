"""``race --backend redis``: the simulated app across processes on a real redis-server.

The race itself runs the spawned processes for about a second per gate; its figures come back
through the command line (table, verdict, ``--json``). The other tests pin what the harness
relies on: the shared-state reading leaves out what the gate does not count, stopping or losing
a worker leaves no process and no key behind. (Option errors are in ``test_cli.py``.)

No test sleeps for a TTL: the race's own TTL is the simulation's short one (1 s, waited out by
the run's drain, as in the demo), runs without lost orders do not wait at all, and the reading
test moves the namespace's server-side clock (``pendingledger.redis.testing``).
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from redis_server import RedisServer

from pendingledger import PortfolioLimits, Side, cli
from pendingledger.sim import SimConfig, SimulationError

redis = pytest.importorskip("redis")

from pendingledger.redis.testing import advance_server_clock, enable_test_ops  # noqa: E402
from pendingledger.sim.processes import ProcessRace  # noqa: E402
from pendingledger.sim.redis_backend import (  # noqa: E402
    RedisBackend,
    SharedAudit,
    redis_latch_race,
)

# A race whose orders are all answered: nothing waits for a TTL at the end.
ANSWERED = SimConfig(seconds=30.0, threads=4, seed=3, outcome_weights=(0.2, 0.5, 0.3, 0.0))


def _keys(server: RedisServer) -> list[bytes]:
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    try:
        return list(client.keys("*"))
    finally:
        client.close()


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_the_race_across_processes_catches_the_broken_gate_and_pendingledger_holds(
    server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "race.json"
    argv = ["race", "--backend", "redis", "--redis-url", server.url, "--processes", "2",
            "--seconds", "1", "--seed", "5", "--json", str(path)]  # fmt: skip
    assert cli.main(argv) == 0

    out, err = capsys.readouterr()
    assert "16 threads in 2 processes" in out and "redis backend" in out
    assert "shared-state readings over a limit" in out
    verdict = " ".join(out.rstrip().split("\n\n")[-1].splitlines())  # wrapped to 80 columns
    assert verdict.startswith("PASS: the broken gate breached")
    assert [line for line in out.splitlines() if len(line) > 80] == []
    assert "race: broken gate: 16 threads in 2 processes" in err

    data = json.loads(path.read_text())
    assert data["backend"] == "redis" and data["processes"] == 2 and data["ok"] is True
    for key in ("broken", "pendingledger"):
        run = data[key]
        for figure in ("decisions", "admitted", "breaches", "samples", "sampled_breaches"):
            assert isinstance(run[figure], int), (key, figure)
        assert run["processes"] == 2 and run["backend"] == "redis"
        assert run["admitted"] > 0 and run["samples"] > 0
        assert run["decisions"] == run["admitted"] + sum(run["denied"].values())
        # every reservation ended exactly once, and nothing is left in the store
        ends = run["ended_released"] + run["ended_reduced"] + run["ended_expired"]
        assert ends == run["admitted"], (key, run)
        assert run["leaked"] == run["double_ended"] == run["ledger_outstanding"] == 0
        assert run["store_problems"] == 0
    good, broken = data["pendingledger"], data["broken"]
    assert good["breaches"] == good["sampled_breaches"] == 0, good["first_breach"]
    assert broken["breaches"] > 0
    for run in (good, broken):  # both sides traded, across the processes
        assert run["admitted_buys"] > 0 and run["admitted_sells"] > 0
        assert run["longs_opened"] > 0 and run["shorts_opened"] > 0
    assert "ORDERS ADMITTED AFTER THE LATCH" in out
    assert data["latch"]["pendingledger"]["admitted_after"] == 0
    assert data["latch"]["broken"]["admitted_after"] > 0
    assert _keys(server) == []  # both namespaces deleted
    assert multiprocessing.active_children() == []


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_stopping_the_race_drains_and_leaves_nothing_behind(server: RedisServer) -> None:
    race = ProcessRace(ANSWERED, redis_url=server.url, processes=2)
    started = threading.Event()

    def progress(_: object) -> None:
        if not started.is_set():  # the workers are racing: stop them (from another thread)
            started.set()
            threading.Thread(target=race.stop).start()

    result = race.run(progress)
    assert started.is_set()
    assert result.interrupted and result.ok
    assert result.processes == 2 and result.threads == 4
    assert _keys(server) == []
    assert multiprocessing.active_children() == []


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_worker_that_dies_fails_the_race_and_the_others_are_stopped(
    server: RedisServer,
) -> None:
    killed: list[int] = []

    def progress(_: object) -> None:
        if not killed:
            victim = multiprocessing.active_children()[0]
            killed.append(victim.pid or 0)
            victim.kill()

    race = ProcessRace(ANSWERED, redis_url=server.url, processes=2)
    with pytest.raises(SimulationError, match="ended without reporting"):
        race.run(progress)
    assert killed
    assert multiprocessing.active_children() == []
    assert _keys(server) == []


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_an_unreachable_server_is_reported_with_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["race", "--backend", "redis", "--redis-url", f"redis://127.0.0.1:{port}/0"]
    assert cli.main(argv) == 2
    assert "race: broken gate:" in capsys.readouterr().err
    assert multiprocessing.active_children() == []


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_a_reading_counts_worst_cases_by_side_and_leaves_expired_orders_out(
    server: RedisServer,
) -> None:
    """A reading takes each symbol's signed position and its pending orders by side, as the
    gate does (a sell against a long adds nothing), and leaves out reservations past their
    TTL that the store has not swept yet. A partial fill handed over with confirm_fill(filled=)
    is never counted twice."""
    limits = PortfolioLimits(max_concurrent_positions=2, max_gross_exposure=1_000)
    namespace = f"reading-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(server.url, namespace=namespace, limits=limits, ttl=30.0,
                           on_expire=lambda r: None, broken=False)  # fmt: skip
    gate = backend.gate.redis_gate
    unit = 10**9
    try:
        gate.restore({})
        audit = SharedAudit(gate, limits)
        assert backend.gate.try_enter("AAA", 1_000, order_id="o1", side=Side.BUY)
        assert backend.gate.confirm_fill("o1", 400, symbol="AAA", filled=400)
        reading = audit.read()
        assert reading.symbols == {"AAA": 1_000 * unit} and reading.over == ()
        assert backend.gate.try_enter("AAA", 300, order_id="o2", side=Side.SELL)  # reduces
        reading = audit.read()
        assert reading.symbols == {"AAA": 1_000 * unit} and reading.net == 1_000 * unit
        assert backend.gate.checks.figures()["breaches"] == 0

        advance_server_clock(gate, 30)  # o1 and o2 are now past their TTL, not yet swept
        assert set(gate.snapshot().orders) == {"o1", "o2"}
        reading = audit.read()
        assert reading.symbols == {"AAA": 400 * unit} and reading.positions == 1
    finally:
        gate.wipe()
        backend.close()


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_the_latch_race_on_redis_catches_the_broken_gate_and_pendingledger_holds(
    server: RedisServer,
) -> None:
    """Many threads entering one namespace while another records losses: nothing is admitted
    after the latching call returned; the check-then-reserve variant, its gap held open while
    the latch fires, is caught."""
    good = redis_latch_race(server.url, broken=False)
    broken = redis_latch_race(server.url, broken=True)
    assert good is not None and broken is not None
    assert good.latched and good.admitted_after == 0 and good.ok, good.first_breach
    assert good.entered_after == 8 * 20
    assert broken.latched and broken.admitted_after >= 1 and not broken.ok
    assert _keys(server) == []


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_the_broken_redis_gate_decides_like_the_real_one_when_nothing_races(
    server: RedisServer,
) -> None:
    limits = PortfolioLimits(
        max_concurrent_positions=2, max_gross_exposure=8_500, max_symbol_exposure=4_000
    )
    made = []
    for broken in (False, True):
        backend = RedisBackend(server.url, namespace=f"seq-{uuid.uuid4().hex[:8]}",
                               limits=limits, ttl=30.0, on_expire=lambda r: None,
                               broken=broken)  # fmt: skip
        backend.gate.redis_gate.restore({"AAA": 1_000})
        if broken:
            enable_test_ops(backend.gate.redis_gate)
        made.append(backend)
    script = [
        ("AAA", 3_000), ("AAA", 100), ("BBB", 2_000), ("CCC", 500), ("BBB", 2_000),
        ("BBB", 100), ("AAA", 1), ("DDD", 1), ("BBB", 1_000),
    ]  # fmt: skip
    try:
        for n, (symbol, notional) in enumerate(script):
            want, got = (b.gate.try_enter(symbol, notional, order_id=f"o{n}") for b in made)
            assert (got.admitted, got.reason) == (want.admitted, want.reason), (symbol, notional)
    finally:
        for backend in made:
            backend.gate.redis_gate.wipe()
            backend.close()


def test_threads_and_symbols_are_split_between_the_processes() -> None:
    race = ProcessRace(replace(ANSWERED, threads=3), redis_url="redis://unused/0", processes=1)
    assert [(c.threads, len(c.symbols), first) for c, first in race.shares()] == [(3, 16, 0)]
    split = ProcessRace(replace(ANSWERED, threads=5), redis_url="redis://unused/0", processes=2)
    shares = split.shares()
    assert [(c.threads, first) for c, first in shares] == [(3, 0), (2, 3)]
    assert set(shares[0][0].symbols).isdisjoint(shares[1][0].symbols)
    assert all(c.book == "gate" for c, _ in shares)
