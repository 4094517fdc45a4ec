"""Events and logging on the Redis gate: what its own calls see is told, after the answer."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest

from pendingledger import DenyReason, PortfolioLimits, TradingState
from pendingledger.events import Decided, Ended, EndReason, Event, StateChanged

redis = pytest.importorskip("redis")

from redis_gates import new_gate, res  # noqa: E402

from pendingledger.redis import RedisGate  # noqa: E402

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def subscribed(gate: RedisGate) -> list[Event]:
    events: list[Event] = []
    gate.subscribe(events.append)
    return events


def test_decisions_and_the_ends_it_makes_are_told(client: Any) -> None:
    gate = new_gate(client, PortfolioLimits(max_concurrent_positions=1))
    events = subscribed(gate)
    handles = [res(gate.try_enter("AAA", 10, order_id=f"o{i}")) for i in range(3)]
    denied = gate.try_enter("BBB", 1)
    assert denied.reason is DenyReason.MAX_CONCURRENT_POSITIONS

    assert handles[0].release()
    assert handles[1].reduce(10)
    assert gate.confirm_fill("o2", 10)  # AAA is open now
    gate.limits = PortfolioLimits(max_concurrent_positions=2)
    for oid in ("r1", "r2", "r3"):
        assert gate.try_enter("CCC", 5, order_id=oid)
    assert gate.release_order("r1") and gate.reduce_order("r2", 5)
    assert gate.release("CCC")  # the server names no orders here: not told

    decided = [e for e in events if isinstance(e, Decided)]
    assert [e.decision.admitted for e in decided] == [True, True, True, False, True, True, True]
    assert decided[3].decision is denied and decided[3].symbol == "BBB"
    ends = [(e.order_id, e.how, e.reservation) for e in events if isinstance(e, Ended)]
    assert ends == [
        ("o0", EndReason.RELEASED, handles[0]),
        ("o1", EndReason.REDUCED, handles[1]),
        ("o2", EndReason.FILLED, None),
        ("r1", EndReason.RELEASED, None),
        ("r2", EndReason.REDUCED, None),
    ]


def test_state_changes_it_causes_are_told_and_logged(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gate = new_gate(client, PortfolioLimits(max_daily_loss=100))
    events = subscribed(gate)
    caplog.set_level(logging.WARNING, "pendingledger")
    gate.halt()
    gate.resume()
    gate.record_pnl(-40)  # no change: not told
    gate.record_pnl(-60)  # latches

    changes = [(e.previous, e.state, e.latch) for e in events if isinstance(e, StateChanged)]
    active, halted, reducing = TradingState.ACTIVE, TradingState.HALTED, TradingState.REDUCING
    assert [c[:2] for c in changes] == [(active, halted), (halted, active), (active, reducing)]
    latch = changes[-1][2]
    assert latch is not None and latch.reason == "max_daily_loss"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 3 and "max_daily_loss" in lines[2]


def test_another_processes_change_is_told_when_this_gate_reads_it(client: Any) -> None:
    gate = new_gate(client)
    other = RedisGate(client, PortfolioLimits(), ttl=60, namespace=gate.namespace)
    events = subscribed(gate)
    other.halt()
    assert events == []
    assert gate.state is TradingState.HALTED
    (change,) = events
    assert isinstance(change, StateChanged) and change.state is TradingState.HALTED


def test_an_unrestored_book_warns_once_a_while_not_per_order(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gate = RedisGate(client, PortfolioLimits(), ttl=60, namespace=uuid.uuid4().hex[:12])
    caplog.set_level(logging.WARNING, "pendingledger")
    for _ in range(3):
        assert gate.try_enter("AAA", 1).reason is DenyReason.BOOK_NOT_RESTORED
    (line,) = [r.getMessage() for r in caplog.records if "restore" in r.getMessage()]
    assert "book_not_restored" in line


def test_a_listener_that_raises_never_reaches_the_caller(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gate = new_gate(client)

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    gate.subscribe(broken)
    caplog.set_level(logging.WARNING, "pendingledger")
    assert gate.try_enter("AAA", 1).admitted
    assert [r for r in caplog.records if "listener bug" in r.getMessage()]
    assert gate.unsubscribe(broken) and not gate.unsubscribe(broken)


def test_every_decision_of_a_threaded_race_is_told(client: Any) -> None:
    gate = new_gate(client, PortfolioLimits(max_concurrent_positions=4))
    events = subscribed(gate)
    threads, per_thread = 16, 20
    admitted = [0] * threads
    start = threading.Barrier(threads)

    def trade(n: int) -> None:
        start.wait(timeout=30)
        for i in range(per_thread):
            decision = gate.try_enter(f"S{(n + i) % 8}", 1)
            if decision.admitted:
                admitted[n] += 1
                decision.reservation.release()

    workers = [threading.Thread(target=trade, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=50)
    decided = [e for e in events if isinstance(e, Decided)]
    assert len(decided) == threads * per_thread
    assert sum(e.decision.admitted for e in decided) == sum(admitted) > 0
    assert len([e for e in events if isinstance(e, Ended)]) == sum(admitted)
