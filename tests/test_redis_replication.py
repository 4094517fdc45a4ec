"""Replication, failover and snapshots: the fencing mark against a server that lost writes.

Real ``redis-server`` processes on loopback (``redis_replication_helpers``): a primary and a
replica linked with ``REPLICAOF``, every step waited for by polling ``INFO replication`` with a
deadline, so each scenario runs the same way every time.

One book throughout (limits: 2 positions, gross 100): the orders ``KEPT`` (AAA 30 + 20) reach
every copy; the orders ``LOST`` (BBB 25 + 25) are written where a later copy does not have them.
At the exchange all four are open, which puts the account at both limits: a stale book that
misses ``LOST`` would admit a third symbol (``true_decision`` is the in-process gate on the true
book, the oracle of what must be denied).

* Fail-back: the replica is promoted while the primary still takes ``LOST``; the primary then
  resyncs from it (``LOST`` gone) and is promoted back. The gate object that wrote ``LOST``
  carries a mark ahead of the server's: its next call withdraws the marker, so every process,
  a fresh one included, is denied with ``BOOK_NOT_RESTORED`` until ``restore`` with the true
  book. The broken variant: a fresh process that calls *before* that detection has no mark and
  trades on the stale book past the true limits (the fence lives in the processes that saw the
  lost writes). And the fence must survive such a process's writes, however many (see
  ``test_the_fence_holds_after_unmarked_writes_replace_the_lost_ones``).
* Restart from an older snapshot: ``SAVE``, ``LOST``, a crash; the reloaded book is behind the
  mark and fenced. The same sequence with ``LOST`` saved keeps the book trusted (no false fence).
* ``min_replicas``: an admission no replica acknowledged (the replica frozen or killed) is
  released and denied with ``BACKEND_UNAVAILABLE``; a gate that does not wait admits it on the
  primary alone (the broken variant). Bad arguments are refused by name.
* Failover to a replica that had everything: decisions go on without ``restore``, the mark came
  with the data; a replica promoted before the last writes is fenced (both directions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits
from pendingledger.limits import Decision, DenyReason
from pendingledger.testing import ManualClock

redis = pytest.importorskip("redis")

from redis.cluster import RedisCluster  # noqa: E402
from redis_replication_helpers import (  # noqa: E402
    admin,
    dataset_digest,
    link,
    promote,
    servers,
    stopped,
    wait_in_sync,
)

from pendingledger.redis import BookNotRestored, OpenOrder, RedisGate  # noqa: E402

pytestmark = pytest.mark.redis
R = DenyReason

LIMITS = PortfolioLimits(max_concurrent_positions=2, max_gross_exposure=100)
TTL = 3600.0  # nothing expires while a test runs
NS = "repl"
KEPT = (OpenOrder("AAA", 30, "o1"), OpenOrder("AAA", 20, "o2"))  # every copy gets these
LOST = (OpenOrder("BBB", 25, "o3"), OpenOrder("BBB", 25, "o4"))  # a later copy misses these
TRUE_BOOK = KEPT + LOST  # what the exchange says: all four orders are open

GateOn = Callable[..., RedisGate]


@pytest.fixture
def gate_on() -> Iterator[GateOn]:
    """``gate_on(server, **kwargs)``: a new gate object (a new process, as far as the fence
    goes: its mark starts at (0, 0)) on ``server``'s namespace ``NS``; closed at teardown."""
    made: list[RedisGate] = []

    def make(srv: RedisServer, **kwargs: Any) -> RedisGate:
        # A generous socket timeout: a loaded machine must not turn a slow reply into a denial.
        gate = RedisGate.from_url(srv.url, LIMITS, ttl=TTL, namespace=NS, timeout=10, **kwargs)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.client.close()


def admit(gate: RedisGate, orders: tuple[OpenOrder, ...]) -> None:
    for order in orders:
        decision = gate.try_enter(order.symbol, order.notional, order_id=order.order_id)
        assert decision.reservation is not None, (order, decision)


def true_decision(symbol: str, notional: int) -> Decision:
    """What a gate on the true book (``TRUE_BOOK``, every order at the exchange) decides."""
    oracle = PortfolioGate(PendingEntryLedger(TTL, clock=ManualClock()), LIMITS)
    admit_in_process = [
        oracle.try_enter(o.symbol, o.notional, order_id=o.order_id) for o in TRUE_BOOK
    ]
    assert all(admit_in_process)
    return oracle.try_enter(symbol, notional)


