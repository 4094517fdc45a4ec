"""RedisGate on a real three-master Redis Cluster (``redis_cluster_helpers``): every namespace
lives in one slot, so the whole check-and-reserve runs on the node that owns it; a hung or dead
node denies its own namespaces (``BACKEND_UNAVAILABLE``, never an admission, never an exception)
while the others keep deciding; and the library is (re)loaded on the namespace's node only.

One cluster for the module; every test starts from a whole cluster (``whole`` heals what an
earlier test left broken). No test asserts a duration: the hang tests have a tight pytest
timeout instead, which a client without a socket timeout would run into.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis_cluster_helpers import (
    SLOT_RANGES,
    Cluster,
    ClusterNode,
    cluster_info,
    running_cluster,
    slot_owner,
)

from pendingledger import PortfolioLimits
from pendingledger.limits import Decision, DenyReason

redis = pytest.importorskip("redis")

from redis.cluster import RedisCluster  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from pendingledger.redis import RedisGate, StoreUnavailable  # noqa: E402
from pendingledger.redis._library import LIBRARY, VERSION, ServerCode  # noqa: E402
from pendingledger.redis.testing import check_then_reserve, enable_test_ops  # noqa: E402

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
R = DenyReason
Limits = PortfolioLimits
TTL = 60.0
LIBRARY_NAME = f"pendingledger_{VERSION}"
SEED = 0  # gates start from node 0's address and discover the others

MakeGate = Callable[..., RedisGate]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def whole(cluster: Cluster) -> Cluster:
    """The module's cluster with every node up and every slot served (healed if a test before
    this one failed with a node down)."""
    cluster.heal()
    return cluster


@pytest.fixture
def make_gate(cluster: Cluster) -> Iterator[MakeGate]:
    """``make_gate(namespace, limits=..., seed=...)``: a gate from ``from_url(...,
    cluster=True)`` on node ``seed``'s address, restored empty unless ``restore=False``; its
    client is closed after the test."""
    gates: list[RedisGate] = []

    def make(
        namespace: str, limits: Limits | None = None, *, restore: bool = True, seed: int = SEED
    ) -> RedisGate:
        gate = RedisGate.from_url(
            cluster.nodes[seed].seed_url,
            limits or Limits(max_concurrent_positions=10),
            ttl=TTL,
            namespace=namespace,
            cluster=True,
            timeout=0.5,
        )
        gates.append(gate)
        if restore:
            gate.restore({})
        return gate

    yield make
    for gate in gates:
        gate.client.close()


def admin_call(node: ClusterNode, *command: Any) -> Any:
    """One command on ``node`` alone (a plain client: no cluster routing)."""
    admin = node.admin()
    try:
        return admin.execute_command(*command)
    finally:
        admin.close()


def has_library(node: ClusterNode) -> bool:
    return bool(admin_call(node, "FUNCTION LIST", "LIBRARYNAME", LIBRARY_NAME))


def holders(cluster: Cluster) -> set[int]:
    """The nodes that have the gate's library loaded."""
    return {i for i, node in enumerate(cluster.nodes) if has_library(node)}


def flush_functions(cluster: Cluster) -> None:
    for node in cluster.nodes:
        admin_call(node, "FUNCTION FLUSH")
    assert holders(cluster) == set()


def where_the_book_is(cluster: Cluster, gate: RedisGate) -> set[int]:
    """The nodes holding the namespace's book key (asked one by one; a node that does not own
    the slot answers MOVED, which counts as not holding it)."""
    found = set()
    for i, node in enumerate(cluster.nodes):
        try:
            if admin_call(node, "EXISTS", gate.keys[0]) == 1:
                found.add(i)
        except redis.exceptions.MovedError:
            pass
    return found


def wait_failed_by_the_others(cluster: Cluster, down: int) -> None:
    """Poll (with a deadline) until every other node counts ``down``'s slots as failed: the
    cluster has declared the node FAIL (and, as its nodes need no full coverage, still serves
    the other slots: a cluster that stopped would deny every namespace)."""
    first, last = SLOT_RANGES[down]
    deadline = time.monotonic() + 20
    while True:
        infos = [cluster_info(node) for i, node in enumerate(cluster.nodes) if i != down]
        if all(info["cluster_slots_fail"] == str(last - first + 1) for info in infos):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"node {down} was never declared failed: {infos}")
        time.sleep(0.01)  # failure detection takes a node timeout and a round of gossip


def wrong_node_loader(cluster: Cluster) -> Callable[[ServerCode], None]:
    """A broken ``ServerCode.load``: loads the library on a node that does NOT own the
    namespace's slot (the first other one), as a load routed without the key would."""

    def load(self: ServerCode) -> None:
        owner = slot_owner(key_slot(self._keys[0].encode()))
        other = cluster.nodes[(owner + 1) % 3]
        admin_call(other, "FUNCTION LOAD", "REPLACE", LIBRARY)

    return load


