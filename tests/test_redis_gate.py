"""RedisGate behaviour beyond the shared conformance suite: the store, the marker, amounts, keys."""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from redis_server import CommandLog, RedisServer

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits, _units
from pendingledger.limits import Decision, DenyReason
from pendingledger.testing import ManualClock

redis = pytest.importorskip("redis")

from pendingledger.redis import (  # noqa: E402
    BookNotRestored,
    OpenOrder,
    RedisGate,
    RedisReservation,
)
from pendingledger.redis._audit import pack_state, unpack_state  # noqa: E402
from pendingledger.redis.testing import (  # noqa: E402
    advance_server_clock,
    check_then_reserve,
    enable_test_ops,
    freeze_server_clock,
)

pytestmark = pytest.mark.redis
R = DenyReason
Limits = PortfolioLimits


def new_gate(
    client: Any, limits: Limits | None = None, *, ttl: float = 60.0, **kw: Any
) -> RedisGate:
    gate = RedisGate(client, limits or Limits(), ttl=ttl, namespace=uuid.uuid4().hex[:12], **kw)
    gate.restore({})
    return gate


def res(decision: Decision) -> RedisReservation:
    assert decision, decision
    r: object = decision.reservation  # typed as the core Reservation until Decision is generic
    assert isinstance(r, RedisReservation)
    return r


# ---------------------------------------------------------------------------- one round trip


def test_each_decision_is_exactly_one_command(client: Any, server: RedisServer) -> None:
    gate = new_gate(client, Limits(max_concurrent_positions=1))
    assert gate.try_enter("WARM", 1)  # loads the library, opens the connection
    with CommandLog(server.url) as log:
        admitted = [gate.try_enter("WARM", 1) for _ in range(20)]
        denied = [gate.try_enter(f"S{i}", 1) for i in range(30)]
    assert all(admitted) and not any(denied)
    assert log.commands == ["FCALL"] * 50
    assert log.lua_commands > 0


def test_releases_and_book_writes_are_one_command_each(client: Any, server: RedisServer) -> None:
    gate = new_gate(client)
    r = res(gate.try_enter("AAA", 1, order_id="a"))
    assert gate.try_enter("BBB", 1, order_id="b")
    with CommandLog(server.url) as log:
        assert r.reduce(Fraction(1, 2))
        assert r.release()
        assert gate.release_order("b") is True
        gate.set_position("CCC", 5)
        assert gate.close_position("CCC")
        assert gate.confirm_fill(res(gate.try_enter("DDD", 1)).order_id, 1)
    assert log.commands == ["FCALL"] * 7


# ---------------------------------------------------------------------------- keys


def test_every_key_is_under_one_hash_tag(client: Any) -> None:
    from redis.crc import key_slot

    gate = new_gate(client, ttl=60)
    assert gate.try_enter("AAA", 1)
    gate.set_position("BBB", 2)
    gate.halt()
    tag = "{" + gate.namespace + "}"
    stored = {k.decode() for k in client.scan_iter(match=f"pendingledger:{tag}:*")}
    assert stored <= set(gate.keys)
    assert all(tag in key for key in gate.keys)
    assert len({key_slot(key.encode()) for key in gate.keys}) == 1


def test_namespace_may_not_contain_braces(client: Any) -> None:
    for bad in ("", "a{b", "x}"):
        with pytest.raises(ValueError, match="namespace"):
            RedisGate(client, Limits(), ttl=1, namespace=bad)
    with pytest.raises(TypeError, match="namespace"):
        RedisGate(client, Limits(), ttl=1, namespace=7)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