def book_mark(srv: RedisServer, gate_on: GateOn) -> tuple[int, int]:
    """The fencing mark (epoch, hw) the server's book holds, read by a throwaway gate object
    (a snapshot writes nothing and withdraws nothing)."""
    meta = gate_on(srv).snapshot().meta
    return int(meta.get("epoch", 0)), int(meta.get("hw", 0))


def book_orders(srv: RedisServer, gate_on: GateOn) -> list[str]:
    return sorted(gate_on(srv).snapshot().orders)


# ---------------------------------------------------------------------------------- fail-back


@contextmanager
def failed_back(tmp_path: Path, gate_on: GateOn) -> Iterator[tuple[RedisServer, RedisGate]]:
    """The issue's fail-back, up to the gate's next call: yields the primary M (back in charge,
    its book without ``LOST``) and the gate object G that wrote ``LOST`` through M."""
    with servers(tmp_path, "m", "s") as (m, s):
        am, as_ = admin(m), admin(s)
        try:
            link(as_, m)
            wait_in_sync(am, as_)
            g = gate_on(m)
            g.restore({})
            admit(g, KEPT)
            wait_in_sync(am, as_)  # S has KEPT
            kept_mark = g.server.mark.args()[:2]
            assert book_mark(s, gate_on) == kept_mark

            promote(as_)  # S is promoted; M is not told and keeps taking writes
            admit(g, LOST)  # M's history now has writes S never got
            epoch, hw, _ = g.server.mark.args()
            assert (epoch, hw) == (kept_mark[0], kept_mark[1] + 2)

            link(am, s)  # M becomes a replica of S and resyncs: LOST is gone from M
            wait_in_sync(as_, am)
            assert dataset_digest(am) == dataset_digest(as_)
            assert not am.hexists(g.keys[0], "o:o3") and not am.hexists(g.keys[0], "o:o4")

            promote(am)  # M is promoted back, S follows it again
            link(as_, m)
            wait_in_sync(am, as_)
            assert book_mark(m, gate_on) == kept_mark  # behind G's mark by the two lost writes
            assert book_orders(m, gate_on) == ["o1", "o2"]
            yield m, g
        finally:
            am.close()
            as_.close()


def test_fail_back_to_a_primary_that_lost_writes_is_fenced_until_restore(
    tmp_path: Path, gate_on: GateOn
) -> None:
    with failed_back(tmp_path, gate_on) as (m, g):
        # The stale book would admit CCC (one symbol, gross 50 there); the true one must not.
        assert true_decision("CCC", 25).reason is R.MAX_CONCURRENT_POSITIONS
        assert g.try_enter("CCC", 25).reason is R.BOOK_NOT_RESTORED  # its mark is ahead of M's

        fresh = gate_on(m)  # a process started after the detection: mark (0, 0)
        assert fresh.try_enter("CCC", 25).reason is R.BOOK_NOT_RESTORED  # the marker is gone
        assert not fresh.book_restored()
        with pytest.raises(BookNotRestored):
            fresh.set_position("CCC", 1)
        assert g.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED
        assert book_orders(m, gate_on) == ["o1", "o2"]  # nothing was reserved on the stale book

        assert g.restore({}, TRUE_BOOK) is not None  # the book as the exchange has it
        for gate in (g, fresh):
            assert gate.try_enter("CCC", 25).reason is R.MAX_CONCURRENT_POSITIONS
            assert gate.try_enter("AAA", 1).reason is R.MAX_GROSS_EXPOSURE
        assert g.release_order("o4")  # the exchange rejected o4: room for 25 on BBB
        assert fresh.try_enter("BBB", 25, order_id="o5")
        assert book_orders(m, gate_on) == ["o1", "o2", "o3", "o5"]
        assert g.audit(LIMITS) == []
        assert g.stats().denied[R.BOOK_NOT_RESTORED] == 3


