"""Eviction: the namespace's keys under every ``maxmemory-policy`` of Redis 7.0.

The README asks for ``maxmemory-policy noeviction``; these tests show what happens when a server
is run otherwise. Each policy gets a server of its own with a small ``maxmemory`` (3 MB, about
2 MB above an empty server) and ``maxmemory-samples 1``, and one thread drives a deterministic
load (``drive``): filler writes of 64 KB (every other one with a TTL, so the ``volatile-*``
policies have candidates) interleaved with the gate's operations (entries on six symbols,
releases, fills, position cuts and closes, sweeps). The test keeps its own model of the truth
(``Exchange``): every admission it received and has not released or filled is an order at the
exchange, and every fill a position. After every admission the model is checked against the
limits; an admission that makes it exceed one is a breach. The test also plays the router and
the operator: a write the store refused is retried (with the model's current value) before any
new fill or position change, and ``BOOK_NOT_RESTORED`` is answered by
``restore(model positions, model open orders)``, retried while the store refuses it.

What was observed (``maxmemory 3mb``, ``maxmemory-samples 1``, 600 rounds):

* ``allkeys-random``, ``allkeys-lru``, ``allkeys-lfu``: the book and both indexes are evicted
  (6 to 63 times each in a run, seen in the ``evicted`` keyspace events), the gate denies with
  ``BOOK_NOT_RESTORED`` until the operator restores, writes raise ``BookNotRestored``; no OOM.
* ``volatile-lru``, ``volatile-lfu``, ``volatile-random``, ``volatile-ttl`` and ``noeviction``:
  the namespace's keys have no TTL, so they are never evicted (only the filler with a TTL is,
  under ``volatile-*``); once nothing can be evicted, writes fail with OOM and the gate denies
  with ``BACKEND_UNAVAILABLE``, its writes raise ``StoreUnavailable`` and its releases return
  False, until the filler is deleted.
* 0 breaches under every policy, and after the load the book equals the model.
* A ``halt()`` is in the book: an evicted book takes it along, and the restore starts unhalted.

The breach counter is shown not to be vacuous by the same driver on a server without
``maxmemory``, where the book is deleted (``DEL``, as an eviction would) at fixed rounds: the
operator who restores from the model gets 0 breaches, one who restores an empty book behind the
model's back (``restore({})``, what a gate without the marker would do by itself) gets breaches.
The deterministic tests of one key deleted show each key's loss is noticed (the book at once,
``expiry`` and ``forget`` by their next sweep, with only over-blocking until then).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, redis_server_binary

from pendingledger import PortfolioLimits
from pendingledger.limits import Decision, DenyReason

redis = pytest.importorskip("redis")

from pendingledger.redis import (  # noqa: E402
    SCALE,
    BookNotRestored,
    RedisGate,
    RedisReservation,
    StoreUnavailable,
)
from pendingledger.redis.testing import advance_server_clock, freeze_server_clock  # noqa: E402

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]
R = DenyReason

LIMITS = PortfolioLimits(
    max_concurrent_positions=4, max_gross_exposure=1_000, max_symbol_exposure=400
)
SYMBOLS = ("S0", "S1", "S2", "S3", "S4", "S5")
NOTIONALS = (50, 100, 150, 200)
TTL = 3_600.0  # no reservation expires during a load run: the model never has to guess
MAXMEMORY = "3mb"
FILLER = b"x" * 65_536
ROUNDS = 600
OOM_STREAK = 15  # filler writes refused in a row before the test deletes its filler
SWEEP_EVERY = 20  # rounds between forced sweeps (an eviction of an index is noticed by one)
EVICTING = ("allkeys-random", "allkeys-lru", "allkeys-lfu")
NOT_EVICTING = ("volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl", "noeviction")


# ---------------------------------------------------------------------------- the model


class Exchange:
    """The truth the gate must never let exceed the limits: positions (from fills) and the
    orders at the exchange (every admission not yet released or filled)."""

    def __init__(self, limits: PortfolioLimits = LIMITS) -> None:
        self.limits = limits
        self.positions: dict[str, int] = {}
        self.orders: dict[str, tuple[str, int]] = {}  # order_id -> (symbol, notional)
        self.admissions = 0
        self.breaches: list[str] = []

    def over(self) -> list[str]:
        """Every limit the true exposure exceeds now."""
        exposure = dict(self.positions)
        for symbol, notional in self.orders.values():
            exposure[symbol] = exposure.get(symbol, 0) + notional
        found = []
        max_pos = self.limits.max_concurrent_positions
        if max_pos is not None and len(exposure) > max_pos:
            found.append(f"{len(exposure)} symbols > {max_pos}: {sorted(exposure)}")
        gross = sum(exposure.values())
        max_gross = self.limits.max_gross_exposure
        if max_gross is not None and gross > max_gross:
            found.append(f"gross {gross} > {max_gross}")
        max_symbol = self.limits.max_symbol_exposure
        if max_symbol is not None:
            found += [f"{s} {v} > {max_symbol}" for s, v in exposure.items() if v > max_symbol]
        return found

    def admitted(self, order_id: str, symbol: str, notional: int) -> None:
        assert order_id not in self.orders
        self.orders[order_id] = (symbol, notional)
        self.admissions += 1
        over = self.over()
        if over:
            self.breaches.append(f"admission of {order_id} ({symbol} {notional}): {over}")

    def released(self, order_id: str) -> None:
        del self.orders[order_id]

    def filled(self, order_id: str) -> tuple[str, int]:
        """The order filled in full: its symbol and the position after the fill."""
        symbol, notional = self.orders.pop(order_id)
        self.positions[symbol] = self.positions.get(symbol, 0) + notional
        return symbol, self.positions[symbol]

    def open_orders(self) -> list[tuple[str, int, str]]:
        return [(symbol, notional, oid) for oid, (symbol, notional) in self.orders.items()]

    def restore(self, gate: RedisGate) -> None:
        """The operator's restore: what the exchange says."""
        gate.restore(dict(self.positions), self.open_orders())