def test_bad_ttl(client: Any, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        RedisGate(client, Limits(), ttl=ttl, namespace="x")


def test_tiny_ttl_is_never_zero(client: Any) -> None:
    gate = new_gate(client, ttl=1e-9)
    assert gate._ttl_us == 1


# ---------------------------------------------------------------------------- arguments


def test_positions_argument_is_refused(client: Any) -> None:
    gate = new_gate(client)
    with pytest.raises(TypeError, match="positions"):
        gate.try_enter("AAA", 1, {"AAA": 1})  # type: ignore[arg-type]
    assert gate.snapshot().orders == {}


def refusal(call: Callable[[], object]) -> tuple[type[BaseException], str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


class Sym(str):
    pass


BAD_SYMBOLS: list[object] = [42, None, "", b"AAA", ["AAA"], Sym("")]
BAD_ORDER_IDS: list[object] = [7, "", b"x", ("a", 1), Sym("")]


AnyGate = RedisGate | PortfolioGate


def symbol_calls(gate: AnyGate, symbol: Any) -> list[Callable[[], object]]:
    """Every way ``gate`` takes a symbol (the same methods on both backends)."""
    calls: list[Callable[[], object]] = [
        lambda: gate.try_enter(symbol, 1),
        lambda: gate.set_position(symbol, 1),
        lambda: gate.close_position(symbol),
        lambda: gate.release(symbol),
    ]
    if symbol is not None:  # confirm_fill(symbol=None) means "the reservation's symbol"
        calls.append(lambda: gate.confirm_fill("o", 1, symbol=symbol))
    return calls


def order_id_calls(gate: AnyGate, order_id: Any) -> list[Callable[[], object]]:
    """Every way ``gate`` takes an order id."""
    return [
        lambda: gate.try_enter("AAA", 1, order_id=order_id),
        lambda: gate.release_order(order_id),
        lambda: gate.confirm_fill(order_id, 1, symbol="AAA"),
    ]


@pytest.mark.parametrize("symbol", BAD_SYMBOLS, ids=repr)
def test_a_bad_symbol_is_refused_in_the_cores_words(
    client: Any, server: RedisServer, symbol: object
) -> None:
    gate = new_gate(client)
    words = refusal(lambda: _units.check_symbol(symbol))
    with CommandLog(server.url) as log:
        for call in symbol_calls(gate, symbol):
            assert refusal(call) == words
    assert log.commands == []  # refused before anything is sent


@pytest.mark.parametrize("order_id", BAD_ORDER_IDS, ids=repr)
def test_a_bad_order_id_is_refused_in_the_cores_words(
    client: Any, server: RedisServer, order_id: object
) -> None:
    gate = new_gate(client)
    words = refusal(lambda: _units.check_order_id(order_id))
    with CommandLog(server.url) as log:
        for call in order_id_calls(gate, order_id):
            assert refusal(call) == words
    assert log.commands == []


@pytest.mark.parametrize(("value", "kind"), [(v, "symbol") for v in BAD_SYMBOLS]
                         + [(v, "order_id") for v in BAD_ORDER_IDS], ids=repr)  # fmt: skip
def test_the_in_process_gate_uses_the_same_words(value: object, kind: str) -> None:
    """The pairing of the two tests above: the in-process gate refuses the same values with the
    same messages (naming the argument and the value), so the backends are interchangeable."""
    local = PortfolioGate(PendingEntryLedger(60.0, clock=ManualClock()), Limits())
    if kind == "symbol":
        words, calls = refusal(lambda: _units.check_symbol(value)), symbol_calls(local, value)
    else:
        words, calls = refusal(lambda: _units.check_order_id(value)), order_id_calls(local, value)
    for call in calls:
        assert refusal(call) == words


def test_any_non_empty_str_is_a_symbol_and_an_order_id(client: Any) -> None:
    """Pipes, NUL and byte 1 (which the script's symbol index escapes), Unicode, str
    subclasses: each symbol keeps its own reservations, as in process."""
    gate = new_gate(client)
    symbols = ["A", "A\0", "A\0B", "A\1", "A\1\0", "\0", "sym|with|pipes and ünïcode", Sym("S")]
    for n, symbol in enumerate(symbols):
        assert gate.try_enter(symbol, 1, order_id=f"id|\0{n}")
        gate.set_position(symbol, n)
    assert gate.audit() == []
    for n, symbol in enumerate(symbols):
        assert gate.release(symbol) is True, symbol  # its own reservation, no other
        orders = gate.snapshot().orders
        assert set(orders) == {f"id|\0{k}" for k in range(n + 1, len(symbols))}
        assert gate.audit() == [], symbol
    assert gate.positions() == {str(s): n for n, s in enumerate(symbols)}
    assert all(type(s) is str for s in gate.positions())


def test_a_symbol_the_client_cannot_encode_is_bad_input(client: Any, server: RedisServer) -> None:
    gate = new_gate(client)
    with CommandLog(server.url) as log:
        for call in (
            lambda: gate.try_enter("\ud800", 1),
            lambda: gate.try_enter("AAA", 1, order_id="\udfff"),
            lambda: gate.set_position("\ud800", 1),
            lambda: gate.release("\ud800"),
        ):
            with pytest.raises(ValueError, match="encodable"):
                call()
    assert log.commands == []
    assert gate.stats().denied[R.BACKEND_UNAVAILABLE] == 0  # not an outage


def test_an_empty_order_id_is_refused_by_name_and_value(client: Any, server: RedisServer) -> None:
    gate = new_gate(client)
    calls: list[tuple[str, Any]] = [
        ("", lambda: gate.try_enter("AAA", 1, order_id="")),
        ("", lambda: gate.release_order("")),
        ("", lambda: gate.confirm_fill("", 1, symbol="AAA")),
        ("open_orders[1]: ", lambda: gate.restore({}, [("AAA", 1, "a"), ("BBB", 1, "")])),
    ]
    with CommandLog(server.url) as log:
        for where, call in calls:
            with pytest.raises(ValueError) as info:
                call()
            assert str(info.value) == f"{where}order_id must not be empty, got ''"
    assert log.commands == []  # refused before anything is sent


def test_bad_input_sends_nothing_to_redis(client: Any, server: RedisServer) -> None:
    gate = new_gate(client)
    bad_calls: list[Any] = [
        lambda: gate.try_enter("AAA", float("nan")),
        lambda: gate.try_enter("AAA", 0),
        lambda: gate.try_enter("AAA", True),
        lambda: gate.try_enter(None, 1),  # type: ignore[arg-type]
        lambda: gate.try_enter("", 1),
        lambda: gate.try_enter("AAA", 1, {"AAA": 1}),  # type: ignore[arg-type]
        lambda: gate.set_position("AAA", float("inf")),
        lambda: gate.confirm_fill("x", float("nan")),
        lambda: gate.release(""),
        lambda: gate.restore({"AAA": "1"}),  # type: ignore[dict-item]
        lambda: gate.reduce_order("x", 0),
        lambda: gate.reduce_order("", 1),
        lambda: gate.confirm_fill("x", 1, filled=float("nan")),
        lambda: gate.confirm_fill("x", 1, filled=-1),
        lambda: gate.reduce_order("x", Decimal("NaN")),
    ]
    with CommandLog(server.url) as log:
        for call in bad_calls:
            with pytest.raises((ValueError, TypeError)):
                call()
    assert log.commands == []


# ---------------------------------------------------------------------------- amounts


def test_amounts_are_exact_units_rounded_against_the_trader(client: Any) -> None:
    gate = new_gate(client, Limits(max_gross_exposure=Decimal("1.0000000009")))
    r1 = res(gate.try_enter("AAA", 0.1))
    r2 = res(gate.try_enter("BBB", Decimal("1e-10")))  # rounds up to one unit
    r3 = res(gate.try_enter("CCC", Fraction(1, 3)))  # 333333334 units
    orders = gate.snapshot().orders
    assert orders[r1.order_id].units == 100_000_000
    assert orders[r2.order_id].units == 1
    assert orders[r3.order_id].units == 333_333_334
    # the limit rounds down to 1.000000000: 0.1 + 1e-9 + 0.333333334 + 0.566666665 = 1.0
    assert gate.try_enter("DDD", Decimal("0.566666666")).reason is R.MAX_GROSS_EXPOSURE
    assert gate.try_enter("DDD", Decimal("0.566666665"))


def test_reduce_counts_as_in_process(client: Any) -> None:
    """A partial fill comes off in the core's units (``_units.after_fill``), on both
    backends alike, and the remaining notional reads back in the reservation's kind."""
    gate = new_gate(client)
    local = PendingEntryLedger(60.0, clock=ManualClock())
    with local.lock() as pending:
        mirror = pending.reserve("AAA", Fraction(1, 3))
    r = res(gate.try_enter("AAA", Fraction(1, 3)))
    left = _units.notional_units("notional", Fraction(1, 3))
    assert gate.snapshot().orders[r.order_id].units == left == 333_333_334
    for amount in (Fraction(1, 6), Decimal("0.1")):
        assert r.reduce(amount) and mirror.reduce(amount)
        left = _units.after_fill(left, *_units.reduction_units("amount", amount))
        assert gate.snapshot().orders[r.order_id].units == left
        assert r.notional == mirror.notional == Fraction(left, 10**9)  # still a Fraction
    for handle in (r, mirror):
        assert handle.reduce(1)  # more than remains: ends it as filled
        assert not handle.active
    assert r.notional == mirror.notional == Fraction(left, 10**9)  # what it held at the end
    assert gate.stats().filled == 1
    assert gate.audit() == []


@pytest.mark.parametrize("amount", [10**15, 1e15, Decimal("1e15"), Fraction(10**16, 3)])
def test_amounts_beyond_the_bound_are_refused(client: Any, amount: Any) -> None:
    gate = new_gate(client)
    with pytest.raises(ValueError, match="1e15"):
        gate.try_enter("AAA", amount)
    with pytest.raises(ValueError, match="1e15"):
        gate.set_position("AAA", -amount)
    with pytest.raises(ValueError, match="1e15"):
        RedisGate(client, Limits(max_gross_exposure=amount), ttl=1, namespace="x")


def test_totals_past_2_53_units_fail_closed(client: Any) -> None:
    big = 999_999_999_999_999  # just below the per-amount bound
    gate = new_gate(client, Limits(max_gross_exposure=big))
    for i in range(9):
        gate.set_position(f"P{i}", big)
    with pytest.raises(ValueError, match="overflow"):
        gate.set_position("P9", big)
    decision = gate.try_enter("AAA", big)
    assert decision.reason is R.BACKEND_UNAVAILABLE  # the sum cannot be formed: fail closed
    snap = gate.snapshot()
    assert "P9" not in snap.positions and snap.orders == {}
    assert gate.audit() == []


# ---------------------------------------------------------------------------- the marker


def test_a_new_namespace_denies_until_restored(client: Any) -> None:
    gate = RedisGate(client, Limits(), ttl=10, namespace=uuid.uuid4().hex)
    assert gate.book_restored() is False
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED
    assert gate.restore({}) == []
    assert gate.book_restored() is True
    assert gate.try_enter("AAA", 1)


def test_writes_to_a_book_not_restored_are_refused_and_write_nothing(client: Any) -> None:
    """A position written to a book nobody vouches for would be trusted by the restore that
    does not replace it (only_if_missing) or lost by one that does: refused, loudly."""
    gate = RedisGate(client, Limits(max_concurrent_positions=1), ttl=10, namespace=uuid.uuid4().hex)
    writes: list[Callable[[], object]] = [
        lambda: gate.set_position("AAA", 5),
        lambda: gate.close_position("AAA"),
        lambda: gate.confirm_fill("o-1", 5, symbol="AAA"),
        lambda: gate.confirm_fill("o-1", 5, symbol="AAA", filled=1),
    ]
    for write in writes:
        with pytest.raises(BookNotRestored, match="not restored"):
            write()
    assert gate.release_order("o-1") is False  # a release fails soft: it only over-blocks
    assert gate.reduce_order("o-1", 1) is False
    assert gate.release("AAA") is False
    gate.halt()  # a halt always lands, restored or not
    assert gate.halted
    gate.resume()
    assert gate.positions() == {}
    assert gate.book_restored() is False
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED


def test_a_halt_a_failover_lost_is_fenced(client: Any) -> None:
    """halt() is a change of the book like any other: if the server loses it (here its state is
    put back as it was before, as a failover to a replica that never got it would), the halting
    process's next call finds the server behind its mark and fences the namespace."""
    gate = new_gate(client, Limits(max_concurrent_positions=4))
    assert gate.try_enter("AAA", 1)
    before = client.hmget(gate.keys[0], ["state", "live"])
    gate.halt()
    client.hset(gate.keys[0], mapping=dict(zip(["state", "live"], before, strict=True)))  # lost
    assert gate.try_enter("BBB", 1).reason is R.BOOK_NOT_RESTORED
    fresh = RedisGate(client, gate.limits, ttl=60, namespace=gate.namespace)
    assert fresh.try_enter("BBB", 1).reason is R.BOOK_NOT_RESTORED  # fenced for everyone


def test_a_big_restore_and_a_symbols_thousands_of_reservations(client: Any) -> None:
    """One command per write list would pass Lua's unpack limit (about 8,000 values) part-way
    through a call's writes: a restore of 2,100 positions, a release of 2,050 reservations."""
    gate = new_gate(client, ttl=600)
    gate.halt()
    assert gate.restore({f"S{i}": 1 for i in range(2_100)}) == []
    assert gate.halted  # the restore kept the flag
    assert len(gate.positions()) == 2_100
    gate.resume()
    for i in range(2_050):
        assert gate.try_enter("ONE", 1, order_id=f"o{i}")
    assert gate.release("ONE") is True
    assert gate.stats().outstanding == 0
    assert gate.audit() == []


@pytest.mark.parametrize("ttl", [365 * 86_400 + 1, 1e20])
def test_a_ttl_past_a_year_is_refused(client: Any, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        RedisGate(client, Limits(), ttl=ttl, namespace="t")


def test_wipe_deletes_the_namespace(client: Any) -> None:
    gate = new_gate(client)
    assert gate.try_enter("AAA", 1)
    gate.halt()
    assert gate.wipe() >= 3
    assert not any(client.exists(key) for key in gate.keys)
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED


def test_restore_only_if_missing_lets_the_first_process_win(client: Any) -> None:
    ns = uuid.uuid4().hex
    a = RedisGate(client, Limits(), ttl=10, namespace=ns)
    b = RedisGate(client, Limits(), ttl=10, namespace=ns)
    assert a.restore({"AAA": 5}, only_if_missing=True) == []
    assert b.restore({}, only_if_missing=True) is None
    assert b.snapshot().positions == {"AAA": 5_000_000_000}


def test_restore_rebuilds_positions_and_open_orders(client: Any) -> None:
    limits = Limits(max_concurrent_positions=3, max_gross_exposure=1000)
    gate = new_gate(client, limits)
    assert gate.try_enter("OLD", 1)
    gate.halt()
    made = gate.restore(
        {"AAA": -300, "BBB": Decimal("100.5")},
        [OpenOrder("CCC", 200, "ord-1"), ("AAA", 50)],
    )
    assert made is not None
    assert made[0].order_id == "ord-1"
    snap = gate.snapshot()
    assert set(snap.orders) == {r.order_id for r in made}  # "OLD" was replaced
    assert snap.positions == {"AAA": -300_000_000_000, "BBB": 100_500_000_000}
    assert gate.audit() == []
    assert gate.try_enter("AAA", 1).reason is R.HALTED  # the halt survives a restore
    gate.resume()
    assert gate.try_enter("DDD", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert gate.try_enter("AAA", Decimal("349.6")).reason is R.MAX_GROSS_EXPOSURE
    assert gate.try_enter("AAA", Decimal("349.5"))  # lands on 1000
    assert made[0].release()
    assert gate.try_enter("DDD", 1)
    assert gate.stats().restored == 2


def test_restore_refuses_bad_input_before_writing(client: Any) -> None:
    gate = new_gate(client)
    assert gate.try_enter("KEEP", 1)
    with pytest.raises(ValueError, match="twice"):
        gate.restore({}, [("AAA", 1, "x"), ("BBB", 1, "x")])
    with pytest.raises(ValueError):
        gate.restore({"AAA": float("nan")})
    with pytest.raises(TypeError):
        gate.restore([("AAA", 1)])  # type: ignore[arg-type]
    assert len(gate.snapshot().orders) == 1


def test_a_restore_that_overflows_changes_nothing(client: Any) -> None:
    # Every amount passes the client's < 1e15 check; only their total passes 2**53 units.
    big = 999_999_999_999_999
    gate = new_gate(client, Limits(max_symbol_exposure=100))
    gate.restore({"AAA": 100}, [("BBB", 100, "open-1")])
    before = gate.snapshot()
    too_many_positions = {f"P{i}": big for i in range(10)}
    with pytest.raises(ValueError, match="overflow"):
        gate.restore(too_many_positions)
    too_many_orders = [("CCC", big, f"o{i}") for i in range(10)]
    with pytest.raises(ValueError, match="overflow"):
        gate.restore({}, too_many_orders)
    after = gate.snapshot()
    assert after.positions == before.positions
    assert after.orders == before.orders
    assert after.totals == before.totals
    assert after.meta["gen"] == before.meta["gen"]
    assert gate.audit() == []
    # the old book still counts: AAA and BBB are full
    assert gate.try_enter("AAA", 1).reason is R.MAX_SYMBOL_EXPOSURE
    assert gate.try_enter("BBB", 1).reason is R.MAX_SYMBOL_EXPOSURE
    assert gate.stats().restored == 1


# ---------------------------------------------------------------------------- shared state


def test_gates_on_one_namespace_share_everything(server: RedisServer) -> None:
    ns = uuid.uuid4().hex
    limits = Limits(max_concurrent_positions=2)
    a = RedisGate.from_url(server.url, limits, ttl=10, namespace=ns)
    b = RedisGate.from_url(server.url, limits, ttl=10, namespace=ns)
    a.restore({})
    assert a.try_enter("AAA", 1)
    assert b.try_enter("BBB", 1)
    assert a.try_enter("CCC", 1).reason is R.MAX_CONCURRENT_POSITIONS
    b.halt()
    assert a.halted
    assert a.try_enter("AAA", 1).reason is R.HALTED
    a.resume()
    assert b.stats().admitted == 2
    assert b.release("AAA")
    assert a.try_enter("CCC", 1)
    a.client.close()
    b.client.close()


def test_an_old_handle_never_touches_a_reused_order_id(client: Any) -> None:
    gate = new_gate(client)
    old = res(gate.try_enter("AAA", 10, order_id="reused"))
    assert gate.release_order("reused")
    new = res(gate.try_enter("AAA", 20, order_id="reused"))
    assert old.release() is False
    assert old.reduce(1) is False
    assert new.active
    assert gate.snapshot().orders["reused"].units == 20_000_000_000


def test_a_retried_request_is_answered_not_repeated(client: Any) -> None:
    gate = new_gate(client)
    args = ("AAA", 5_000, "retry-1", "tok", gate._config, 0, "")
    first = gate.server.call("enter", *args)
    again = gate.server.call("enter", *args)  # what a client retry after a lost reply sends
    assert first == again
    other = gate.server.call("enter", *args[:3], "other-token", *args[4:])
    assert other == [b"X"]
    assert len(gate.snapshot().orders) == 1
    assert gate.stats().admitted == 1


def test_a_repeated_call_token_is_answered_not_repeated(client: Any) -> None:
    gate = new_gate(client)
    a = res(gate.try_enter("AAA", 1, order_id="a"))
    assert gate.try_enter("BBB", 1, order_id="b")
    c = res(gate.try_enter("CCC", 1, order_id="c"))
    assert gate.try_enter("DDD", 1, order_id="d")

    def twice(op: str, *args: Any) -> Any:
        first = gate.server.call(op, *args)
        again = gate.server.call(op, *args)  # a client retry after a lost reply
        assert again == first, args
        return first

    # the arguments as RedisGate sends them (after the mark): the call token first
    assert twice("fill", "t1", a.order_id, 10**9, "+a", "", "", "") == [b"F", b"AAA"]
    assert twice("release_order", "t2", "b", "", "") == [b"1"]
    assert twice("reduce", "t3", c.order_id, c.token, 1, 10**9, "CCC") == [b"E"]
    assert twice("release_symbol", "t4", "DDD") == [b"1"]
    assert twice("close_position", "t5", "AAA") == [b"1"]
    assert twice("set_position", "t6", "EEE", 5, "+a") == [b"0"]
    assert twice("set_position", "t7", "EEE", 6, "+a") == [b"1"]
    assert twice("fill", "t8", "nothing", 1, "+a", "", "", "") == [b"N"]
    stats = gate.stats()
    assert (stats.admitted, stats.filled, stats.released, stats.outstanding) == (4, 2, 2, 0)
    assert gate.snapshot().positions == {"EEE": 6}
    assert gate.audit() == []


def test_answers_kept_for_retries_are_forgotten_after_a_minute(client: Any) -> None:
    gate = RedisGate(client, Limits(), ttl=60, namespace=uuid.uuid4().hex[:12])
    freeze_server_clock(gate)
    gate.restore({})

    def kept() -> tuple[int, int]:
        """The answers kept in the book, and the entries of the index that forgets them."""
        book = [k.decode() for k in client.hkeys(gate.keys[0])]
        return sum(1 for k in book if k.startswith("c:")), client.zcard(gate.keys[2]) - 1

    assert gate.try_enter("AAA", 1)  # a decision keeps no answer (its reservation is its record)
    assert kept() == (0, 0)
    gate.set_position("AAA", 1)
    assert gate.close_position("AAA")
    assert kept() == (2, 2)
    advance_server_clock(gate, 59.999999)
    gate.sweep()
    assert kept() == (2, 2)
    advance_server_clock(gate, 0.000001)
    gate.sweep()
    assert kept() == (0, 0)


def test_the_broken_gates_enter_modes_need_the_test_operations_on(client: Any) -> None:
    gate = new_gate(client, Limits(max_concurrent_positions=1))
    assert gate.try_enter("AAA", 1)
    args = ("BBB", 1, "b", "tok", gate._config, 0)
    for mode in ("check", "force", "other"):
        with pytest.raises(redis.ResponseError, match="test operations are off"):
            gate.server.call("enter", *args, mode)  # any client can send it: refused
    assert "b" not in gate.snapshot().orders
    assert gate.stats().denied[R.MAX_CONCURRENT_POSITIONS] == 0  # nothing written
    enable_test_ops(gate)
    assert gate.server.call("enter", *args, "force")[0] == b"A"
    with pytest.raises(redis.ResponseError, match="test operations are off"):
        gate.server.call("enter", "CCC", 1, "c", "tok", gate._config, 0, "other")


def test_check_then_reserve_lets_an_entry_in_between_take_the_room(client: Any) -> None:
    """The broken variant's bug, driven: another entry is admitted between its check and its
    reservation, and both hold a slot of a limit of one."""
    gate = new_gate(client, Limits(max_concurrent_positions=1))
    with pytest.raises(redis.ResponseError, match="test operations are off"):
        check_then_reserve(gate, "AAA", 1)
    enable_test_ops(gate)
    between: list[Decision] = []
    first = check_then_reserve(
        gate, "AAA", 1, order_id="a", between=lambda: between.append(gate.try_enter("BBB", 1))
    )
    assert first and between and between[0]
    assert set(gate.snapshot().orders) == {"a", between[0].reservation.order_id}
    assert len(audit_breaches(gate)) == 1  # two symbols reserved, limit 1
    assert gate.try_enter("CCC", 1).reason is R.MAX_CONCURRENT_POSITIONS  # the real gate holds
    assert check_then_reserve(gate, "CCC", 1).reason is R.MAX_CONCURRENT_POSITIONS
    assert res(first).release()
    with pytest.raises(ValueError, match="outstanding"):
        check_then_reserve(gate, "BBB", 1, order_id=between[0].reservation.order_id)


def audit_breaches(gate: RedisGate) -> list[str]:
    return [p for p in gate.audit(gate.limits) if "max_concurrent_positions" in p]


def test_reservation_times_come_from_the_server_clock(client: Any) -> None:
    gate = new_gate(client, ttl=2.5)
    r = res(gate.try_enter("AAA", 1))
    server_now = float(client.time()[0])
    assert abs(r.reserved_at - server_now) < 5
    assert r.expires_at - r.reserved_at == pytest.approx(2.5)


def test_stats_count_how_reservations_ended(client: Any) -> None:
    gate = new_gate(client, ttl=30)
    res(gate.try_enter("AAA", 1)).release()
    gate.confirm_fill(res(gate.try_enter("BBB", 1)).order_id, 1)
    res(gate.try_enter("CCC", 2)).reduce(2)
    assert gate.try_enter("DDD", 1)
    advance_server_clock(gate, 30)
    assert gate.sweep() == 1
    stats = gate.stats()
    assert (stats.admitted, stats.released, stats.filled, stats.expired) == (4, 1, 2, 1)
    assert stats.outstanding == 0 and stats.gross_notional == 0
    assert stats.corrupt == 0


def test_audit_finds_a_corrupted_total(client: Any) -> None:
    gate = new_gate(client, Limits(max_gross_exposure=10))
    assert gate.try_enter("AAA", 5)
    assert gate.audit(gate.limits) == []
    live = unpack_state("live", client.hget(gate.keys[0], "live"))
    live["res_gross_w"], live["res_gross_f"] = 0, 1  # 1 unit reserved instead of 5 * 10**9
    client.hset(gate.keys[0], "live", pack_state("live", live))
    problems = gate.audit()
    assert any("res_gross" in p for p in problems)


def test_a_client_without_timeout_is_warned_about(server: RedisServer) -> None:
    bare = redis.Redis.from_url(server.url)
    with pytest.warns(RuntimeWarning, match="no socket_timeout") as caught:
        RedisGate(bare, Limits(), ttl=1, namespace="warn")
    assert len(caught) == 1
    bare.close()
    timed = redis.Redis.from_url(server.url, socket_timeout=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RedisGate(timed, Limits(), ttl=1, namespace="warn")
    timed.close()


def test_the_core_never_imports_redis() -> None:
    code = (
        "import sys, pendingledger, pendingledger.gate, pendingledger.ledger;"
        "import pendingledger.testing;"
        "assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_script_ships_with_the_package() -> None:
    from importlib import resources

    text = resources.files("pendingledger.redis").joinpath("gate.lua").read_text()
    assert text.startswith("#!lua name=pendingledger_@VERSION@")


# ---------------------------------------------------------------------------- a call sent again


def _answer(reply: list[Any]) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in reply]


@pytest.mark.parametrize("op", ["release_order", "fill"])
def test_a_call_sent_again_gets_its_first_answer_even_after_the_id_is_used_again(
    client: Any, op: str
) -> None:
    """A client that lost a reply sends the same call (its call token) again. A call that ended
    a reservation keeps its answer in the record's tombstone; when the order id is used again
    before the retry comes, the answer moves to c:<call_token>. Either way the retry gets the
    first answer and does not run: it must not end the new reservation of that id."""
    gate = new_gate(client, Limits(max_concurrent_positions=4))
    assert gate.try_enter("AAA", 1, order_id="o1")
    args: tuple[str | int, ...] = {
        "release_order": ("o1", "", ""),  # release_order(order_id): by id, symbol unknown
        "fill": ("o1", 1_000_000_000, "+f", "", "", ""),  # confirm_fill(order_id, 1.0)
    }[op]
    call = ("call-token-1", *args)
    first = _answer(gate.server.call(op, *call))
    assert first[0] in ("1", "F"), first
    assert _answer(gate.server.call(op, *call)) == first  # from the tombstone
    again = res(gate.try_enter("AAA", 1, order_id="o1"))  # the same id, a new reservation
    assert _answer(gate.server.call(op, *call)) == first  # from c:<call_token>
    assert again.active
    stats = gate.stats()
    assert (stats.released, stats.filled) == ((1, 0) if op == "release_order" else (0, 1))
    assert gate.audit(gate.limits) == []


@pytest.mark.parametrize("layout", ["older layout", "older size", "live missing"])
def test_a_book_in_another_layout_is_not_restored(client: Any, layout: str) -> None:
    """A book written by another version of gate.lua (its state in another layout or size) is
    never read as this one: every decision is denied until restore rewrites it."""
    gate = new_gate(client, Limits(max_concurrent_positions=4))
    held = res(gate.try_enter("AAA", 1))
    book = gate.keys[0]
    if layout == "older layout":
        state = unpack_state("state", client.hget(book, "state"))
        client.hset(book, "state", pack_state("state", state | {"layout": 1}))
    elif layout == "older size":
        client.hset(book, "state", client.hget(book, "state") + bytes(8))
    else:
        client.hdel(book, "live")
    fresh = RedisGate(client, gate.limits, ttl=60, namespace=gate.namespace)
    assert fresh.try_enter("BBB", 1).reason is R.BOOK_NOT_RESTORED
    assert gate.try_enter("BBB", 1).reason is R.BOOK_NOT_RESTORED
    assert held.active is False  # its record is not read in another layout's terms either
    gate.restore({})
    assert gate.try_enter("BBB", 1)
    assert gate.audit(gate.limits) == []


def test_a_records_times_are_the_decisions_own(client: Any) -> None:
    """The record keeps reserved_at as TIME's two strings joined (no sprintf on the decision
    path), its microseconds zero-padded to six digits; the expiry index keeps the number the
    server computed. They must agree to the microsecond (TIME's microseconds are below 100000,
    so shorter and padded, about one try in ten)."""
    gate = new_gate(client, Limits(), ttl=2.5)
    for k in range(300):
        r = res(gate.try_enter("AAA", 1, order_id=f"t{k}"))
        record = gate.snapshot().orders[r.order_id]
        assert record.expires_at_us == record.reserved_at_us + 2_500_000, (k, record)
        assert abs(record.reserved_at_us - r.reserved_at * 1_000_000) < 2, (k, record)
        assert r.release()