def everywhere_loader(self: ServerCode) -> None:
    """A broken ``ServerCode.load``: the client's own ``FUNCTION LOAD``, which redis-py sends to
    every primary of the cluster."""
    self._client.function_load(LIBRARY, replace=True)


# ---------------------------------------------------------------------------- 1. the gate works


@pytest.mark.parametrize("index", range(3))
def test_check_and_reserve_on_each_node(whole: Cluster, make_gate: MakeGate, index: int) -> None:
    ns = whole.namespace_on(index, "reserve")
    limits = Limits(max_concurrent_positions=3, max_gross_exposure=1_000)
    gate = make_gate(ns, limits, restore=False)
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED  # fails closed until restore
    (open_order,) = gate.restore({"AAA": 200}, [("BBB", 100, "open-1")]) or []
    assert open_order.active
    assert where_the_book_is(whole, gate) == {index}

    assert gate.try_enter("CCC", 300, order_id="c")  # 3 positions, gross 600
    assert gate.try_enter("DDD", 1).reason is R.MAX_CONCURRENT_POSITIONS
    # Another process's gate, started from another node, decides on the same book.
    peer = make_gate(ns, limits, restore=False, seed=(index + 1) % 3)
    assert peer.try_enter("DDD", 1).reason is R.MAX_CONCURRENT_POSITIONS
    with pytest.raises(ValueError, match="min_replicas"):
        RedisGate(gate.client, limits, ttl=TTL, namespace=ns, min_replicas=1)
    assert gate.try_enter("CCC", 401).reason is R.MAX_GROSS_EXPOSURE
    assert gate.try_enter("CCC", 400, order_id="c2")  # gross exactly 1,000: admitted
    assert gate.try_enter("CCC", 1).reason is R.MAX_GROSS_EXPOSURE
    assert gate.release_order("c2") is True
    assert gate.confirm_fill("open-1", 100) is True  # BBB is a position now, its order ended
    assert gate.release_order("c") is True
    assert gate.positions() == {"AAA": 200, "BBB": 100}
    assert peer.positions() == {"AAA": 200, "BBB": 100}
    stats = gate.stats()
    assert (stats.admitted, stats.outstanding, stats.released, stats.filled) == (2, 0, 2, 1)
    assert stats.denied[R.MAX_CONCURRENT_POSITIONS] == 2
    assert stats.denied[R.MAX_GROSS_EXPOSURE] == 2
    assert gate.audit() == []
    assert gate.audit(limits) == []

    # The broken variant: check-then-reserve in two calls, another entry in between, takes the
    # book past the positions limit on this node, and the same audit reports it.
    enable_test_ops(gate)
    late = check_then_reserve(gate, "DDD", 1, between=lambda: gate.try_enter("EEE", 1))
    assert late
    assert gate.audit() == []  # the records are consistent...
    assert any("max_concurrent_positions" in p for p in gate.audit(limits))  # ...the limit is not
    assert where_the_book_is(whole, gate) == {index}


# ---------------------------------------------------------------------------- 2. a node down


@pytest.mark.timeout(30)
def test_a_hung_node_denies_its_namespace_while_the_others_decide(
    whole: Cluster, make_gate: MakeGate, caplog: pytest.LogCaptureFixture
) -> None:
    hung = 1
    node = whole.nodes[hung]
    gate = make_gate(whole.namespace_on(hung, "hung"))
    other = make_gate(whole.namespace_on(2, "hung"))
    assert gate.try_enter("WARM", 1)  # the connection to the node is open, the library loaded
    assert other.try_enter("WARM", 1)
    # The broken variant: the same gate on a cluster client without socket_timeout.
    bare = RedisCluster(host="127.0.0.1", port=whole.nodes[SEED].port)
    try:
        with pytest.warns(RuntimeWarning, match="socket_timeout"):
            blocking = RedisGate(bare, Limits(), ttl=TTL, namespace=gate.namespace)
        assert blocking.try_enter("BARE", 1)  # it works while the node answers
        outcome: list[object] = []
        calling = threading.Event()

        def blocked_decision() -> None:
            calling.set()
            try:
                outcome.append(blocking.try_enter("BLOCKED", 1))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=blocked_decision, daemon=True)
        try:
            node.pause()  # SIGSTOP
            thread.start()
            assert calling.wait(10)
            with caplog.at_level(logging.WARNING, logger="pendingledger.redis"):
                denied = [gate.try_enter("HUNG", 1) for _ in range(2)]
            assert [d.reason for d in denied] == [R.BACKEND_UNAVAILABLE] * 2
            assert all(d.reservation is None for d in denied)
            assert "failed closed" in caplog.text
            # The bare client is still waiting for the hung node after the gate's denials.
            thread.join(0.2)
            assert thread.is_alive() and not outcome, outcome

            wait_failed_by_the_others(whole, hung)  # the cluster has given the node up
            assert gate.try_enter("HUNG", 1).reason is R.BACKEND_UNAVAILABLE
            decision = other.try_enter("OTHER", 1)
            assert decision and decision.reservation is not None
            assert decision.reservation.release()
            assert other.audit() == []
            assert thread.is_alive() and not outcome, outcome
        finally:
            node.resume()  # SIGCONT: the blocked call gets its answer
        thread.join(20)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], Decision), outcome
    finally:
        bare.close()

    whole.wait_whole()
    decision = gate.try_enter("BACK", 1)
    assert decision, decision
    assert gate.audit() == []
    assert other.try_enter("BACK", 1)