def admit(gate: RedisGate, model: Exchange, symbol: str, notional: int, oid: str) -> Decision:
    decision = gate.try_enter(symbol, notional, order_id=oid)
    if decision:
        model.admitted(oid, symbol, notional)
    return decision


def handle(decision: Decision) -> RedisReservation:
    assert decision, decision
    r: object = decision.reservation
    assert isinstance(r, RedisReservation)
    return r


def assert_book_is_the_model(gate: RedisGate, model: Exchange) -> None:
    """The gate's book and reservations are exactly the model's, and consistent."""
    snap = gate.snapshot()
    assert snap.positions == {s: v * SCALE for s, v in model.positions.items()}
    orders = {oid: (rec.symbol, rec.units) for oid, rec in snap.orders.items()}
    assert orders == {oid: (s, n * SCALE) for oid, (s, n) in model.orders.items()}
    assert gate.audit(LIMITS) == []


# ---------------------------------------------------------------------------- the load


@dataclass
class Tally:
    """What one load run saw."""

    decisions: dict[str, int] = field(default_factory=dict)  # reason value ('admitted') -> n
    filler_writes: int = 0
    oom_writes: int = 0  # filler writes refused with OOM
    reliefs: int = 0  # times the test deleted its filler after OOM_STREAK refusals
    evicted: dict[str, int] = field(default_factory=dict)  # key ('filler') -> evictions seen
    restores: int = 0  # the operator's successful restores after the first
    restore_refused: int = 0  # restores the store refused (OOM): retried later
    book_not_restored_writes: int = 0  # book writes that raised BookNotRestored
    store_unavailable_writes: int = 0  # book writes that raised StoreUnavailable (not the above)
    releases_refused: int = 0  # releases that returned False (retried later)
    sweeps_refused: int = 0

    def count(self, decision: Decision) -> None:
        key = "admitted" if decision else str(decision.reason.value)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def of(self, reason: DenyReason) -> int:
        return self.decisions.get(reason.value, 0)

    def namespace_evictions(self) -> int:
        return sum(n for key, n in self.evicted.items() if key != "filler")


