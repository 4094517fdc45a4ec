"""ACL: the gate runs as a least-privilege Redis user (validated on Redis 7.0).

The ACL documented in the README, for a namespace ``<ns>`` (one key pattern per namespace)::

    ACL SETUSER pl_gate on >secret resetkeys ~pendingledger:{<ns>}:* resetchannels +@all -@dangerous
        -function|flush -function|delete -function|restore

(``FUNCTION FLUSH``, ``DELETE`` and ``RESTORE`` are ``@write @scripting``, not ``@dangerous``:
without the last three rules the user could drop other applications' libraries.)

It also covers ``min_replicas`` (``WAIT`` is ``@slow @connection``, not ``@dangerous``).

The smallest ACL that works, command by command, is the same line with ``+@all -@dangerous``
replaced by these rules (on the same line; the functions' own commands are checked against the
caller's ACL too; ``+wait`` only for ``min_replicas``)::

    -@all +fcall +function|load +del +hmget +hset +hdel +hgetall +zadd +zrem +zrange
    +zrangebyscore +time +wait

What the tests show, each as the restricted user (``redis.Redis(username=, password=)``):

* the whole surface works with no ``NOPERM`` (``ACL LOG`` stays empty): the library loaded from
  scratch by the user's first call (the admin ran ``FUNCTION FLUSH``), ``restore``, admissions
  and every denial, the reservation's ``active``/``reduce``/``release``, ``release``,
  ``release_order``, ``reduce_order``, ``set_position``, ``close_position``, ``confirm_fill``
  (also with ``filled=``), ``positions``, ``halted``/``halt``/``resume``, ``stats``,
  ``snapshot``, ``audit``, ``sweep``, ``book_restored``, ``wipe`` and the test clock helpers;
* every command the gate sends (the client's and its functions', recorded by the admin's
  ``MONITOR``) is outside ``@dangerous`` and in the minimal list, and each command of the list
  is needed: without any one of them the same surface fails (the ACL test can fail);
* a gate on a namespace outside the user's key pattern fails closed: ``BACKEND_UNAVAILABLE``
  on ``try_enter``, ``StoreUnavailable`` on writes and reads, ``False`` on releases;
* a user without ``@scripting`` is never admitted (``BACKEND_UNAVAILABLE``).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, redis_server_binary

from pendingledger import PortfolioLimits
from pendingledger.limits import DenyReason

redis = pytest.importorskip("redis")

from pendingledger.redis import (  # noqa: E402
    BookNotRestored,
    OpenOrder,
    RedisGate,
    RedisReservation,
    StoreUnavailable,
)
from pendingledger.redis.testing import (  # noqa: E402
    advance_server_clock,
    check_then_reserve,
    enable_test_ops,
    freeze_server_clock,
    server_clock,
)

pytestmark = pytest.mark.redis
R = DenyReason

LIMITS = PortfolioLimits(
    max_concurrent_positions=4, max_gross_exposure=1_000, max_symbol_exposure=400
)
TTL = 30.0
PASSWORD = "secret"

README_ACL = (
    "on >secret resetkeys ~pendingledger:{{{ns}}}:* resetchannels +@all -@dangerous"
    " -function|flush -function|delete -function|restore"
)
"""The README's ACL (``ACL SETUSER <user> ...``), ``{ns}`` the namespace."""

COMMANDS = (
    "fcall", "function|load", "del",  # from the client (DEL: wipe(), and restore inside)
    "hmget", "hset", "hdel", "hgetall", "zadd", "zrem", "zrange", "zrangebyscore", "time",
)  # fmt: skip
"""Every command the gate sends without ``min_replicas`` (``WAIT`` with it)."""


def minimal_acl(*, without: str = "", wait: bool = True) -> str:
    commands = [c for c in (*COMMANDS, *(("wait",) if wait else ())) if c != without]
    return "on >secret resetkeys ~pendingledger:{{{ns}}}:* resetchannels -@all " + " ".join(
        f"+{c}" for c in commands
    )


def set_user(admin: Any, rules: str, namespace: str) -> str:
    """A new user with ``rules`` (``{ns}`` filled in); its name."""
    name = f"pl_gate_{uuid.uuid4().hex[:8]}"
    assert admin.execute_command("ACL", "SETUSER", name, *rules.format(ns=namespace).split())
    return name


def connect(srv: RedisServer, user: str) -> Any:
    return redis.Redis(
        host="127.0.0.1", port=srv.port, username=user, password=PASSWORD, socket_timeout=5
    )