@pytest.mark.timeout(30)
def test_a_dead_node_denies_its_namespace_and_rejoins_after_restart(
    whole: Cluster, make_gate: MakeGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = 2
    node = whole.nodes[dead]
    gate = make_gate(whole.namespace_on(dead, "dead"))
    other = make_gate(whole.namespace_on(0, "dead"))
    r = gate.try_enter("WARM", 1, order_id="warm").reservation
    assert r is not None and other.try_enter("WARM", 1)
    try:
        node.kill()  # SIGKILL: connections are refused from now on
        assert [gate.try_enter("DEAD", 1).reason for _ in range(2)] == [R.BACKEND_UNAVAILABLE] * 2
        assert gate.release_order("warm") is False  # a lost release: logged, not raised
        with pytest.raises(StoreUnavailable):
            gate.set_position("DEAD", 1)
        wait_failed_by_the_others(whole, dead)
        assert gate.try_enter("DEAD", 1).reason is R.BACKEND_UNAVAILABLE
        assert other.try_enter("OTHER", 1)

        # A library reload on the other node works while this one is dead: it goes to the
        # namespace's node only. The broken variant, a load sent to every primary, fails on the
        # dead node, and the decision is denied.
        other_node = whole.nodes[0]
        admin_call(other_node, "FUNCTION FLUSH")
        with monkeypatch.context() as patch:
            patch.setattr(ServerCode, "load", everywhere_loader)
            assert other.try_enter("FLUSHED", 1).reason is R.BACKEND_UNAVAILABLE
        admin_call(other_node, "FUNCTION FLUSH")
        assert other.try_enter("FLUSHED", 1)
        assert has_library(other_node)
        assert other.audit() == []

        node.start()  # same port, same nodes.conf: it rejoins with its slots, empty
        whole.wait_whole()
    finally:
        whole.heal()
    assert not has_library(node)
    # The restarted node lost the library and the book: the gate reloads the one and fails
    # closed on the other until restore.
    assert gate.try_enter("BACK", 1).reason is R.BOOK_NOT_RESTORED
    assert has_library(node)
    assert not gate.book_restored()
    gate.restore({})
    assert gate.try_enter("BACK", 1)
    assert gate.audit() == []
    assert where_the_book_is(whole, gate) == {dead}


# ---------------------------------------------------------------------------- 3. FUNCTION FLUSH


@pytest.mark.parametrize("index", range(3))
def test_function_flush_on_the_owning_node_is_reloaded_there(
    whole: Cluster,
    make_gate: MakeGate,
    index: int,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = whole.nodes[index]
    gate = make_gate(whole.namespace_on(index, "flush"))
    assert gate.try_enter("AAA", 1)
    assert has_library(node)

    # The broken variant: a reload aimed at another node leaves this one without the library,
    # and the decision is denied.
    admin_call(node, "FUNCTION FLUSH")
    with monkeypatch.context() as patch:
        patch.setattr(ServerCode, "load", wrong_node_loader(whole))
        assert gate.try_enter("BBB", 1).reason is R.BACKEND_UNAVAILABLE
    assert not has_library(node)

    admin_call(node, "FUNCTION FLUSH")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pendingledger.redis"):
        decision = gate.try_enter("BBB", 1)
    assert decision, decision
    assert "failed closed" not in caplog.text  # reloaded quietly, nothing surfaced
    assert has_library(node)
    assert gate.audit() == []
    assert gate.stats().admitted == 2


# ---------------------------------------------------------------------------- 4. where it loads


def test_the_library_is_loaded_on_the_namespaces_node_only(
    whole: Cluster, make_gate: MakeGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    gates = [make_gate(whole.namespace_on(i, "where")) for i in range(3)]  # restores load it
    for i, gate in enumerate(gates):
        flush_functions(whole)
        assert gate.try_enter("AAA", 1)
        assert holders(whole) == {i}

    # The broken variant: redis-py's own FUNCTION LOAD goes to every primary, which the same
    # check reports.
    with monkeypatch.context() as patch:
        patch.setattr(ServerCode, "load", everywhere_loader)
        flush_functions(whole)
        assert gates[1].try_enter("BBB", 1)
        assert holders(whole) == {0, 1, 2}