class EvictionEvents:
    """The server's ``evicted`` keyspace events, read without blocking (``poll``) and, at the
    end, up to a marker published after the last command (``drain``)."""

    def __init__(self, admin: Any, namespace_keys: tuple[str, ...]) -> None:
        self._admin = admin
        self._keys = namespace_keys
        self._marker = f"evx-end-{uuid.uuid4().hex}"
        self._pubsub = admin.pubsub()
        self._pubsub.subscribe("__keyevent@0__:evicted", self._marker)
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < 2:  # both subscriptions confirmed: no event can be missed after this
            message = self._pubsub.get_message(timeout=0.01)
            confirmed += message is not None and message["type"] == "subscribe"
            assert time.monotonic() < deadline, "the subscriptions were never confirmed"

    def poll(self, tally: Tally, timeout: float = 0.0) -> bool:
        """Record the events that have arrived; True once the end marker has."""
        message = self._pubsub.get_message(timeout=timeout)
        while message is not None:
            if message["type"] == "message":
                if message["channel"].decode() == self._marker:
                    return True
                key = message["data"].decode()
                name = key if key in self._keys else "filler"
                tally.evicted[name] = tally.evicted.get(name, 0) + 1
            message = self._pubsub.get_message(timeout=0.0)
        return False

    def drain(self, tally: Tally) -> None:
        """Every event of the commands sent so far (they precede the marker on the socket)."""
        self._admin.publish(self._marker, "end")
        deadline = time.monotonic() + 10
        while not self.poll(tally, timeout=0.01):
            assert time.monotonic() < deadline, "the end marker never arrived"

    def close(self) -> None:
        self._pubsub.close()


class Pressure:
    """The filler load: 64 KB writes (every other one with a TTL) until one is refused with OOM,
    then 1 KB writes without a TTL until one is refused too (the big write is refused while its
    own query buffer would pass ``maxmemory``; the small ones take the memory past it, so every
    write is refused from then on, the gate's too), then OOM_STREAK rounds of refusals, then the
    filler is deleted (``DEL`` is allowed under OOM) and it starts again. Under ``allkeys-*``
    nothing is refused: each write evicts."""

    def __init__(self, admin: Any) -> None:
        self.admin = admin
        self.keys: list[str] = []
        self.full_for = -1  # rounds refused since the memory was full; -1: not full yet

    def _set(self, name: str, value: bytes, px: int | None, tally: Tally) -> bool:
        try:
            self.admin.set(name, value, px=px)
        except redis.exceptions.OutOfMemoryError:
            tally.oom_writes += 1
            return False
        tally.filler_writes += 1
        self.keys.append(name)
        return True

    def round(self, i: int, tally: Tally) -> None:
        if self.full_for >= 0:
            self.full_for += 1
            if not self._set(f"filler:{i}:small", FILLER[:1024], None, tally):
                if self.full_for >= OOM_STREAK:
                    self.relieve()
                    tally.reliefs += 1
                return
        if self._set(f"filler:{i}", FILLER, 600_000 + i if i % 2 else None, tally):
            return
        for j in range(1_000):  # top up: the last kilobytes
            if not self._set(f"filler:{i}:{j}", FILLER[:1024], None, tally):
                self.full_for = 0
                return
        raise AssertionError("1,000 writes of 1 KB never filled the memory")

    def relieve(self) -> None:
        if self.keys:
            self.admin.delete(*self.keys)
        self.keys.clear()
        self.full_for = -1