def denials(admin: Any) -> list[dict[str, Any]]:
    """``ACL LOG``: every command or key refused since the last reset (newest first)."""
    return list(admin.acl_log())


def res(decision: Any) -> RedisReservation:
    assert decision, decision
    r: object = decision.reservation
    assert isinstance(r, RedisReservation)
    return r


def active(reservation: RedisReservation) -> bool:
    """``reservation.active`` (asks the server each time)."""
    return reservation.active


def halted(gate: RedisGate) -> bool:
    """``gate.halted`` (asks the server each time)."""
    return gate.halted


# ---------------------------------------------------------------------------- what is sent


CONTAINERS = frozenset({"function", "client", "config", "acl", "object", "script", "memory"})


class Recorder:
    """The names of the commands every client sent and every script ran (``MONITOR``, as the
    admin) while the block ran: ``function|load`` for a container's subcommand."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=10)
        self._marker = f"recorder-{uuid.uuid4().hex}"
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.commands: set[str] = set()

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            for entry in monitor.listen():
                words = str(entry["command"]).split(" ", 2)
                if self._marker in entry["command"]:
                    if "end" in entry["command"]:
                        return
                    self.commands.clear()
                    self._started.set()
                    continue
                name = words[0].lower()
                if name in CONTAINERS and len(words) > 1:
                    name = f"{name}|{words[1].lower()}"
                self.commands.add(name)

    def __enter__(self) -> Recorder:
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:  # MONITOR is live once it shows a start marker (sent until it does)
            self._client.echo(f"{self._marker}-start")
            if self._started.wait(0.05):
                return self
            assert time.monotonic() < deadline, "MONITOR never showed the start marker"

    def __exit__(self, *exc: object) -> None:
        self._client.echo(f"{self._marker}-end")
        self._thread.join(10)
        self._client.close()


# ---------------------------------------------------------------------------- the surface


def exercise(gate: RedisGate) -> None:
    """Every operation of ``RedisGate``, its reservations and ``pendingledger.redis.testing``,
    each answer checked, on a namespace never restored, on a server without the gate's library
    (the first call loads it). Ends with the namespace wiped."""
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED  # loads the library
    assert gate.book_restored() is False
    with pytest.raises(BookNotRestored):
        gate.set_position("AAA", 1)
    made = gate.restore({"POS": 100}, [OpenOrder("OPN", 50, "open")])
    assert made is not None and [r.order_id for r in made] == ["open"]
    assert gate.restore({}, only_if_missing=True) is None
    assert gate.book_restored()

    a = res(gate.try_enter("AAA", 100, order_id="a"))
    assert active(a)
    assert a.reduce(40) and a.notional == 60
    assert a.release() and not active(a)
    assert gate.try_enter("AAA", 401).reason is R.MAX_SYMBOL_EXPOSURE
    assert res(gate.try_enter("BBB", 300, order_id="b"))
    assert gate.try_enter("CCC", 600).reason is R.MAX_GROSS_EXPOSURE  # 100 + 50 + 300 + 600
    assert res(gate.try_enter("CCC", 200, order_id="c"))
    assert gate.try_enter("DDD", 1).reason is R.MAX_CONCURRENT_POSITIONS

    assert gate.confirm_fill("b", 300)  # filled in full
    assert gate.confirm_fill("c", 80, symbol="CCC", filled=80)  # 120 stays reserved
    assert gate.reduce_order("c", 20)  # 100 stays
    assert gate.release_order("c")
    assert gate.release_order("c") is False
    gate.set_position("POS", 150)
    assert gate.close_position("POS")
    assert res(gate.try_enter("DDD", 10, order_id="d"))
    assert gate.release("DDD")
    assert gate.positions() == {"BBB": 300, "CCC": 80}

    assert halted(gate) is False
    gate.halt()
    assert halted(gate) is True
    assert gate.try_enter("EEE", 1).reason is R.HALTED
    gate.resume()
    assert halted(gate) is False

    stats = gate.stats()
    assert (stats.admitted, stats.released, stats.filled, stats.restored) == (4, 3, 1, 1)
    assert stats.outstanding == 1 and stats.gross_notional == 50
    assert {reason: n for reason, n in stats.denied.items() if n} == {
        R.BOOK_NOT_RESTORED: 1, R.MAX_SYMBOL_EXPOSURE: 1, R.MAX_GROSS_EXPOSURE: 1,
        R.MAX_CONCURRENT_POSITIONS: 1, R.HALTED: 1,
    }  # fmt: skip
    snap = gate.snapshot()
    assert set(snap.orders) == {"open"}
    assert gate.audit(LIMITS) == []

    enable_test_ops(gate)
    now = freeze_server_clock(gate)
    assert server_clock(gate) == now
    assert active(made[0])
    advance_server_clock(gate, TTL)  # the open order's reservation expires
    assert not active(made[0])
    assert gate.sweep() == 1
    assert check_then_reserve(gate, "EEE", 1, order_id="e")
    assert gate.stats().expired == 1

    assert gate.wipe() == 3
    assert gate.try_enter("AAA", 1).reason is R.BOOK_NOT_RESTORED


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def admin(server: RedisServer) -> Iterator[Any]:
    """The default user (no ACL) on the module's server; the library flushed and ACL LOG reset
    before each test, so the restricted user's first call must load it."""
    c = redis.Redis.from_url(server.url, socket_timeout=10)
    c.function_flush()
    c.acl_log_reset()
    yield c
    c.close()