def test_a_process_that_never_saw_the_lost_writes_trades_on_the_stale_book(
    tmp_path: Path, gate_on: GateOn
) -> None:
    """The broken variant, and the limitation it documents: the fence lives in the processes
    that saw the lost writes. One that starts after the fail-back and calls before any of them
    has no mark to be behind, and is admitted past the true limits."""
    with failed_back(tmp_path, gate_on) as (m, g):
        fresh = gate_on(m)
        stale = fresh.try_enter("CCC", 25, order_id="c1")
        assert stale.reservation is not None  # admitted on the stale book (AAA 50 only) ...
        truth = true_decision("CCC", 25)  # ... which the true book denies:
        assert truth.reason is R.MAX_CONCURRENT_POSITIONS
        true_gross = sum(o.notional for o in TRUE_BOOK) + 25  # with LOST at the exchange
        assert LIMITS.max_gross_exposure is not None
        assert true_gross > LIMITS.max_gross_exposure  # gross 125, and 3 symbols for 2

        # The process that wrote LOST is still ahead (1 write since, 2 lost) and trips the fence.
        assert g.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED
        assert fresh.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED


@pytest.mark.parametrize("writes", [2, 4], ids=["as-many-as-lost", "more-than-lost"])
def test_the_fence_holds_after_unmarked_writes_replace_the_lost_ones(
    tmp_path: Path, gate_on: GateOn, writes: int
) -> None:
    """G saw the two lost writes. A process without a mark then writes ``writes`` times on the
    stale book, which brings the book's write count back to G's mark or past it. G's next
    call must still find the book untrustworthy: its history is not the book's."""
    with failed_back(tmp_path, gate_on) as (m, g):
        fresh = gate_on(m)
        for n in range(writes // 2):  # an order the exchange rejected: admitted, released
            assert fresh.try_enter("CCC", 25, order_id=f"c{n}")  # admitted on the stale book
            assert fresh.release_order(f"c{n}")
        assert book_mark(m, gate_on)[1] == g.server.mark.args()[1] + writes - 2
        # The true book is at both limits: EEE would be the third symbol and pass gross 100.
        assert true_decision("EEE", 1).reason is R.MAX_CONCURRENT_POSITIONS
        assert g.try_enter("EEE", 1).reason is R.BOOK_NOT_RESTORED


# ---------------------------------------------------------------------------------- snapshot


@pytest.mark.parametrize(
    "lost_saved", [False, True], ids=["snapshot-before-the-last-writes", "snapshot-after-them"]
)
def test_restart_from_a_snapshot(tmp_path: Path, gate_on: GateOn, lost_saved: bool) -> None:
    """RDB only, saved by an explicit ``SAVE``. A snapshot taken before ``LOST`` reloads a book
    behind the gate's mark: fenced for the gate and for a fresh process until ``restore``. A
    snapshot taken after ``LOST`` reloads everything: the book stays trusted."""
    with servers(tmp_path, "rdb", rdb=True) as (srv,):
        a = admin(srv)
        try:
            g = gate_on(srv)
            g.restore({})
            admit(g, KEPT)
            assert a.save()
            admit(g, LOST)
            if lost_saved:
                assert a.save()
            mark = g.server.mark.args()[:2]
            srv.kill()  # a crash: only the last SAVE survives
            srv.start()
            client: Any = g.client
            client.connection_pool.disconnect()  # its next call opens a new connection
            a.connection_pool.disconnect()

            if not lost_saved:
                assert book_orders(srv, gate_on) == ["o1", "o2"]
                assert book_mark(srv, gate_on) == (mark[0], mark[1] - 2)
                assert g.try_enter("CCC", 25).reason is R.BOOK_NOT_RESTORED
                fresh = gate_on(srv)
                assert fresh.try_enter("CCC", 25).reason is R.BOOK_NOT_RESTORED
                with pytest.raises(BookNotRestored):
                    g.confirm_fill("o1", 30)
                assert book_orders(srv, gate_on) == ["o1", "o2"]
                g.restore({}, TRUE_BOOK)
            else:
                assert book_orders(srv, gate_on) == ["o1", "o2", "o3", "o4"]
                assert book_mark(srv, gate_on) == mark
                fresh = gate_on(srv)

            # No fence left (and, with LOST saved, none raised): the true book decides.
            for gate in (g, fresh):
                assert gate.try_enter("CCC", 25).reason is R.MAX_CONCURRENT_POSITIONS
                assert gate.try_enter("AAA", 1).reason is R.MAX_GROSS_EXPOSURE
            assert g.release_order("o4")
            assert fresh.try_enter("BBB", 25, order_id="o5")
            assert g.audit(LIMITS) == []
            denied = g.stats().denied[R.BOOK_NOT_RESTORED]
            assert denied == (0 if lost_saved else 2)
        finally:
            a.close()


# ---------------------------------------------------------------------------------- min_replicas


@pytest.mark.parametrize("outage", ["frozen", "killed"])
def test_min_replicas_denies_an_admission_no_replica_confirmed(
    tmp_path: Path, gate_on: GateOn, outage: str
) -> None:
    with servers(tmp_path, "m", "s") as (m, s):
        am, as_ = admin(m), admin(s)
        try:
            link(as_, m)
            wait_in_sync(am, as_)
            # The linked replica must confirm in time even on a loaded machine: a long timeout
            # (WAIT answers as soon as the replica acknowledges). The outage is met by 0.2 s.
            patient = gate_on(m, min_replicas=1, replica_timeout=10.0)
            hasty = gate_on(m, min_replicas=1, replica_timeout=0.2)
            plain = gate_on(m)  # min_replicas=0: answers without waiting for any replica
            assert patient.min_replicas == 1 and plain.min_replicas == 0
            patient.restore({})
            assert patient.try_enter("AAA", 10, order_id="a1")
            assert as_.hexists(patient.keys[0], "o:a1")  # WAIT saw the replica acknowledge it

            if outage == "frozen":
                with stopped(s):  # the replica cannot read or acknowledge anything
                    denied = hasty.try_enter("BBB", 10, order_id="b1")
                    # The broken variant: without WAIT the admission stands on the primary
                    # alone, and a failover now would lose it.
                    unconfirmed = plain.try_enter("CCC", 10, order_id="c1")
                    stats = hasty.stats()
                    orders = book_orders(m, gate_on)
            else:
                s.kill()
                denied = hasty.try_enter("BBB", 10, order_id="b1")
                unconfirmed = plain.try_enter("CCC", 10, order_id="c1")
                stats = hasty.stats()
                orders = book_orders(m, gate_on)
                s.start()
                as_.connection_pool.disconnect()
                link(as_, m)

            assert denied.reason is R.BACKEND_UNAVAILABLE
            assert unconfirmed.reservation is not None
            assert "b1" not in orders and orders == ["a1", "c1"]  # b1 was released again
            assert stats.outstanding == 2  # a1 and c1
            assert stats.denied[R.BACKEND_UNAVAILABLE] == 1  # this gate object's own count

            wait_in_sync(am, as_)  # the replica is back and has caught up
            assert plain.release_order("c1")
            assert patient.try_enter("BBB", 10, order_id="b2")
            assert as_.hexists(patient.keys[0], "o:b2")
            assert book_orders(m, gate_on) == ["a1", "b2"]
            assert patient.audit(LIMITS) == []
        finally:
            am.close()
            as_.close()


def test_a_decision_denied_for_want_of_replicas_counts_once(
    tmp_path: Path, gate_on: GateOn
) -> None:
    """``stats()``: ``admitted`` and ``denied`` count decisions as the caller got them
    (``GateStats.decisions == admitted + sum(denied)``). An admission released again because
    no replica confirmed it was a denial (``BACKEND_UNAVAILABLE``), not also an admission."""
    with servers(tmp_path, "m", "s") as (m, s):
        am, as_ = admin(m), admin(s)
        try:
            link(as_, m)
            wait_in_sync(am, as_)
            gate = gate_on(m, min_replicas=1, replica_timeout=0.2)
            gate.restore({})
            with stopped(s):
                assert gate.try_enter("BBB", 10).reason is R.BACKEND_UNAVAILABLE
                stats = gate.stats()
            assert stats.denied[R.BACKEND_UNAVAILABLE] == 1
            assert stats.outstanding == 0
            assert (stats.admitted, stats.decisions) == (0, 1)
        finally:
            am.close()
            as_.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"min_replicas": -1}, ValueError, "min_replicas"),
        ({"min_replicas": True}, TypeError, "min_replicas"),
        ({"min_replicas": 1.5}, TypeError, "min_replicas"),
        ({"min_replicas": "1"}, TypeError, "min_replicas"),
        ({"min_replicas": 1, "replica_timeout": 0}, ValueError, "replica_timeout"),
        ({"min_replicas": 1, "replica_timeout": -0.1}, ValueError, "replica_timeout"),
        ({"min_replicas": 1, "replica_timeout": math.nan}, ValueError, "replica_timeout"),
        ({"min_replicas": 1, "replica_timeout": math.inf}, ValueError, "replica_timeout"),
        ({"min_replicas": 1, "replica_timeout": True}, TypeError, "replica_timeout"),
        ({"min_replicas": 1, "replica_timeout": "0.1"}, TypeError, "replica_timeout"),
    ],
)
def test_bad_replica_arguments_are_refused_by_name(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    # Nothing listens on port 1; neither the client nor the gate connects before a call.
    client = redis.Redis(host="127.0.0.1", port=1, socket_timeout=1)
    try:
        with pytest.raises(error, match=name):
            RedisGate(client, LIMITS, ttl=30, namespace=NS, **kwargs)
        with pytest.raises(error, match=name):
            RedisGate.from_url("redis://127.0.0.1:1/0", LIMITS, ttl=30, namespace=NS, **kwargs)
    finally:
        client.close()


def test_min_replicas_is_refused_with_a_cluster_client() -> None:
    # A RedisCluster connects when built; the gate only looks at the client's type, so an
    # instance that never ran __init__ (and never connects) is enough here.
    cluster = object.__new__(RedisCluster)
    with pytest.raises(ValueError, match="min_replicas"):
        RedisGate(cluster, LIMITS, ttl=30, namespace=NS, min_replicas=1)


# ---------------------------------------------------------------------------------- failover


@pytest.mark.parametrize(
    "replicated_all", [True, False], ids=["replica-had-everything", "replica-promoted-early"]
)
def test_failover_to_a_replica(tmp_path: Path, gate_on: GateOn, replicated_all: bool) -> None:
    """The primary dies and its replica is promoted. The process that used the primary keeps
    its mark (``moved``: a gate on the new primary that takes over the old gate's mark, as one
    process reconnecting). If the replica had every write, the mark came with the data and
    decisions go on without ``restore``; if it was promoted before ``LOST``, it is fenced."""
    with servers(tmp_path, "m", "s") as (m, s):
        am, as_ = admin(m), admin(s)
        try:
            link(as_, m)
            wait_in_sync(am, as_)
            g = gate_on(m)
            g.restore({})
            admit(g, KEPT)
            g.confirm_fill("o2", 20)  # AAA: position 20 + o1's 30 reserved
            wait_in_sync(am, as_)
            if replicated_all:
                admit(g, LOST)
                wait_in_sync(am, as_)
                m.kill()
                promote(as_)
            else:
                promote(as_)  # promoted before LOST: it never gets them
                admit(g, LOST)
                m.kill()

            moved = gate_on(s)
            moved.server.mark.saw(*g.server.mark.args())
            fresh = gate_on(s)
            if replicated_all:
                assert book_mark(s, gate_on) == g.server.mark.args()[:2]
                for gate in (moved, fresh):
                    assert gate.try_enter("CCC", 25).reason is R.MAX_CONCURRENT_POSITIONS
                    assert gate.try_enter("AAA", 1).reason is R.MAX_GROSS_EXPOSURE
                assert moved.release_order("o4")
                assert fresh.try_enter("BBB", 25, order_id="o5")
                assert book_orders(s, gate_on) == ["o1", "o3", "o5"]
                assert moved.positions() == {"AAA": 20}
                assert moved.audit(LIMITS) == []
                assert moved.stats().denied[R.BOOK_NOT_RESTORED] == 0
            else:
                assert book_mark(s, gate_on) < g.server.mark.args()
                assert moved.try_enter("CCC", 25).reason is R.BOOK_NOT_RESTORED
                assert fresh.try_enter("CCC", 25).reason is R.BOOK_NOT_RESTORED
                moved.restore({"AAA": 20}, [KEPT[0], *LOST])
                assert fresh.try_enter("CCC", 25).reason is R.MAX_CONCURRENT_POSITIONS
                assert moved.audit(LIMITS) == []
        finally:
            am.close()
            as_.close()