def drive(
    gate: RedisGate,
    admin: Any,
    model: Exchange,
    *,
    rounds: int,
    seed: int,
    filler: bool,
    delete_at: Mapping[int, int] | None = None,
    mistaken_restore: bool = False,
    events: EvictionEvents | None = None,
) -> Tally:
    """One thread, deterministic given ``seed`` (and the server's memory): each round writes
    filler (when ``filler``), deletes ``gate.keys[delete_at[round]]`` (when given), then does
    the operator's and router's pending work and one gate operation. ``mistaken_restore``: the
    operator answers ``BOOK_NOT_RESTORED`` with ``restore({})`` instead of the model."""
    rnd = random.Random(seed)
    tally = Tally()
    need_restore = False
    # writes the store refused, in order: ("release", order_id), ("fill" | "pos", symbol)
    pending: list[tuple[str, str]] = []
    fills: dict[str, str] = {}  # symbol -> order_id of a fill not yet confirmed to the gate
    pressure = Pressure(admin) if filler else None

    def write(op: str, *args: Any, **kwargs: Any) -> bool:
        """A book write; False (counted, and the restore or a retry arranged) if refused."""
        nonlocal need_restore
        try:
            getattr(gate, op)(*args, **kwargs)
        except BookNotRestored:
            tally.book_not_restored_writes += 1
            need_restore = True
            return False
        except StoreUnavailable:
            tally.store_unavailable_writes += 1
            return False
        return True

    def retry_pending() -> None:
        """Send again what the store refused, in order, with the model's current values."""
        while pending:
            kind, key = pending[0]
            if kind == "release":
                if not gate.release_order(key):
                    tally.releases_refused += 1
                    return
            elif kind == "fill":
                oid = fills[key]
                if not write("confirm_fill", oid, model.positions[key], symbol=key):
                    return
                del fills[key]
            else:
                exposure = model.positions.get(key)
                ok = (
                    write("close_position", key)
                    if exposure is None
                    else write("set_position", key, exposure)
                )
                if not ok:
                    return
            pending.pop(0)

    for i in range(rounds):
        if pressure is not None:
            pressure.round(i, tally)
        if delete_at and i in delete_at:
            admin.delete(gate.keys[delete_at[i]])
        if events is not None:
            events.poll(tally)

        if need_restore:  # the operator: what the exchange says (or, broken, nothing)
            try:
                gate.restore({}) if mistaken_restore else model.restore(gate)
            except StoreUnavailable:
                tally.restore_refused += 1
            else:
                tally.restores += 1
                need_restore = False
                pending.clear()  # the restored book is the model: nothing left to send
                fills.clear()
        retry_pending()

        action = rnd.random()
        if i % SWEEP_EVERY == SWEEP_EVERY - 1:
            try:
                gate.sweep()
            except StoreUnavailable:
                tally.sweeps_refused += 1
        elif action < 0.5:
            symbol, notional = rnd.choice(SYMBOLS), rnd.choice(NOTIONALS)
            decision = admit(gate, model, symbol, notional, f"o{i}")
            tally.count(decision)
            if decision.reason is R.BOOK_NOT_RESTORED:
                need_restore = True
        elif action < 0.7 and model.orders:
            oid = rnd.choice(sorted(model.orders))
            model.released(oid)  # the exchange rejected it: gone whatever the gate says
            if not gate.release_order(oid):
                tally.releases_refused += 1
                pending.append(("release", oid))
        elif action < 0.85 and model.orders and not pending:
            oid = rnd.choice(sorted(model.orders))
            symbol, position = model.filled(oid)
            if not write("confirm_fill", oid, position, symbol=symbol):
                fills[symbol] = oid
                pending.append(("fill", symbol))
        elif model.positions and not pending:
            symbol = rnd.choice(sorted(model.positions))
            smaller = model.positions[symbol] // 2
            if smaller < 25:
                del model.positions[symbol]
                ok = write("close_position", symbol)
            else:
                model.positions[symbol] = smaller
                ok = write("set_position", symbol, smaller)
            if not ok:
                pending.append(("pos", symbol))

    if events is not None:
        events.drain(tally)
    # Stop the pressure, send what is pending, and let the sweeps find any key still missing.
    if pressure is not None:
        pressure.relieve()
    admin.config_set("maxmemory", 0)
    gate.sweep()
    if need_restore or not gate.book_restored():
        gate.restore({}) if mistaken_restore else model.restore(gate)
        tally.restores += 1
    else:
        retry_pending()
        # (after an empty restore the gate no longer knows the model's orders: releases fail)
        assert mistaken_restore or not pending, pending
    return tally


# ---------------------------------------------------------------------------- the servers


class SmallServer(RedisServer):
    """A server with a small ``maxmemory`` under ``policy``, and the ``evicted`` events on."""

    def __init__(self, binary: str, workdir: Path, policy: str) -> None:
        super().__init__(binary, workdir)
        self.policy = policy

    def _argv(self) -> list[str]:
        return [
            *super()._argv(),
            "--maxmemory", MAXMEMORY,
            "--maxmemory-policy", self.policy,
            "--maxmemory-samples", "1",
            "--notify-keyspace-events", "Ee",
        ]  # fmt: skip


@pytest.fixture
def admin(server: RedisServer) -> Iterator[Any]:
    c = redis.Redis.from_url(server.url, socket_timeout=10)
    yield c
    c.close()


def new_gate(url: str, **kw: Any) -> RedisGate:
    return RedisGate.from_url(
        url, LIMITS, ttl=kw.pop("ttl", TTL), namespace=uuid.uuid4().hex[:12], timeout=10, **kw
    )


# ---------------------------------------------------------------------------- every policy