def namespace() -> str:
    return f"acl-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- the ACLs that work


@pytest.mark.parametrize("rules", [README_ACL, minimal_acl()], ids=["readme", "minimal"])
def test_the_whole_surface_runs_as_the_restricted_user(
    server: RedisServer, admin: Any, rules: str
) -> None:
    ns = namespace()
    user = set_user(admin, rules, ns)
    client = connect(server, user)
    gate = RedisGate(client, LIMITS, ttl=TTL, namespace=ns)
    with Recorder(server.url) as sent:
        exercise(gate)
    assert denials(admin) == []  # not one command or key refused, even inside the functions
    assert admin.function_list(), "the restricted user's first call did not load the library"
    dangerous = {c.decode() if isinstance(c, bytes) else c for c in admin.acl_cat("dangerous")}
    assert sent.commands.isdisjoint(dangerous), sent.commands & dangerous
    # The minimal list is exactly what is sent, but the recorder's own ECHO and the connection's
    # HELLO (or AUTH), which Redis allows every user before and after authentication.
    assert sent.commands - {"echo", "hello", "auth"} == set(COMMANDS)
    # The user really is restricted: a dangerous command and a key elsewhere are refused.
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.hmget("elsewhere", ["state"])
    assert {(e["reason"], e["username"]) for e in denials(admin)} == {
        ("command", user),
        ("key", user),
    }
    client.close()


# ---------------------------------------------------------------------------- the ACLs that fail


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_of_the_minimal_acl_is_needed(
    server: RedisServer, admin: Any, command: str
) -> None:
    """Without any one command of the minimal list the surface fails: the ACL test can fail,
    and the refusal is the one command taken out."""
    ns = namespace()
    user = set_user(admin, minimal_acl(without=command), ns)
    client = connect(server, user)
    gate = RedisGate(client, LIMITS, ttl=TTL, namespace=ns)
    with pytest.raises((AssertionError, StoreUnavailable)):
        exercise(gate)
    refused = {(e["reason"], e["object"], e["username"]) for e in denials(admin)}
    assert refused == {("command", command, user)}
    client.close()


def test_a_gate_on_another_namespace_fails_closed(server: RedisServer, admin: Any) -> None:
    """The user's key pattern is its namespace: a gate on another namespace (restored, so an
    unrestricted client would be admitted there) is refused every key, and fails closed."""
    ns, other = namespace(), namespace()
    user = set_user(admin, README_ACL, ns)
    RedisGate(admin, LIMITS, ttl=TTL, namespace=other).restore({})
    client = connect(server, user)
    gate = RedisGate(client, LIMITS, ttl=TTL, namespace=other)
    decisions = [gate.try_enter("AAA", 1, order_id=f"o{i}") for i in range(3)]
    assert [d.reason for d in decisions] == [R.BACKEND_UNAVAILABLE] * 3
    for write in (
        lambda: gate.restore({}),
        lambda: gate.set_position("AAA", 1),
        lambda: gate.close_position("AAA"),
        lambda: gate.confirm_fill("o0", 1, symbol="AAA"),
        gate.halt,
        gate.resume,
        gate.positions,
        gate.stats,
        gate.snapshot,
        gate.sweep,
        gate.book_restored,
        gate.wipe,
        lambda: advance_server_clock(gate, 1),
    ):
        with pytest.raises(StoreUnavailable) as raised:
            write()
        assert isinstance(raised.value.__cause__, redis.exceptions.NoPermissionError)
    with pytest.raises(StoreUnavailable):
        gate.halted  # noqa: B018
    assert gate.release("AAA") is False
    assert gate.release_order("o0") is False
    assert gate.reduce_order("o0", 1) is False
    with pytest.raises(AssertionError):
        exercise(gate)  # the surface test fails under this ACL
    assert {(e["reason"], e["username"]) for e in denials(admin)} == {("key", user)}
    other_gate = RedisGate(admin, LIMITS, ttl=TTL, namespace=other)
    assert other_gate.snapshot().orders == {}  # nothing was reserved there
    assert other_gate.book_restored()
    own = RedisGate(client, LIMITS, ttl=TTL, namespace=ns)  # its own namespace still works
    own.restore({})
    assert own.try_enter("AAA", 1)
    client.close()


