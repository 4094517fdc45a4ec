"""The Redis gate's server-side test clock (``pendingledger.redis.testing``).

The script's now is the server's ``TIME`` plus a per-namespace offset kept in Redis; tests move
it instead of sleeping. These tests pin what the rest of the Redis suite relies on: advancing
expires a reservation exactly at ``reserved_at + ttl`` (the in-process ledger's rule), a refused
step changes nothing, each namespace has its own clock, and a decision stays one ``FCALL``.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from redis_server import CommandLog, RedisServer

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits
from pendingledger.limits import DenyReason
from pendingledger.testing import ManualClock

redis = pytest.importorskip("redis")

from redis_gates import new_gate, res  # noqa: E402

from pendingledger.redis import OpenOrder, RedisGate  # noqa: E402
from pendingledger.redis.testing import (  # noqa: E402
    advance_server_clock,
    enable_test_ops,
    server_clock,
)

pytestmark = pytest.mark.redis
R = DenyReason
Limits = PortfolioLimits


def is_active(reservation: Any) -> bool:
    return bool(reservation.active)  # a call: mypy does not narrow it across a clock step


def now_us(gate: RedisGate) -> int:
    return gate.snapshot().now_us  # exact: the script's own reading, in microseconds


# ---------------------------------------------------------------------------- the TTL boundary


def test_advancing_expires_exactly_at_the_ttl_boundary(client: Any) -> None:
    limits = Limits(max_concurrent_positions=1)
    gate = new_gate(client, limits, ttl=1.0, frozen=True)
    clock = ManualClock()
    memory = PortfolioGate(PendingEntryLedger(1.0, clock=clock), limits)

    r = res(gate.try_enter("AAA", 1))
    m = memory.try_enter("AAA", 1).reservation
    assert m is not None
    expiry = gate.snapshot().orders[r.order_id].expires_at_us
    assert expiry == now_us(gate) + 1_000_000  # frozen: no time passed since the reservation

    advance_server_clock(gate, 0.999999)
    clock.advance(0.999999)
    assert now_us(gate) == expiry - 1  # the TTL's last microsecond: still outstanding
    assert r.active and m.active
    assert gate.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert memory.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert gate.stats().expired == 0

    advance_server_clock(gate, 0.000001)
    clock.advance(0.000001)
    assert now_us(gate) == expiry  # now == reserved_at + ttl: expired, in both backends
    assert not is_active(r)  # asks the server, which compares with now (the ledger's flag waits
    assert gate.try_enter("BBB", 1)  # for its next operation); the decision swept it
    assert memory.try_enter("BBB", 1)
    assert not is_active(m)
    assert gate.stats().expired == 1
    assert memory.ledger.stats().expired == 1
    assert r.release() is False
    assert gate.audit() == []


@pytest.mark.parametrize("ttl", [1e-9, 1e-6, 0.1, 0.3, 1.1, 2.5, 59.999999])
def test_advancing_by_the_ttl_expires_in_both_backends(client: Any, ttl: float) -> None:
    gate = new_gate(client, ttl=ttl, frozen=True)
    ledger = PendingEntryLedger(ttl, clock=(clock := ManualClock(1_000.0)))
    r = res(gate.try_enter("AAA", 1))
    m = PortfolioGate(ledger, Limits()).try_enter("AAA", 1).reservation
    assert m is not None and r.active and m.active
    advance_server_clock(gate, ttl)
    clock.advance(ttl)
    assert gate.sweep() == 1
    assert ledger.stats().expired == 1  # the ledger sweeps whenever it takes its lock
    assert not is_active(r) and not is_active(m)


def test_advancing_without_freezing_adds_to_the_servers_time(client: Any) -> None:
    gate = new_gate(client, Limits(max_concurrent_positions=1), ttl=60, frozen=False)
    r = res(gate.try_enter("AAA", 1))
    before = server_clock(gate)
    assert abs(before - float(client.time()[0])) < 5  # unmoved: the server's TIME
    reading = advance_server_clock(gate, 3600)
    assert reading >= before + 3600
    assert server_clock(gate) >= reading  # TIME still runs under the offset
    assert not r.active
    assert gate.try_enter("BBB", 1)  # AAA's reservation expired: the slot is free
    stats = gate.stats()
    assert (stats.admitted, stats.expired, stats.outstanding) == (2, 1, 1)
    fresh = res(gate.try_enter("BBB", 1))  # a reservation made after the step gets a full TTL
    assert fresh.reserved_at >= reading
    assert fresh.expires_at - fresh.reserved_at == pytest.approx(60)


# ---------------------------------------------------------------------------- refused steps


@pytest.mark.parametrize(
    ("seconds", "error", "match"),
    [
        (-1, ValueError, "time can't go backwards"),
        (-1e-9, ValueError, "time can't go backwards"),
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        (-math.inf, ValueError, "finite"),
        (1e12, ValueError, "2\\*\\*52"),
        (True, TypeError, "seconds"),
        ("1", TypeError, "seconds"),
        (None, TypeError, "seconds"),
    ],
)
def test_a_bad_step_is_refused_and_changes_nothing(
    client: Any, server: RedisServer, seconds: Any, error: type, match: str
) -> None:
    gate = new_gate(client, Limits(max_concurrent_positions=1), ttl=1, frozen=True)
    r = res(gate.try_enter("AAA", 1))
    before = gate.snapshot()
    with CommandLog(server.url) as log, pytest.raises(error, match=match):
        advance_server_clock(gate, seconds)
    assert log.commands == []  # refused before anything is sent
    after = gate.snapshot()
    assert after.now_us == before.now_us and after.meta == before.meta
    assert r.active
    assert gate.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS


def test_a_step_past_the_clocks_range_is_refused_by_the_server(client: Any) -> None:
    gate = new_gate(client, ttl=1, frozen=True)
    r = res(gate.try_enter("AAA", 1))
    step = 10**9  # seconds: accepted alone, but the third one would pass 2**52 us (year 2112)
    advance_server_clock(gate, step)
    advance_server_clock(gate, step)
    before = gate.snapshot()
    with pytest.raises(ValueError, match="clock overflow"):
        advance_server_clock(gate, step)
    after = gate.snapshot()
    assert after.now_us == before.now_us and after.meta == before.meta
    assert not r.active  # the two steps that were taken did count


def test_a_zero_step_is_allowed_and_writes_nothing(client: Any) -> None:
    gate = new_gate(client, frozen=True)
    before = gate.snapshot()
    assert advance_server_clock(gate, 0) == before.now_us / 1_000_000
    assert gate.snapshot().meta == before.meta


# ---------------------------------------------------------------------------- test operations


def test_the_clock_moves_only_where_the_test_operations_are_on(client: Any) -> None:
    gate = RedisGate(client, Limits(max_concurrent_positions=1), ttl=1, namespace=uuid.uuid4().hex)
    gate.restore({})  # a namespace as production makes it: no testing helper touched it
    r = res(gate.try_enter("AAA", 1))
    before = gate.snapshot()
    for step, freeze in ((1_000_000, "0"), (0, "1"), (3_600_000_000, "1")):
        with pytest.raises(redis.ResponseError, match="test operations are off"):
            gate.server.call("clock", step, freeze)  # any client can send it
    assert gate.snapshot().meta == before.meta  # refused with nothing written
    assert r.active
    assert gate.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert server_clock(gate) * 1_000_000 >= before.now_us  # reading it is allowed...
    assert "testing" not in gate.snapshot().meta  # ...and turns nothing on

    enable_test_ops(client, namespace=gate.namespace)
    assert gate.snapshot().meta["testing"] == "1"
    gate.server.call("clock", 1_000_000, "0")
    assert not is_active(r)
    gate.restore({})
    assert gate.snapshot().meta["testing"] == "1"  # restore keeps it
    gate.wipe()
    assert "testing" not in gate.snapshot().meta  # wipe deletes it
    with pytest.raises(TypeError, match="namespace"):
        enable_test_ops(client)


# ---------------------------------------------------------------------------- one per namespace


def test_the_clock_is_per_namespace(client: Any) -> None:
    moved = new_gate(client, ttl=10, frozen=False)
    still = new_gate(client, ttl=10, frozen=False)
    a = res(moved.try_enter("AAA", 1))
    b = res(still.try_enter("AAA", 1))
    advance_server_clock(moved, 10)
    assert not a.active
    assert b.active
    assert server_clock(still) < server_clock(moved) - 9
    assert moved.sweep() == 1
    assert still.sweep() == 0
    assert "clock_us" not in still.snapshot().meta  # the other namespace has no test clock


def test_every_client_of_a_namespace_shares_its_clock(client: Any, server: RedisServer) -> None:
    gate = new_gate(client, ttl=10, frozen=True)
    other = RedisGate.from_url(server.url, Limits(), ttl=10, namespace=gate.namespace)
    r = res(other.try_enter("AAA", 1))
    other_client = redis.Redis.from_url(server.url, socket_timeout=5)
    reading = advance_server_clock(other_client, 10, namespace=gate.namespace)  # a bare client
    assert reading == server_clock(gate) == server_clock(other)  # frozen: one reading
    assert not r.active
    assert gate.sweep() == 1
    other_client.close()
    other.client.close()


def test_restore_keeps_the_clock_and_wipe_deletes_it(client: Any) -> None:
    gate = new_gate(client, ttl=10, frozen=True)
    reading = advance_server_clock(gate, 100)
    gate.restore({})
    assert server_clock(gate) == reading
    made = gate.restore({}, [("AAA", 1, "o-1")])
    assert made is not None and made[0].reserved_at == reading
    gate.wipe()
    assert server_clock(gate) < reading - 50  # the server's own TIME again
    assert not {"clock_us", "clock_frozen_us"} & set(gate.snapshot().meta)


def test_the_target_names_one_namespace(client: Any) -> None:
    gate = new_gate(client, frozen=False)
    with pytest.raises(TypeError, match="namespace"):
        advance_server_clock(client, 1)
    with pytest.raises(ValueError, match="namespace"):
        advance_server_clock(gate, 1, namespace="another")
    with pytest.raises(ValueError, match="namespace"):
        advance_server_clock(client, 1, namespace="a{b}")
    assert advance_server_clock(gate, 1, namespace=gate.namespace) > 0


# ---------------------------------------------------------------------------- one round trip


def test_a_decision_after_advancing_is_still_one_evalsha(client: Any, server: RedisServer) -> None:
    gate = new_gate(client, Limits(max_concurrent_positions=1), ttl=5, frozen=False)
    assert gate.try_enter("WARM", 1)  # loads the library, opens the connection
    advance_server_clock(gate, 5)  # WARM is due
    with CommandLog(server.url) as log:
        assert gate.try_enter("AAA", 1)  # sweeps WARM, then admits
        assert gate.try_enter("BBB", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert log.commands == ["FCALL"] * 2
    assert gate.stats().expired == 1


def test_the_clock_adds_no_command_inside_a_decision(client: Any, server: RedisServer) -> None:
    plain = new_gate(client, frozen=False)  # no test clock: now is TIME
    moved = new_gate(client, frozen=False)
    advance_server_clock(moved, 1)  # now is TIME + 1 s
    logs = []
    for gate in (plain, moved):
        assert gate.try_enter("WARM", 1)
        with CommandLog(server.url) as log:
            assert gate.try_enter("AAA", 1)  # the same work in both: nothing to sweep
        logs.append(log)
    assert logs[0].commands == logs[1].commands == ["FCALL"]
    assert logs[0].lua_commands == logs[1].lua_commands > 0


# ---------------------------------------------------------------------------- the kept state


def test_the_state_the_server_code_keeps_between_calls_is_the_state_it_wrote(client: Any) -> None:
    """gate.lua keeps each book's unpacked state between calls and unpacks again only when the
    stored bytes differ, and writes a packed field only when a call flags it changed. A change
    it did not flag would live on in that copy alone (and be lost at the next restart). After
    every kind of change, the copy, as ``snapshot`` reports it, is what the book holds."""
    from pendingledger.redis._audit import LAYOUT, STATE, unpack_state

    limits = Limits(
        max_concurrent_positions=2,
        max_gross_exposure=10,
        max_symbol_exposure=6,
        max_net_exposure=8,
        max_daily_loss=5,
        max_drawdown=3,
    )
    gate = new_gate(client, limits, ttl=1.0, frozen=True)
    enable_test_ops(gate)
    first = res(gate.try_enter("AAA", 2))
    steps: dict[str, Any] = {
        "admit": lambda: gate.try_enter("AAA", 1),
        "admit a buy": lambda: gate.try_enter("AAA", 1, side="buy"),
        "admit a sell": lambda: gate.try_enter("AAA", 1, side="sell"),
        "deny net": lambda: gate.try_enter("BBB", 5, side="sell"),  # net 9
        "reduce only": gate.reduce_only,
        "deny reducing": lambda: gate.try_enter("AAA", 1, side="buy"),
        "admit reducing": lambda: gate.try_enter("AAA", 1, side="sell"),
        "record pnl": lambda: gate.record_pnl(-2),
        "set equity": lambda: gate.set_equity(10),
        "latch on drawdown": lambda: gate.set_equity(7),
        "latch kept": lambda: gate.record_pnl(-5),
        "resume with a latch": gate.resume,
        "the day rolls": lambda: advance_server_clock(gate, 86_400.0),
        "a loss the next day": lambda: gate.record_pnl(-1),
        "deny positions": lambda: gate.try_enter("BBB", 1) and gate.try_enter("CCC", 1),
        "deny gross": lambda: gate.try_enter("DDD", 50),
        "deny symbol": lambda: gate.try_enter("AAA", 5),
        "halt": gate.halt,
        "deny halted": lambda: gate.try_enter("EEE", 1),
        "resume": gate.resume,
        "reduce": lambda: first.reduce(1),
        "set position": lambda: gate.set_position("BBB", 2.5),
        "fill": lambda: gate.confirm_fill(first.order_id, 1.0),
        "close position": lambda: gate.close_position("BBB"),
        "release": lambda: gate.release("AAA"),
        "reserve again": lambda: gate.try_enter("FFF", 1),
        "expire": lambda: (advance_server_clock(gate, 1.0), gate.stats()),
        "sweep": gate.sweep,
        "restore": lambda: gate.restore({"GGG": 1.0}),
        "restore with sides": lambda: gate.restore(
            {"GGG": -1.0}, [OpenOrder("GGG", 2, "g", "buy"), OpenOrder("HHH", 1, "h", "sell")]
        ),
        "release a side": lambda: gate.release_order("h"),
    }
    for name, step in steps.items():
        step()
        kept = dict(zip(STATE, gate.server.call("snapshot")[1], strict=True))
        stored = client.hmget(gate.keys[0], ["state", "live"])
        written = unpack_state("state", stored[0]) | unpack_state("live", stored[1])
        assert written.pop("layout") == LAYOUT, name
        assert {k: v.decode() if k == "tag" else int(v) for k, v in kept.items()} == written, name
        assert gate.audit() == [], name
    stats = gate.stats()
    assert stats.expired >= 1 and stats.denied  # the steps did what their names say
    assert stats.denied[R.MAX_NET_EXPOSURE] and stats.denied[R.REDUCING_ONLY]


def test_releasing_a_symbol_whose_reservation_just_expired_counts_it_once(client: Any) -> None:
    """release(symbol) runs after the call's sweep: a reservation that sweep expires is gone
    for it, though its record is still in the book until the call's writes. Dropping it a
    second time counted it twice and took the reserved-symbol count below zero, and the gate
    then admitted a position past the limit (found by review; the old code did it too)."""
    gate = new_gate(client, Limits(max_concurrent_positions=1), ttl=1.0, frozen=True)
    enable_test_ops(gate)
    assert gate.try_enter("AAA", 1)
    advance_server_clock(gate, 1.0)  # due, not swept yet
    assert gate.release("AAA") is False  # nothing outstanding: it expired
    assert gate.try_enter("BBB", 1)
    assert gate.try_enter("CCC", 1).reason is R.MAX_CONCURRENT_POSITIONS
    stats = gate.stats()
    assert (stats.expired, stats.released, stats.corrupt) == (1, 0, 0)
    assert gate.audit(gate.limits) == []