@pytest.mark.parametrize("policy", EVICTING + NOT_EVICTING)
def test_no_policy_lets_the_gate_breach(tmp_path: Path, policy: str) -> None:
    srv = SmallServer(redis_server_binary(), tmp_path, policy)
    srv.start()
    try:
        admin = redis.Redis.from_url(srv.url, socket_timeout=10)
        gate = new_gate(srv.url)
        model = Exchange()
        model.restore(gate)  # the library is loaded before the memory runs short
        events = EvictionEvents(admin, gate.keys)
        try:
            tally = drive(gate, admin, model, rounds=ROUNDS, seed=7, filler=True, events=events)
        finally:
            events.close()
        print(f"{policy}: {tally}")  # what was observed (pytest -s shows it)
        assert model.breaches == []
        assert tally.decisions.get("admitted", 0) >= 50  # the load did trade
        assert sum(tally.decisions.values()) >= ROUNDS // 3
        assert_book_is_the_model(gate, model)
        bnr = tally.of(R.BOOK_NOT_RESTORED) + tally.book_not_restored_writes
        if policy in EVICTING:
            assert tally.namespace_evictions() >= 1, tally.evicted
            assert bnr >= 1
            assert tally.restores >= 1
        else:
            assert tally.namespace_evictions() == 0, tally.evicted
            assert bnr == 0
            assert tally.oom_writes >= 1 and tally.reliefs >= 1
            assert tally.of(R.BACKEND_UNAVAILABLE) >= 10  # observed: 70 to 115
            assert tally.store_unavailable_writes >= 10 and tally.releases_refused >= 1
            if policy == "noeviction":
                assert tally.evicted == {}
            else:
                assert tally.evicted.get("filler", 0) >= 1  # the filler with a TTL went first
        admin.close()
        gate.client.close()
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- the breach counter


@pytest.mark.parametrize("mistaken", [False, True], ids=["restore-the-model", "restore-empty"])
def test_the_load_counts_the_breaches_of_an_empty_restore(
    server: RedisServer, mistaken: bool
) -> None:
    """The driver of the policy test, without maxmemory: the book is deleted at fixed rounds as
    an eviction would. Restoring the model holds every limit; restoring an empty book behind the
    model's back (what a gate without its marker would do by itself) breaches, and the counter
    counts it."""
    admin = redis.Redis.from_url(server.url, socket_timeout=10)
    gate = new_gate(server.url)
    model = Exchange()
    model.restore(gate)
    tally = drive(
        gate, admin, model, rounds=300, seed=11, filler=False,
        delete_at={60: 0, 140: 0, 220: 0}, mistaken_restore=mistaken,
    )  # fmt: skip
    assert tally.of(R.BOOK_NOT_RESTORED) + tally.book_not_restored_writes >= 3
    assert tally.restores >= 3
    print(f"mistaken={mistaken}: {len(model.breaches)} breaches: {model.breaches[:3]}")
    if mistaken:
        assert model.breaches, "the mistaken restore went unnoticed: the counter is vacuous"
        first = int(model.breaches[0].split()[2][1:])  # "admission of o<round> ..."
        assert first > 60  # none before the first deletion and its empty restore
        assert gate.audit() == []  # the gate's own book is consistent: only the truth shows it
    else:
        assert model.breaches == []
        assert_book_is_the_model(gate, model)
    admin.close()
    gate.client.close()


# ---------------------------------------------------------------------------- one key deleted


def at_the_limits(gate: RedisGate, model: Exchange) -> dict[str, RedisReservation]:
    """A book of 3 symbols, gross 800: AAA position 300, reservations BBB 300 and CCC 200."""
    model.positions["AAA"] = 300
    model.restore(gate)
    return {
        oid: handle(admit(gate, model, symbol, notional, oid))
        for symbol, notional, oid in (("BBB", 300, "b"), ("CCC", 200, "c"))
    }


@pytest.mark.parametrize("key", [0, 1, 2], ids=["book", "expiry", "forget"])
def test_one_key_deleted_as_an_eviction_would(admin: Any, server: RedisServer, key: int) -> None:
    gate = new_gate(server.url)
    model = Exchange()
    at_the_limits(gate, model)
    assert admin.delete(gate.keys[key]) == 1
    if key == 0:  # the marker went with the book: noticed by the next call
        assert gate.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED
        with pytest.raises(BookNotRestored):
            gate.set_position("AAA", 100)
        with pytest.raises(BookNotRestored):
            gate.confirm_fill("b", 300, symbol="BBB")
        assert gate.release_order("c") is False
    else:  # an index: the book still counts everything until a sweep reads the sentinel
        assert gate.try_enter("DDD", 201).reason is R.MAX_GROSS_EXPOSURE
        assert gate.try_enter("AAA", 101).reason is R.MAX_SYMBOL_EXPOSURE
        assert admit(gate, model, "DDD", 200, "d")  # gross 1000 exactly
        assert gate.try_enter("EEE", 1).reason is R.MAX_CONCURRENT_POSITIONS
        assert gate.book_restored()
        gate.sweep()  # reads both sentinels: one is missing
        assert gate.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED
    assert not gate.book_restored()
    assert gate.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED
    model.restore(gate)  # the operator
    assert gate.book_restored()
    assert_book_is_the_model(gate, model)
    free = 1_000 - 800 - (200 if key else 0)
    assert gate.try_enter("DDD", free + 1).reason is not None
    if free:
        assert admit(gate, model, "DDD", free, "d2")
    assert gate.try_enter("EEE", 1).reason is not None
    assert model.breaches == []
    assert model.admissions >= 3
    gate.client.close()