def test_a_user_without_scripting_is_never_admitted(server: RedisServer, admin: Any) -> None:
    ns = namespace()
    user = set_user(admin, README_ACL + " -@scripting", ns)
    RedisGate(admin, LIMITS, ttl=TTL, namespace=ns).restore({})  # the library is loaded too
    client = connect(server, user)
    gate = RedisGate(client, LIMITS, ttl=TTL, namespace=ns)
    decisions = [gate.try_enter(f"S{i}", 1) for i in range(5)]
    assert [d.reason for d in decisions] == [R.BACKEND_UNAVAILABLE] * 5
    with pytest.raises(StoreUnavailable):
        gate.restore({})
    with pytest.raises(StoreUnavailable):
        gate.set_position("S0", 1)
    assert gate.release("S0") is False
    admin_gate = RedisGate(admin, LIMITS, ttl=TTL, namespace=ns)
    assert admin_gate.snapshot().orders == {}
    assert admin_gate.stats().admitted == 0
    assert {(e["reason"], e["object"]) for e in denials(admin)} == {("command", "fcall")}
    client.close()


# ---------------------------------------------------------------------------- min_replicas


class Primary(RedisServer):
    """A server that starts a replica's full sync at once (by default it waits 5 s for more)."""

    def _argv(self) -> list[str]:
        return [*super()._argv(), "--repl-diskless-sync-delay", "0"]


class Replica(RedisServer):
    """A server that replicates ``primary`` from its start."""

    def __init__(self, binary: str, workdir: Path, primary: RedisServer) -> None:
        super().__init__(binary, workdir)
        self.primary = primary

    def _argv(self) -> list[str]:
        return [*super()._argv(), "--replicaof", "127.0.0.1", str(self.primary.port)]


@contextlib.contextmanager
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, Any]]:
    """A primary with one replica whose link is up; both stopped when the block ends."""
    binary = redis_server_binary()
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = Primary(binary, tmp_path / "primary")
    replica = Replica(binary, tmp_path / "replica", primary)
    try:
        primary.start()
        replica.start()
        admin = redis.Redis.from_url(primary.url, socket_timeout=10)
        probe = redis.Redis.from_url(replica.url, socket_timeout=10)
        deadline = time.monotonic() + 30
        while probe.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never came up"
            time.sleep(0.01)  # the replica is still syncing: poll again
        probe.close()
        yield primary, admin
        admin.close()
    finally:
        replica.stop()
        primary.stop()


@pytest.mark.timeout(120)
def test_min_replicas_runs_as_the_restricted_user(tmp_path: Path) -> None:
    """``WAIT`` is allowed by the README's ACL and needed by the minimal one: without it an
    admission that cannot be confirmed is released and denied."""
    with primary_and_replica(tmp_path) as (primary, admin):
        for rules, admitted, refused in (
            (README_ACL, True, set()),
            (minimal_acl(), True, set()),
            (minimal_acl(wait=False), False, {("command", "wait")}),
        ):
            admin.acl_log_reset()
            ns = namespace()
            user = set_user(admin, rules, ns)
            gate = RedisGate.from_url(
                primary.url, LIMITS, ttl=TTL, namespace=ns, min_replicas=1, replica_timeout=5,
                username=user, password=PASSWORD,
            )  # fmt: skip
            gate.restore({})
            with Recorder(primary.url) as sent:
                decision = gate.try_enter("AAA", 100, order_id="a")
            assert bool(decision) is admitted, (rules, decision)
            if admitted:
                assert "wait" in sent.commands
                assert gate.snapshot().orders.keys() == {"a"}
            else:
                assert decision.reason is R.BACKEND_UNAVAILABLE
                assert gate.snapshot().orders == {}  # released again: never admitted
            assert {(e["reason"], e["object"]) for e in denials(admin)} == refused
            gate.client.close()
