"""Test helpers for the Redis gate: a namespace's server-side test clock, moved instead of slept.

``RedisGate`` takes time from the server (``TIME``, read inside its server code), never from a
client, so a test cannot hand it a ``ManualClock``. Instead each namespace can have a test clock,
kept in Redis beside its book (in the ``state`` field of its ``book`` hash, under the same
``{namespace}`` hash tag). The server code's now is ``TIME`` plus the clock's offset, read in the
same call as everything else, and ``advance_server_clock`` grows the offset: a TTL is tested by
moving the server's time for every process sharing the namespace, never by sleeping:

    from pendingledger.redis.testing import advance_server_clock

    gate = RedisGate(client, limits, ttl=30, namespace="test-1")
    gate.restore({})
    reservation = gate.try_enter("BTCUSDT", 1_000).reservation
    advance_server_clock(gate, 30)   # the namespace's clock is now 30 s later
    assert not reservation.active    # expired (the next operation sweeps it)

Like ``pendingledger.testing.ManualClock`` the clock only moves forward. ``freeze_server_clock``
also stops ``TIME`` for the namespace (as trio's ``MockClock`` does at rate 0), for a test that
needs the exact instant, such as a TTL's last microsecond. ``RedisGate.restore`` keeps the clock;
``RedisGate.wipe`` deletes it with the rest of the namespace.

For tests only (and the race demo's deliberately broken gate, ``pendingledger.sim``): the gate
never calls this module, and in production the fields are absent (now is the server's ``TIME``).
Moving the clock of a live namespace expires its reservations early, and the broken gates of the
stress tests and the race demo reserve without checking (``check_then_reserve``: ``enter`` modes
``check`` and ``force``), so the gate's server code refuses both unless the namespace's test
operations are on: ``enable_test_ops`` turns them on (a flag ``testing`` in the namespace's
``state`` field, kept by ``restore``, deleted by ``wipe``), and ``advance_server_clock`` and
``freeze_server_clock`` call it themselves. This module is the only public way to turn them on;
never do it on a namespace that trades.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import redis

from pendingledger import _units
from pendingledger.limits import Decision
from pendingledger.redis._gate import RedisGate, StoreUnavailable, enter, micros, namespace_keys
from pendingledger.redis._library import ServerCode
from pendingledger.testing import _finite_seconds
from pendingledger.trading import Side

__all__ = [
    "advance_server_clock",
    "check_then_reserve",
    "enable_test_ops",
    "freeze_server_clock",
    "server_clock",
]

_MAX_STEP_US = 2**52  # the script refuses a reading at or past 2^52 us anyway (year 2112)


def enable_test_ops(target: RedisGate | redis.Redis, *, namespace: str | None = None) -> None:
    """Turn on the namespace's test operations: moving and freezing its clock (this module's
    functions call this themselves) and the broken gates' ``enter`` modes ``check`` and
    ``force``. For tests and demos only: never on a namespace that trades.

    ``target`` is a ``RedisGate`` (its namespace) or a ``redis.Redis`` client with ``namespace``
    given. Sets the flag ``testing`` of the namespace's ``state`` field; ``RedisGate.restore``
    keeps it, ``RedisGate.wipe`` deletes it. Raises ``StoreUnavailable`` if Redis cannot confirm.
    """
    client, keys = _target(target, namespace)
    code = target.server if isinstance(target, RedisGate) else ServerCode(client, keys)
    try:
        code.call("control", "testing", "1", os.urandom(8).hex())
    except redis.RedisError as exc:
        raise StoreUnavailable(f"test operations not turned on: {exc}") from exc


def advance_server_clock(
    target: RedisGate | redis.Redis, seconds: float, *, namespace: str | None = None
) -> float:
    """Move the namespace's clock forward by ``seconds`` (finite, >= 0); return its new reading.

    ``target`` is a ``RedisGate`` (its namespace) or a ``redis.Redis`` client with ``namespace``
    given. One atomic script call; every client of the namespace sees the new time. A reservation
    whose expiry the clock reaches is expired from then on, exactly as if ``seconds`` had gone by
    (expired when now >= reserved_at + ttl): ``active`` is False at once, and the next operation
    sweeps it (counted in ``stats().expired``). The step is in whole microseconds, rounded up like
    the gate's ``ttl``, so advancing by ``ttl`` always reaches a reservation's expiry.

    The reading is in Unix seconds (the server's ``TIME`` plus the test clock). A negative or
    non-finite step raises ``ValueError`` and changes nothing, as does a step that would take the
    clock past 2^52 microseconds (year 2112); a non-number raises ``TypeError``.
    """
    step = _finite_seconds("seconds", seconds, allow_negative=False)
    step_us = micros(step)
    if step_us >= _MAX_STEP_US:
        raise ValueError(f"seconds must be below 2**52 microseconds (~142 years), got {seconds!r}")
    return _clock(target, namespace, step_us, freeze=False) / 1_000_000


def freeze_server_clock(target: RedisGate | redis.Redis, *, namespace: str | None = None) -> float:
    """Stop the server's ``TIME`` for the namespace at its current reading; return the reading.

    From then on the namespace's clock moves only by ``advance_server_clock``, so a test can
    reach an exact microsecond. Freezing a frozen clock changes nothing. It stays frozen until
    ``RedisGate.wipe`` deletes the namespace (``restore`` keeps it).
    """
    return _clock(target, namespace, 0, freeze=True) / 1_000_000


def server_clock(target: RedisGate | redis.Redis, *, namespace: str | None = None) -> float:
    """The namespace's clock as its script reads it now (Unix seconds): the server's ``TIME``
    (or the frozen reading) plus the test clock's offset. Writes nothing."""
    return _clock(target, namespace, 0, freeze=False) / 1_000_000


def _target(
    target: RedisGate | redis.Redis, namespace: str | None
) -> tuple[redis.Redis, tuple[str, ...]]:
    """The client and the namespace's keys that ``target`` (and ``namespace``) name."""
    if isinstance(target, RedisGate):
        if namespace is not None and namespace != target.namespace:
            raise ValueError(
                f"namespace={namespace!r} but the gate's namespace is {target.namespace!r}"
            )
        return target.client, target.keys  # type: ignore[return-value]
    if namespace is None:
        raise TypeError("namespace is required when target is a Redis client, not a RedisGate")
    return target, namespace_keys(namespace)


def _clock(
    target: RedisGate | redis.Redis, namespace: str | None, step_us: int, *, freeze: bool
) -> int:
    client, keys = _target(target, namespace)
    code = target.server if isinstance(target, RedisGate) else ServerCode(client, keys)
    if step_us or freeze:  # moving or freezing the clock needs the test operations on
        enable_test_ops(target, namespace=namespace)
    try:
        reply = code.call("clock", step_us, "1" if freeze else "0")
    except redis.ResponseError as exc:
        if "clock overflow" in str(exc):
            raise ValueError(f"test clock not moved: {exc}") from exc
        raise StoreUnavailable(f"test clock not moved: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreUnavailable(f"test clock not moved: {exc}") from exc
    return int(reply[0])


def check_then_reserve(
    gate: RedisGate,
    symbol: str,
    notional: _units.Number,
    *,
    order_id: str | None = None,
    side: Side | str | None = None,
    between: Callable[[], object] | None = None,
    strategy: str | None = None,
) -> Decision:
    """The check-then-act bug on Redis, for the tests and the race demo that must catch it.

    The gate's own server code checks the limits in one call (``enter`` mode ``check``, which
    reserves nothing) and reserves without checking in a second (mode ``force``); ``between``
    runs in the gap, where another entry can take the room the check saw. Both modes are test
    operations: with them off the server's refusal is raised (``redis.ResponseError``).
    Arguments are checked as ``RedisGate.try_enter`` checks them (``side`` too: the check
    holds the order's figures to the rules, the trading state included, and the forced reserve
    records it under its side and ``strategy``, whose budget the check holds it to as
    ``try_enter`` does); a store failure denies with
    ``BACKEND_UNAVAILABLE``. Never use it on a namespace that trades.
    """
    checked = enter(gate, symbol, notional, order_id, "check", side, strategy)
    if checked is not None:
        return checked
    if between is not None:
        between()
    decision = enter(gate, symbol, notional, order_id, "force", side, strategy)
    assert decision is not None
    return decision
