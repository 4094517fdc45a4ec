"""Faults: the store dies, restarts empty or with its data, flushes its scripts, stalls, or is a
read-only replica. Every ``try_enter`` that cannot be confirmed is denied, none is admitted on
doubt, and no exception reaches the strategy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis_server import CommandLog, running_server

from pendingledger import PortfolioLimits
from pendingledger.limits import Decision, DenyReason

redis = pytest.importorskip("redis")

from redis.backoff import AbstractBackoff, NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from pendingledger.redis import RedisGate, StoreUnavailable  # noqa: E402
from pendingledger.redis._library import ServerCode  # noqa: E402
from pendingledger.redis.testing import advance_server_clock  # noqa: E402

pytestmark = pytest.mark.redis
R = DenyReason
Limits = PortfolioLimits


def test_server_killed_mid_race(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running_server(tmp_path) as srv:
        limits = Limits(max_concurrent_positions=4, max_gross_exposure=1_000)
        gate = RedisGate.from_url(srv.url, limits, ttl=30, namespace="race", timeout=0.2)
        gate.restore({})
        results: list[tuple[float, Decision]] = []
        progress = threading.Condition()  # notified at each decision recorded in `results`
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker(i: int) -> None:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    decision = gate.try_enter(f"S{(i + n) % 6}", 100)
                    if decision.reservation is not None and n % 2:
                        decision.reservation.release()  # returns False once the server is gone
                except BaseException as exc:
                    with progress:
                        errors.append(exc)
                        progress.notify_all()
                    return
                with progress:
                    results.append((started, decision))
                    progress.notify_all()
                n += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        with caplog.at_level(logging.WARNING, logger="pendingledger.redis"):
            for t in threads:
                t.start()
            with progress:  # the race is going: decisions made, some of them admissions
                assert progress.wait_for(
                    lambda: errors or (len(results) >= 100 and any(d for _, d in results)),
                    timeout=20,
                ), "the race never got going"
                mark = len(results)
            srv.kill()
            killed_at = time.monotonic()
            with progress:  # each thread has had a go at the dead server
                assert progress.wait_for(
                    lambda: (
                        errors
                        or sum(t0 > killed_at for t0, _ in results[mark:]) >= 2 * len(threads)
                    ),
                    timeout=20,
                ), "no decision was attempted after the kill"
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors
        before = [d for t0, d in results if t0 < killed_at]
        after = [d for t0, d in results if t0 > killed_at]
        assert any(before), "the race never got going"
        assert after, "no decision was attempted after the kill"
        assert all(d.reason is R.BACKEND_UNAVAILABLE for d in after)
        assert "failed closed" in caplog.text
        # releases report failure, book writes raise: nothing escapes silently
        assert gate.release("S1") is False
        assert gate.release_order("nope") is False
        with pytest.raises(StoreUnavailable):
            gate.set_position("S1", 1)
        with pytest.raises(StoreUnavailable):
            gate.halt()
        assert gate.try_enter("S1", 1).reason is R.BACKEND_UNAVAILABLE  # still no exception
        gate.client.close()


def test_restarted_empty_the_marker_trips_until_restore(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        gate = RedisGate.from_url(
            srv.url, Limits(max_concurrent_positions=1), ttl=30, namespace="m"
        )
        gate.restore({"AAA": 10})
        assert gate.try_enter("AAA", 1)
        srv.restart()  # no persistence: book, reservations and scripts are gone
        reasons = [gate.try_enter("BBB", 1).reason for _ in range(3)]
        assert R.BOOK_NOT_RESTORED in reasons
        assert set(reasons) <= {R.BOOK_NOT_RESTORED, R.BACKEND_UNAVAILABLE}
        assert not gate.book_restored()
        gate.restore({"AAA": 10})  # what the exchange says
        assert gate.try_enter("AAA", 1)
        assert gate.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
        gate.client.close()


def test_restarted_with_all_its_data_the_book_stays_trusted(tmp_path: Path) -> None:
    """A restart that loses nothing (AOF, fsync always) keeps the book and the library: the
    fencing mark is where the clients left it, so nothing needs restoring."""
    with running_server(tmp_path, persistent=True) as srv:
        gate = RedisGate.from_url(
            srv.url, Limits(max_concurrent_positions=1), ttl=30, namespace="p"
        )
        gate.restore({})
        assert gate.try_enter("AAA", 1)
        srv.restart()
        decisions = [gate.try_enter("BBB", 1) for _ in range(2)]
        assert decisions[-1].reason is R.MAX_CONCURRENT_POSITIONS  # AAA's reservation survived
        assert gate.try_enter("AAA", 1)
        assert gate.audit() == []
        gate.client.close()


def test_function_flush_between_two_decisions(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        gate = RedisGate.from_url(
            srv.url, Limits(max_concurrent_positions=2), ttl=30, namespace="f"
        )
        gate.restore({})
        assert gate.try_enter("AAA", 1)
        gate.client.function_flush()
        with CommandLog(srv.url) as log:
            assert gate.try_enter("BBB", 1)
        assert log.commands == ["FCALL", "FUNCTION", "FCALL"]  # not found, LOAD, again
        assert gate.try_enter("CCC", 1).reason is R.MAX_CONCURRENT_POSITIONS
        gate.client.close()


def test_a_client_timeout_denies_and_a_late_reservation_only_over_blocks(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path) as srv:
        gate = RedisGate.from_url(
            srv.url, Limits(max_gross_exposure=100), ttl=30, namespace="t", timeout=0.1
        )
        gate.restore({})
        assert gate.try_enter("WARM", 1)
        assert gate.release("WARM")
        admin = redis.Redis.from_url(srv.url)
        probe = redis.Redis.from_url(srv.url, socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
        sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "1.0"))
        sleeper.start()
        deadline = time.monotonic() + 5
        while True:  # until the server is asleep: a PING is no longer answered
            try:
                probe.ping()
            except redis.TimeoutError:
                break
            assert time.monotonic() < deadline, "the server never went to sleep"
        # Denied by the client's timeout while the server sleeps (no timing assertion: the
        # reason itself shows the gate did not wait for the server to answer).
        decision = gate.try_enter("AAA", 60, order_id="slow")
        assert decision.reason is R.BACKEND_UNAVAILABLE
        assert gate.release_order("slow") is False
        with pytest.raises(StoreUnavailable):
            gate.set_position("AAA", 1)
        sleeper.join(5)
        # The request (and the client's retry, same token) ran once the server woke up: at most
        # one reservation, counted until its TTL runs out -- over-blocking, the safe direction.
        snap = gate.snapshot()
        assert set(snap.orders) <= {"slow"}
        assert gate.audit() == []
        advance_server_clock(gate, 30)
        assert gate.sweep() == len(snap.orders)
        assert gate.snapshot().orders == {}
        assert gate.try_enter("AAA", 100)
        admin.close()
        probe.close()
        gate.client.close()


def test_a_read_only_replica_denies(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        gate = RedisGate.from_url(srv.url, Limits(), ttl=30, namespace="ro")
        gate.restore({})
        assert gate.try_enter("AAA", 1, order_id="kept")
        admin = redis.Redis.from_url(srv.url)
        dead = srv.port + 1 if srv.port < 65535 else srv.port - 1
        admin.replicaof("127.0.0.1", dead)  # nothing listens there: a replica stuck read-only
        try:
            assert gate.try_enter("BBB", 1).reason is R.BACKEND_UNAVAILABLE
            assert gate.release_order("kept") is False
            with pytest.raises(StoreUnavailable):
                gate.set_position("AAA", 1)
        finally:
            admin.replicaof("NO", "ONE")
        assert gate.try_enter("BBB", 1)
        assert "kept" in gate.snapshot().orders
        assert gate.audit() == []
        admin.close()
        gate.client.close()


def test_an_unexpected_reply_is_a_denial(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running_server(tmp_path) as srv:
        gate = RedisGate.from_url(srv.url, Limits(), ttl=30, namespace="odd")
        gate.restore({})

        def garbage(self: ServerCode, op: str, *args: Any) -> list[Any]:
            return [b"?"]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ServerCode, "call", garbage)
            with caplog.at_level(logging.WARNING, logger="pendingledger.redis"):
                assert gate.try_enter("AAA", 1).reason is R.BACKEND_UNAVAILABLE
        assert "unexpected reply" in caplog.text
        assert gate.stats().denied[R.BACKEND_UNAVAILABLE] == 1
        gate.client.close()


# ---------------------------------------------------------------------------- lost replies

# Keeps the server busy (nothing else runs) for ARGV[1] microseconds of its own clock.
BUSY_SCRIPT = """
local t0 = redis.call('TIME')
local start = tonumber(t0[1]) * 1000000 + tonumber(t0[2])
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start >= tonumber(ARGV[1]) then return 1 end
end
"""


class AfterTheStall(AbstractBackoff):
    """A client's retry backoff that waits, before the retry, until the server is free again and
    the first attempt has run there (``applied()``): the first attempt's reply is lost to the
    client's timeout, and the retry reaches the server only after the first attempt ran."""

    def __init__(self, stall_over: threading.Event, applied: Callable[[], bool]) -> None:
        self.stall_over = stall_over
        self.applied = applied
        self.then: Callable[[], object] = lambda: None
        self.retries = 0

    def reset(self) -> None:
        pass

    def compute(self, failures: int) -> float:
        self.retries += 1
        assert self.stall_over.wait(10), "the busy script never ended"
        deadline = time.monotonic() + 10
        while not self.applied():  # the first attempt runs as soon as the server is free
            assert time.monotonic() < deadline, "the first attempt never ran"
        self.then()
        return 0

    def __deepcopy__(self, memo: object) -> AfterTheStall:
        return self  # redis-py copies the Retry into each connection: keep this one object