def test_an_evicted_expiry_index_is_noticed_when_the_earliest_reservation_expires(
    admin: Any, server: RedisServer
) -> None:
    """Until the sweep meets the missing sentinel (the earliest expiry passed, on the test
    clock), reservations without expiry entries keep counting: the gate over-blocks, never
    under-counts. Then every decision is denied until the operator restores."""
    gate = new_gate(server.url, ttl=30.0)
    model = Exchange()
    model.restore(gate)
    freeze_server_clock(gate)
    first = handle(admit(gate, model, "AAA", 400, "a"))
    advance_server_clock(gate, 10)
    assert admit(gate, model, "BBB", 400, "b")
    assert admin.delete(gate.keys[1]) == 1
    assert gate.try_enter("CCC", 201).reason is R.MAX_GROSS_EXPOSURE  # both still count
    assert admit(gate, model, "CCC", 200, "c")  # the room that is left, and no more
    assert gate.try_enter("AAA", 1).reason is R.MAX_GROSS_EXPOSURE
    advance_server_clock(gate, 19.5)  # 0.5 s before the first reservation expires
    assert first.active
    assert gate.try_enter("DDD", 1).reason is R.MAX_GROSS_EXPOSURE
    assert gate.book_restored()
    snap = gate.snapshot()
    assert "expiry" in snap.sentinels_missing
    assert set(snap.orders) == {"a", "b", "c"}
    assert any("sentinels" in p for p in gate.audit())  # the auditor sees the loss at once
    advance_server_clock(gate, 0.5)  # the first reservation's expiry: the sweep runs
    assert gate.try_enter("DDD", 1).reason is R.BOOK_NOT_RESTORED
    assert not gate.book_restored()
    model.restore(gate)
    assert_book_is_the_model(gate, model)
    assert gate.try_enter("DDD", 1).reason is R.MAX_GROSS_EXPOSURE
    assert model.breaches == []
    gate.client.close()


def test_an_evicted_forget_index_is_noticed_by_the_next_forget_sweep(
    admin: Any, server: RedisServer
) -> None:
    """``forget`` is swept at most once a second of the server's clock, by writing calls."""
    gate = new_gate(server.url, ttl=30.0)
    model = Exchange()
    model.restore(gate)
    freeze_server_clock(gate)
    advance_server_clock(gate, 2)  # past the forget sweep that restore scheduled
    assert admit(gate, model, "AAA", 100, "a")  # this call swept forget: the next is 1 s on
    assert admin.delete(gate.keys[2]) == 1
    assert admit(gate, model, "BBB", 100, "b")
    assert gate.release_order("b")
    model.released("b")  # the release recreated forget without its sentinel
    assert gate.book_restored()
    advance_server_clock(gate, 1)
    assert gate.try_enter("CCC", 1).reason is R.BOOK_NOT_RESTORED
    model.restore(gate)
    assert_book_is_the_model(gate, model)
    gate.client.close()


def test_a_halt_goes_with_an_evicted_book(admin: Any, server: RedisServer) -> None:
    """As the README says: the halt flag is in the book, so an evicted book takes the halt with
    it, and the operator's restore starts unhalted (halt again after restoring if it mattered)."""
    gate = new_gate(server.url)
    model = Exchange()
    model.restore(gate)
    gate.halt()
    assert gate.try_enter("AAA", 1).reason is R.HALTED
    assert admin.delete(gate.keys[0]) == 1
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED
    model.restore(gate)
    assert not gate.halted
    assert admit(gate, model, "AAA", 1, "a")
    gate.client.close()