def test_a_retry_after_a_lost_reply_gets_the_first_answer(tmp_path: Path) -> None:
    """Each call times out on the client while the server is busy, runs once the server is free,
    and the client's retry (from_url's default: one) must get that first call's answer."""
    with running_server(tmp_path) as srv:
        admin = redis.Redis.from_url(srv.url, socket_timeout=10)
        ns, fresh = "lost", "lost-unrestored"
        admin_gate = RedisGate(admin, Limits(), ttl=30, namespace=ns)
        admin_gate.restore({"CLOSE": 5, "POS": 1})
        stall_over = threading.Event()
        keys = admin_gate.keys
        fresh_keys = RedisGate(admin, Limits(), ttl=30, namespace=fresh).keys
        gates: dict[str, tuple[RedisGate, AfterTheStall]] = {}

        def retrying_gate(name: str, applied: Callable[[], bool], namespace: str = ns) -> RedisGate:
            backoff = AfterTheStall(stall_over, applied)
            client = redis.Redis.from_url(
                srv.url, socket_timeout=0.2, socket_connect_timeout=5, retry=Retry(backoff, 1)
            )
            gate = RedisGate(client, Limits(), ttl=30, namespace=namespace)
            gates[name] = (gate, backoff)
            return gate

        def gone(order_id: str) -> Callable[[], bool]:
            return lambda: (admin.hget(keys[0], f"o:{order_id}") or b"~").startswith(b"~")

        # Each call's handle is made (and its connection opened) before the server stalls.
        fill = retrying_gate("confirm_fill", gone("fill"))
        assert fill.try_enter("FILL", 1, order_id="fill")
        rel = retrying_gate("Reservation.release", gone("rel"))
        rel_handle = rel.try_enter("REL", 1, order_id="rel").reservation
        relo = retrying_gate("release_order", gone("relo"))
        assert relo.try_enter("RELO", 1, order_id="relo")
        red = retrying_gate("Reservation.reduce", gone("red"))
        red_handle = red.try_enter("RED", 2, order_id="red").reservation
        sym = retrying_gate("release", gone("sym"))
        assert sym.try_enter("SYM", 1, order_id="sym")
        close = retrying_gate("close_position", lambda: not admin.hexists(keys[0], "p:CLOSE"))
        close.positions()
        pos = retrying_gate("set_position", lambda: admin.hget(keys[0], "p:POS") == b"7000000000")
        pos.positions()
        # another process writes POS after the first attempt, before the retry arrives
        gates["set_position"][1].then = lambda: admin_gate.set_position("POS", 9)
        restore = retrying_gate(
            "restore", lambda: admin.hexists(fresh_keys[0], "state"), namespace=fresh
        )
        restore.positions()
        assert rel_handle is not None and red_handle is not None

        calls: dict[str, Callable[[], object]] = {
            "confirm_fill": lambda: fill.confirm_fill("fill", 1),
            "Reservation.release": rel_handle.release,
            "release_order": lambda: relo.release_order("relo"),
            "Reservation.reduce": lambda: red_handle.reduce(2),
            "release": lambda: sym.release("SYM"),
            "close_position": lambda: close.close_position("CLOSE"),
            "set_position": lambda: pos.set_position("POS", 7),
            "restore": lambda: restore.restore({"AAA": 1}, [("BBB", 1, "b")], only_if_missing=True),
        }
        answers: dict[str, object] = {}

        def call(name: str) -> None:
            try:
                answers[name] = calls[name]()
            except BaseException as exc:
                answers[name] = exc

        probe = redis.Redis.from_url(srv.url, socket_timeout=0.05, retry=Retry(NoBackoff(), 0))

        def stall() -> None:
            admin.eval(BUSY_SCRIPT, 0, 1_000_000)
            stall_over.set()

        staller = threading.Thread(target=stall)
        staller.start()
        deadline = time.monotonic() + 5
        while True:  # until the server is busy: a PING is no longer answered
            try:
                probe.ping()
            except redis.TimeoutError:
                break
            assert time.monotonic() < deadline, "the server never got busy"
        threads = [threading.Thread(target=call, args=(name,)) for name in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        staller.join(10)

        for name, (_, backoff) in gates.items():
            assert backoff.retries == 1, f"{name}: the first attempt's reply was not lost"
        made = answers.pop("restore")
        assert isinstance(made, list) and [r.order_id for r in made] == ["b"], made
        assert answers == {
            "confirm_fill": True,
            "Reservation.release": True,
            "release_order": True,
            "Reservation.reduce": True,
            "release": True,
            "close_position": True,
            "set_position": None,
        }
        assert not red_handle.active
        assert red_handle.notional == 2  # ended, it keeps what it held (as in process)
        snap = admin_gate.snapshot()
        assert snap.positions == {"FILL": 1_000_000_000, "POS": 9_000_000_000}  # not set back
        assert snap.orders == {}
        stats = admin_gate.stats()  # each call counted once
        assert (stats.admitted, stats.filled, stats.released) == (5, 2, 3)
        assert admin_gate.audit() == []
        assert RedisGate(admin, Limits(), ttl=30, namespace=fresh).stats().restored == 1
        for gate, _ in gates.values():
            gate.client.close()
        probe.close()
        admin.close()
