"""The Redis gate on loopback: server CPU, wall time, throughput and round trips per decision,
each against its target, with the baselines measured in the same run.

    python -P benchmarks/redis_bench.py [--redis-url URL] [--seconds S] [--quick] [--json PATH]

Without ``--redis-url`` it starts its own ``redis-server`` (Debian's binary) on a free loopback
port with no persistence, and stops it at the end. A server given with ``--redis-url`` should
have nothing else to do: the run resets its statistics (``CONFIG RESETSTAT``) and times every
command it runs; it deletes its keys and its library at the end.

A *cycle* is one decision: a ``try_enter`` that is admitted, then the release of that reservation
(the exchange rejected it), so the book stays small and every decision does the full
check-and-reserve: two ``FCALL``.

1. Server CPU per decision: ``CONFIG RESETSTAT``, N cycles on one thread, ``INFO commandstats``:
   ``cmdstat_fcall`` usec / N. Beside it, with a benchmark-only Functions library (``plbench``,
   loaded here with ``FUNCTION LOAD REPLACE``; it never touches the gate's library or keys):
   *trivial*, a ``return 1`` with the gate's 3 keys and as many arguments as ``enter`` (then
   ``release_order``), called twice per cycle; *floor*, two functions that issue exactly the
   commands a decision and its release issue (HMGET, TIME, HSET, ZADD; HMGET, TIME, HSET, ZREM,
   ZADD, with as many fields and members) with no logic, on keys of their own; and *15 HINCRBY*,
   the calibration script of the issue (per call), to compare machines. (commandstats times a
   command by the server's clock, so time the server spent preempted counts; the rounds also
   give the server process's CPU from ``INFO cpu``, I/O and parsing included, and the client's.)
2. Wall time per decision: the median cycle of the gate (``RedisGate.from_url``) over that of
   the two trivial ``FCALL`` on a client with the same settings.
3. Throughput: decisions/s at 1 and 16 threads and 4 processes of 1 and 4 threads, beside the
   in-process gate (its processes hold separate ledgers: for scale only), with the CPU seconds
   the server and the clients used per second of wall time.
4. Round trips: ``FCALL`` per ``try_enter`` from ``INFO commandstats``, and a ``MONITOR`` sample
   of every command clients sent.

1 and 2 are measured together, in interleaved rounds (gate, floor, trivial, 15 HINCRBY, gate,
...), and reported as medians: the machine's speed drifts, and a round's figures share it. With
a server of its own, the server figures of those rounds are taken with the server and this
process on one CPU (their affinities are put back after): the server then runs each call on
the core the client just left, as a busy server would, instead of waking an idle core for every
call, whose cold caches doubled and scattered the per-call figures on a 2-CPU VM (measured:
median 84 against 53 us per decision, the same code, minutes apart). Wall times (2) and
throughput (3) are measured as deployed, unpinned. A target
missed prints MISS; the exit status is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits

LIMITS = PortfolioLimits(
    max_concurrent_positions=1_000, max_gross_exposure=10**12, max_symbol_exposure=10**11
)
SYMBOLS = [f"SYM{i:03d}" for i in range(64)]
TIMEOUT = 5.0  # generous: a loaded machine must not turn a slow reply into a denial

TARGET_SERVER_US = 40.0  # server CPU per decision, enter + release
TARGET_WALL_RATIO = 1.75  # gate cycle / two trivial FCALL
TARGET_SCALING = 3.0  # 4 processes / 1 process, 1 thread each

# The benchmark's own Functions library. `floor_enter` and `floor_release` issue the commands of
# the gate's `enter` and `release_order` of an order of unknown side (gate.lua: HMGET of state,
# live, the fencing tag h:, p: r: o: k: b: s:; TIME; HSET of o: r: h: live; ZADD expiry. HMGET
# of state, live, h:, c:, o:, p: r: k: b: s:; TIME; HSET of the tombstone o:, r: h: live; ZREM
# expiry; ZADD forget of o:) with values of
# about the same sizes, take the same arguments (the caller's mark first: epoch, hw, tag) and
# answer as many items; nothing else. The commandstats of a round check that the numbers of
# commands match; the fields and members per command follow gate.lua by hand.
BENCH_LIBRARY = """#!lua name=plbench
local LIVE = '@LIVE@' -- as long as its live field (23 doubles and a 16-byte tag)
local function trivial(keys, args) return 1 end
local function floor_enter(keys, args)
  local sym, o, h = args[4], 'o:' .. args[6], 'h:' .. args[2]
  redis.call('HMGET', keys[1], 'state', 'live', h, 'p:' .. sym, 'r:' .. sym, o, 'k:' .. sym,
    'b:' .. sym, 's:' .. sym)
  local t = redis.call('TIME')
  redis.call('HSET', keys[1], o, args[5] .. '|' .. args[7] .. '|' .. t[1] .. t[2] .. '|' ..
    '60000000|0|' .. sym, 'r:' .. sym, args[5], h, args[3], 'live', LIVE)
  redis.call('ZADD', keys[2], t[1] .. t[2], o)
  return {1, 1, 1, 'A', 1, 1}
end
local function floor_release(keys, args)
  local c, o, sym, h = 'c:' .. args[4], 'o:' .. args[5], args[7], 'h:' .. args[2]
  redis.call('HMGET', keys[1], 'state', 'live', h, c, o, 'p:' .. sym, 'r:' .. sym, 'k:' .. sym,
    'b:' .. sym, 's:' .. sym)
  local t = redis.call('TIME')
  redis.call('HSET', keys[1], o, '~' .. args[4] .. '|1', 'r:' .. sym, '0', h, args[3], 'live',
    LIVE)
  redis.call('ZREM', keys[2], o)
  redis.call('ZADD', keys[3], t[1] .. t[2], o)
  return {1, 1, 1, 1}
end
local function hincrby15(keys, args)
  for i = 1, 15 do redis.call('HINCRBY', keys[1], 'f' .. i, 1) end
  return 1
end
redis.register_function('plbench_trivial', trivial)
redis.register_function('plbench_floor_enter', floor_enter)
redis.register_function('plbench_floor_release', floor_release)
redis.register_function('plbench_hincrby15', hincrby15)
""".replace("@LIVE@", "l" * 200)
STATE_BYTES = b"s" * 296  # as long as the gate's state field (37 doubles)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------- a server of our own


@contextmanager
def own_server() -> Iterator[tuple[str, int | None]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: apt-get install redis-server, or pass --redis-url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="pendingledger-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def _given(url: str) -> Iterator[tuple[str, int | None]]:
    yield url, None


@contextmanager
def one_cpu(server_pid: int | None) -> Iterator[int | None]:
    """The server (if it is ours) and this process on one CPU while the block runs: the CPU
    both end on, or None when nothing is pinned."""
    if server_pid is None or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(server_pid)
    cpu = min(mine & theirs or mine)
    os.sched_setaffinity(server_pid, {cpu})
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, mine)
        os.sched_setaffinity(server_pid, theirs)


# ---------------------------------------------------------------------------- server figures


def commandstats(admin: Any) -> dict[str, dict[str, float]]:
    """``INFO commandstats`` by command name (``fcall``, ``hmget``, ...)."""
    return {k.removeprefix("cmdstat_"): v for k, v in admin.info("commandstats").items()}


def commandstats_of(admin: Any, run: Callable[[], None]) -> dict[str, dict[str, float]]:
    """What ``run`` cost the server: ``CONFIG RESETSTAT``, ``run()``, ``INFO commandstats``
    (the admin client's own commands left out)."""
    admin.config_resetstat()
    run()
    stats = commandstats(admin)
    return {k: v for k, v in stats.items() if k != "info" and not k.startswith("config")}


def server_cpu(admin: Any) -> float:
    """CPU seconds the server process has used (user + system), from ``INFO cpu``."""
    cpu = admin.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


T = TypeVar("T")


def interleaved(runs: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each of ``runs`` once per round, in order, for ``rounds`` rounds: a drift in the
    machine's speed falls on all of them alike."""
    out: dict[str, list[T]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            out[name].append(run())
    return out


# ---------------------------------------------------------------------------- 1 and 2: per cycle


def new_client(url: str) -> Any:
    """A client with the settings ``RedisGate.from_url(url, timeout=TIMEOUT)`` gives its own."""
    return redis.Redis.from_url(
        url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 1)
    )


Keys = tuple[str, str, str]
CONFIG = "60000000|1000|1000000000000000000000|100000000000000000000|"  # enter's, for LIMITS
SUBJECTS = {
    "gate": "gate: decision + release",
    "floor": "floor: the same commands",
    "trivial": "trivial: return 1, x2",
    "hincrby15": "15 HINCRBY (1 call)",
}


def bench_keys(namespace: str) -> Keys:
    book, expiry, forget = (f"plbench:{{{namespace}}}:{k}" for k in ("book", "expiry", "forget"))
    return book, expiry, forget


def gate_cycle(gate: Any) -> Callable[[], None]:
    counter = itertools.count()
    prefix = f"cycle-{uuid.uuid4().hex[:8]}-"

    def cycle() -> None:
        k = next(counter)
        decision = gate.try_enter(SYMBOLS[k % 64], 100, order_id=prefix + str(k))
        if decision.reservation is None:
            raise RuntimeError(f"benchmark decision denied: {decision!r}")
        decision.reservation.release()

    return cycle


def floor_cycle(client: Any, keys: Keys) -> Callable[[], None]:
    """The floor's two calls, with the arguments ``enter`` and ``release_order`` get."""
    counter = itertools.count()

    def cycle() -> None:
        k = next(counter)
        sym, oid, token = SYMBOLS[k % 64], f"floor-{k}", uuid.uuid4().hex
        enter = (1, 1, 123456789, sym, "100000000000", oid, token, CONFIG, 1, "", "0")
        release = (1, 1, 123456789, uuid.uuid4().hex, oid, token, sym)
        client.fcall("plbench_floor_enter", 3, *keys, *enter)
        client.fcall("plbench_floor_release", 3, *keys, *release)

    return cycle


def trivial_cycle(client: Any, keys: Keys) -> Callable[[], None]:
    """Two ``return 1`` calls: one with ``enter``'s arguments, one with ``release_order``'s."""
    token = "t" * 32
    enter = (1, 1, 123456789, "SYM000", "100000000000", "order-0", token, CONFIG, 1, "", "0")
    release = (1, 1, 123456789, token, "order-0", token, "SYM000")

    def cycle() -> None:
        client.fcall("plbench_trivial", 3, *keys, *enter)
        client.fcall("plbench_trivial", 3, *keys, *release)

    return cycle


def hincrby_cycle(client: Any, keys: Keys) -> Callable[[], None]:
    def cycle() -> None:
        client.fcall("plbench_hincrby15", 3, *keys)

    return cycle


@dataclass
class Sample:
    """One subject in one round: N cycles."""

    cycles: int
    server_us: float  # cmdstat_fcall usec per cycle
    usec_per_fcall: float
    fcalls: float  # per cycle
    server_total_us: float  # the server process's CPU (INFO cpu) per cycle: I/O, parsing too
    client_cpu_us: float  # this process's CPU per cycle: redis-py and the gate's Python
    inner: dict[str, float] = field(default_factory=dict)  # commands run inside, per cycle


def sample(admin: Any, cycle: Callable[[], None], n: int) -> Sample:
    """What ``n`` cycles in a row cost the server (commandstats, INFO cpu) and this process."""
    client = [0.0]

    def run() -> None:
        cpu0 = time.process_time()
        for _ in range(n):
            cycle()
        client[0] = time.process_time() - cpu0

    cpu0 = server_cpu(admin)
    stats = commandstats_of(admin, run)
    cpu = server_cpu(admin) - cpu0
    fcall = stats.pop("fcall", {"calls": 0, "usec": 0})
    return Sample(
        cycles=n,
        server_us=fcall["usec"] / n,
        usec_per_fcall=fcall["usec"] / max(1, fcall["calls"]),
        fcalls=fcall["calls"] / n,
        server_total_us=cpu * 1e6 / n,
        client_cpu_us=client[0] * 1e6 / n,
        inner={k: v["calls"] / n for k, v in sorted(stats.items())},
    )


def timed(cycle: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    cycle()
    return time.perf_counter() - t0


def per_cycle(
    url: str,
    admin: Any,
    rounds: int,
    n: int,
    pinned: Callable[[], AbstractContextManager[int | None]],
) -> dict[str, Any]:
    """Targets 1 and 2: the gate and the baselines in interleaved rounds. Server and CPU
    figures: each subject's ``n`` cycles in a row (commandstats cannot tell functions apart),
    inside ``pinned()``; wall times as deployed, unpinned.
    Wall time: the subjects' cycles taken in turn (gate, floor, trivial, gate, ...), each timed:
    the machine's speed at each moment falls on all of them, and a round gives the median of
    each."""
    from pendingledger.redis import RedisGate

    ns = f"bench-cycle-{uuid.uuid4().hex[:8]}"
    gate = RedisGate.from_url(url, LIMITS, ttl=60.0, namespace=ns, timeout=TIMEOUT)
    gate.restore({})
    client, keys = new_client(url), bench_keys(ns)
    client.hset(keys[0], "state", STATE_BYTES)  # the floor reads it, as the gate reads its own
    cycles = {
        "gate": gate_cycle(gate),
        "floor": floor_cycle(client, keys),
        "trivial": trivial_cycle(client, keys),
        "hincrby15": hincrby_cycle(client, keys),
    }
    for cycle in cycles.values():  # connect, load the gate's library, warm the server up
        for _ in range(200):
            cycle()
    with pinned() as cpu:
        samples = interleaved({k: partial(sample, admin, c, n) for k, c in cycles.items()}, rounds)
    in_turn = {k: partial(timed, cycles[k]) for k in ("gate", "floor", "trivial")}
    walls = [
        {k: statistics.median(v) * 1e6 for k, v in interleaved(in_turn, n).items()}
        for _ in range(rounds)
    ]
    gate.wipe()
    client.delete(*keys)
    client.close()

    def ratio(per_round: list[float]) -> dict[str, float]:
        per_round = sorted(per_round)
        return {"median": statistics.median(per_round), "min": per_round[0], "max": per_round[-1]}

    def server(a: str, b: str) -> dict[str, float]:
        pairs = zip(samples[a], samples[b], strict=True)
        return ratio([x.server_us / y.server_us for x, y in pairs])

    def wall(a: str, b: str) -> dict[str, float]:
        return ratio([w[a] / w[b] for w in walls])

    attrs = ("server_us", "usec_per_fcall", "fcalls", "server_total_us", "client_cpu_us")
    figures: dict[str, Any] = {
        name: {
            **{a: statistics.median(getattr(s, a) for s in samples[name]) for a in attrs},
            "server_us_best": min(s.server_us for s in samples[name]),
            "wall_us": statistics.median(w[name] for w in walls) if name in in_turn else None,
            "inner": samples[name][-1].inner,
        }
        for name in cycles
    }
    figures["ratios"] = {
        "server gate/floor": server("gate", "floor"),
        "server gate/trivial": server("gate", "trivial"),
        "server gate/15 HINCRBY": server("gate", "hincrby15"),
        "wall gate/trivial": wall("gate", "trivial"),
        "wall floor/trivial": wall("floor", "trivial"),
    }
    figures["rounds"], figures["cycles_per_round"], figures["pinned_cpu"] = rounds, n, cpu
    figures["samples"] = {name: [asdict(s) for s in ss] for name, ss in samples.items()}
    figures["wall_rounds"] = walls
    return figures


# ---------------------------------------------------------------------------- 3: throughput


def _make_gate(backend: str, url: str, namespace: str) -> Any:
    if backend == "memory":
        return PortfolioGate(PendingEntryLedger(ttl=60.0), LIMITS)
    from pendingledger.redis import RedisGate

    return RedisGate.from_url(url, LIMITS, ttl=60.0, namespace=namespace, timeout=TIMEOUT)


def _cycles(gate: Any, seconds: float, index: int, latencies: list[float] | None) -> int:
    """Admit-and-release cycles for ``seconds``; returns how many. Each decision carries its own
    client order id (a str, as both gates require), unique to this worker, process and call."""
    n = 0
    symbols = SYMBOLS
    k = index
    prefix = f"bench-{os.getpid()}-{index}-{uuid.uuid4().hex[:6]}-"
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        for _ in range(50):
            order_id = prefix + str(k)
            t0 = clock()
            decision = gate.try_enter(symbols[k % 64], 100, order_id=order_id)
            if latencies is not None:
                latencies.append(clock() - t0)
            res = decision.reservation
            if res is None:
                raise RuntimeError(f"benchmark decision denied: {decision!r}")
            res.release()
            k += 1
        n += 50
    return n


@dataclass
class Run:
    """One throughput window."""

    decisions: int
    wall_s: float
    client_cpu_s: float  # CPU time of the client process(es), all threads
    server_cpu_s: float  # of the server process over the window (0 for the in-process gate)

    @property
    def rate(self) -> float:
        return self.decisions / self.wall_s


def _threads_run(
    gate: Any, threads: int, seconds: float, latencies: list[float] | None, cpu: Callable[[], float]
) -> Run:
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def body(i: int) -> None:
        barrier.wait()
        counts[i] = _cycles(gate, seconds, i * 7, latencies if i == 0 else None)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    server0, client0 = cpu(), time.process_time()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    return Run(sum(counts), wall, time.process_time() - client0, cpu() - server0)


def _no_server() -> float:
    return 0.0


def _process_main(
    backend: str, url: str, ns: str, threads: int, seconds: float, ready: Any, start: Any, out: Any
) -> None:
    gate = _make_gate(backend, url, ns)
    _cycles(gate, 0.05, 0, None)  # connect and load the library before the clock starts
    ready.put(os.getpid())
    start.wait(120)
    out.put(asdict(_threads_run(gate, threads, seconds, None, _no_server)))


def _processes_run(
    backend: str,
    url: str,
    ns: str,
    procs: int,
    threads: int,
    seconds: float,
    cpu: Callable[[], float],
) -> Run:
    ctx = multiprocessing.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    args = (backend, url, ns, threads, seconds, ready, start, out)
    ps = [ctx.Process(target=_process_main, args=args) for _ in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:  # every process imported, connected and warmed up
        ready.get(timeout=120)
    server0 = cpu()
    start.set()
    runs = [Run(**out.get(timeout=seconds + 120)) for _ in ps]
    server = cpu() - server0
    for p in ps:
        p.join(10)
    return Run(
        sum(r.decisions for r in runs),
        max(r.wall_s for r in runs),
        sum(r.client_cpu_s for r in runs),
        server,
    )


SHAPES = ("1 thread", "16 threads", "4 processes x 1 thread", "4 processes x 4 threads")


def throughput(
    url: str, admin: Any, seconds: float, rounds: int
) -> tuple[dict[str, list[Run]], list[float]]:
    """Target 3: every (backend, shape) window once per round; and the 1-thread Redis gate's
    try_enter latencies."""
    ns = f"bench-tp-{uuid.uuid4().hex[:8]}"
    _make_gate("redis", url, ns).restore({})
    latencies: list[float] = []
    runs: dict[str, Callable[[], Run]] = {}
    for backend in ("memory", "redis"):
        gate = _make_gate(backend, url, ns)
        _cycles(gate, 0.1, 0, None)  # warm up
        cpu = partial(server_cpu, admin) if backend == "redis" else _no_server
        lat = latencies if backend == "redis" else None
        for shape, run in zip(
            SHAPES,
            (
                partial(_threads_run, gate, 1, seconds, lat, cpu),
                partial(_threads_run, gate, 16, seconds, None, cpu),
                partial(_processes_run, backend, url, ns, 4, 1, seconds, cpu),
                partial(_processes_run, backend, url, ns, 4, 4, seconds, cpu),
            ),
            strict=True,
        ):
            runs[f"{backend}, {shape}"] = partial(_shown, f"{backend}, {shape}", run)
    windows = interleaved(runs, rounds)
    _make_gate("redis", url, ns).wipe()
    return windows, latencies


def _shown(name: str, run: Callable[[], Run]) -> Run:
    r = run()
    server = f"server CPU {r.server_cpu_s / r.wall_s:.2f} s/s, " if r.server_cpu_s else ""
    print(
        f"  {name:<32} {r.rate:>10,.0f} decisions/s  "
        f"({server}client CPU {r.client_cpu_s / r.wall_s:.2f} s/s)",
        flush=True,
    )
    return r


# ---------------------------------------------------------------------------- 4: round trips


def round_trips(url: str, admin: Any, decisions: int, sample_size: int = 200) -> dict[str, Any]:
    """FCALL per try_enter (commandstats) and every client command in a MONITOR sample."""
    from pendingledger.redis import RedisGate

    gate = RedisGate.from_url(
        url, LIMITS, ttl=60.0, namespace=f"bench-rt-{uuid.uuid4().hex[:8]}", timeout=TIMEOUT
    )
    gate.restore({})
    assert gate.try_enter("WARM", 1, order_id="rt-warm")
    admitted: list[bool] = []

    def run() -> None:
        for i in range(decisions):
            admitted.append(bool(gate.try_enter(SYMBOLS[i % 64], 1, order_id=f"rt-{i}")))

    stats = commandstats_of(admin, run)
    fcall = stats.get("fcall", {}).get("calls", 0)
    result: dict[str, Any] = {
        "decisions": decisions,
        "all_admitted": all(admitted),
        "fcall": fcall,
        "fcall_per_decision": fcall / decisions,
        "inner_per_decision": {k: v["calls"] / decisions for k, v in stats.items() if k != "fcall"},
    }
    # MONITOR: what clients sent between two markers; commands run by a function are 'lua'
    seen: list[str] = []
    inner = [0]
    ready = threading.Event()
    mark = f"bench-{uuid.uuid4().hex}"
    monitor_client = new_client(url)

    def watch() -> None:
        collecting = False
        with monitor_client.monitor() as m:
            ready.set()
            for entry in m.listen():
                command = entry["command"]
                if f"{mark}-start" in command:
                    collecting = True
                elif f"{mark}-end" in command:
                    return
                elif collecting and entry["client_type"] == "lua":
                    inner[0] += 1
                elif collecting:
                    seen.append(command.split(" ", 1)[0].upper())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(10)
    admin.echo(f"{mark}-start")
    for i in range(sample_size):
        gate.try_enter(SYMBOLS[i % 64], 1, order_id=f"rt-monitor-{i}")
    admin.echo(f"{mark}-end")
    watcher.join(30)
    monitor_client.close()
    result["monitor_sample"] = sample_size
    result["monitor_client_commands"] = {c: seen.count(c) for c in sorted(set(seen))}
    result["monitor_inner_per_decision"] = inner[0] / sample_size
    gate.wipe()
    return result


# ---------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            names = (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
            model = next(names, "")
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "machine": platform.machine(),
        "loadavg_at_start": os.getloadavg(),
    }


def print_per_cycle(cyc: dict[str, Any]) -> None:
    print(
        "\nper cycle (a decision: enter + release; 15 HINCRBY: one call), medians of the rounds;"
        "\nserver µs: INFO commandstats, cmdstat_fcall usec (the wall time inside the command)"
    )
    cpu = cyc["pinned_cpu"]
    print(
        "server and CPU figures unpinned (a server given by URL); wall times unpinned"
        if cpu is None
        else f"server and CPU figures with the server and this process on CPU {cpu}; "
        "wall times unpinned"
    )
    print(
        "| subject | FCALL | server µs | per FCALL | best round | server process CPU µs | "
        "client CPU µs | wall µs | commands run inside |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, label in SUBJECTS.items():
        f = cyc[name]
        inside = ", ".join(f"{k} {v:g}" for k, v in f["inner"].items()) or "none"
        print(
            f"| {label} | {f['fcalls']:g} | {f['server_us']:.1f} | {f['usec_per_fcall']:.1f} | "
            f"{f['server_us_best']:.1f} | {f['server_total_us']:.0f} | {f['client_cpu_us']:.0f} | "
            f"{'' if f['wall_us'] is None else round(f['wall_us'])} | {inside} |"
        )
    for name, r in cyc["ratios"].items():
        print(f"  {name}: {r['median']:.2f}x (rounds {r['min']:.2f} to {r['max']:.2f}x)")


def throughput_summary(tp: dict[str, list[Run]], cpus: int) -> dict[str, Any]:
    """The median window of each row, the scaling of 4 processes per round, and the ceiling the
    machine's CPUs put on it: at the CPU cost per decision of the 4-process windows (server and
    clients), ``cpus`` CPUs with nothing else to run, and one CPU at most for the server."""
    rows = []
    for name, runs in tp.items():
        r = sorted(runs, key=lambda x: x.rate)[len(runs) // 2]
        backend, shape = name.split(", ")
        rows.append(
            {
                "backend": backend,
                "shape": shape,
                **asdict(r),
                "decisions_per_s": r.rate,
                "server_cpu_per_s": r.server_cpu_s / r.wall_s if backend == "redis" else None,
                "client_cpu_per_s": r.client_cpu_s / r.wall_s,
                "server_cpu_us_per_decision": r.server_cpu_s / r.decisions * 1e6,
                "client_cpu_us_per_decision": r.client_cpu_s / r.decisions * 1e6,
                "rounds": [x.rate for x in runs],
            }
        )
    one, four = tp["redis, 1 thread"], tp["redis, 4 processes x 1 thread"]
    per_round = sorted(a.rate / b.rate for a, b in zip(four, one, strict=True))
    row4 = next(r for r in rows if r["backend"] == "redis" and r["shape"] == SHAPES[2])
    row1 = next(r for r in rows if r["backend"] == "redis" and r["shape"] == SHAPES[0])
    server_us, client_us = row4["server_cpu_us_per_decision"], row4["client_cpu_us_per_decision"]
    ceiling = min(cpus * 1e6 / (server_us + client_us), 1e6 / server_us)
    return {
        "rows": rows,
        "scaling": statistics.median(per_round),
        "scaling_rounds": per_round,
        "one": row1,
        "four": row4,
        "cpu_ceiling_per_s": ceiling,
        "cpu_ceiling_scaling": ceiling / row1["decisions_per_s"],
    }


def print_throughput(tps: dict[str, Any], latencies: list[float], cpus: int) -> dict[str, float]:
    print("\n| backend | workers | decisions/s | server CPU s/s | client CPU s/s | note |")
    print("|---|---|---:|---:|---:|---|")
    for row in tps["rows"]:
        separate = row["backend"] == "memory" and "processes" in row["shape"]
        note = "separate ledgers: no shared limit" if separate else ""
        server = "" if row["server_cpu_per_s"] is None else f"{row['server_cpu_per_s']:.2f}"
        print(
            f"| {row['backend']} | {row['shape']} | {row['decisions_per_s']:,.0f} | {server} | "
            f"{row['client_cpu_per_s']:.2f} | {note} |"
        )
    four = tps["four"]
    print(
        f"4 processes x 1 thread: {tps['scaling']:.2f}x one process (rounds "
        f"{', '.join(f'{x:.2f}' for x in tps['scaling_rounds'])}); CPU per decision: server "
        f"{four['server_cpu_us_per_decision']:.0f} µs, clients "
        f"{four['client_cpu_us_per_decision']:.0f} µs, so {cpus} CPUs with nothing else to run "
        f"allow at most {tps['cpu_ceiling_per_s']:,.0f} decisions/s = "
        f"{tps['cpu_ceiling_scaling']:.2f}x one process"
    )
    lat_us = sorted(x * 1e6 for x in latencies)
    lat = {"p50": statistics.median(lat_us), "p99": lat_us[int(len(lat_us) * 0.99)]}
    print(f"redis, 1 thread: try_enter latency p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs")
    return lat


def print_round_trips(trips: dict[str, Any]) -> None:
    inside = ", ".join(f"{k} {v:g}" for k, v in sorted(trips["inner_per_decision"].items()))
    print(
        f"round trips: {trips['fcall_per_decision']:.3f} FCALL per try_enter ({trips['fcall']} "
        f"for {trips['decisions']}; run inside each: {inside}); MONITOR sample of "
        f"{trips['monitor_sample']} try_enter: client commands "
        f"{trips['monitor_client_commands']}, {trips['monitor_inner_per_decision']:g} run inside "
        "each"
    )


def targets(
    cyc: dict[str, Any], tps: dict[str, Any], trips: dict[str, Any], cpus: int
) -> list[dict[str, str]]:
    g, fl, tr, hi, ra = (cyc[k] for k in ("gate", "floor", "trivial", "hincrby15", "ratios"))
    one, four = tps["one"], tps["four"]
    only_fcall = trips["monitor_client_commands"] == {"FCALL": trips["monitor_sample"]}
    rows = [
        (
            "server CPU per decision (enter + release)",
            f"<= {TARGET_SERVER_US:g} µs",
            f"{g['server_us']:.1f} µs ({g['usec_per_fcall']:.1f} per FCALL)",
            f"floor {fl['server_us']:.1f} µs (gate/floor {ra['server gate/floor']['median']:.2f}x);"
            f" trivial x2 {tr['server_us']:.1f} µs (gate/trivial "
            f"{ra['server gate/trivial']['median']:.1f}x); 15 HINCRBY {hi['server_us']:.1f} µs",
            g["server_us"] <= TARGET_SERVER_US,
        ),
        (
            "wall time per decision / two trivial FCALL",
            f"<= {TARGET_WALL_RATIO:g}x",
            f"{ra['wall gate/trivial']['median']:.2f}x ({g['wall_us']:.0f} µs)",
            f"trivial x2 {tr['wall_us']:.0f} µs; floor {fl['wall_us']:.0f} µs "
            f"({ra['wall floor/trivial']['median']:.2f}x)",
            ra["wall gate/trivial"]["median"] <= TARGET_WALL_RATIO,
        ),
        (
            "4 processes / 1 process (1 thread each)",
            f">= {TARGET_SCALING:g}x",
            f"{tps['scaling']:.2f}x ({four['decisions_per_s']:,.0f} vs "
            f"{one['decisions_per_s']:,.0f}/s)",
            f"CPU ceiling {tps['cpu_ceiling_scaling']:.2f}x on {cpus} CPUs; at 4 processes the "
            f"server used {four['server_cpu_per_s']:.2f} CPU s/s, the clients "
            f"{four['client_cpu_per_s']:.2f}",
            tps["scaling"] >= TARGET_SCALING,
        ),
        (
            "round trips per try_enter",
            "1 FCALL, nothing else",
            f"{trips['fcall_per_decision']:.3f} FCALL; MONITOR {trips['monitor_client_commands']}",
            "",
            trips["fcall_per_decision"] == 1 and only_fcall and trips["all_admitted"],
        ),
    ]
    keys = ("target", "bound", "measured", "baseline", "verdict")
    return [dict(zip(keys, (*row[:4], verdict(row[4])), strict=True)) for row in rows]


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--redis-url", help="use this server (one of its own: the run resets its statistics)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="one throughput window")
    parser.add_argument("--quick", action="store_true", help="0.5 s windows, fewer rounds")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    seconds = 0.5 if args.quick else args.seconds
    rounds, cycles, tp_rounds = (5, 300, 1) if args.quick else (9, 2000, 3)

    import pendingledger
    from pendingledger.redis._library import VERSION

    build = "compiled" if pendingledger.COMPILED else "pure"
    host = machine()
    cpus = host["cpus_usable"]
    with own_server() if args.redis_url is None else _given(args.redis_url) as (url, pid):
        admin = redis.Redis.from_url(url, socket_timeout=30, decode_responses=True)
        admin.function_load(BENCH_LIBRARY, replace=True)
        version = admin.info("server")["redis_version"]
        print(
            f"{build} build (pendingledger.COMPILED = {pendingledger.COMPILED}), "
            f"{platform.python_implementation()} {platform.python_version()}; gate.lua {VERSION}; "
            f"Redis {version} at "
            f"{url}; os.cpu_count() {host['cpu_count']}, {cpus} usable ({host['cpu_model']}); "
            f"load average {host['loadavg_at_start'][0]:.2f}",
            flush=True,
        )
        print(f"per cycle: {rounds} interleaved rounds of {cycles} cycles each", flush=True)
        cyc = per_cycle(url, admin, rounds, cycles, partial(one_cpu, pid))
        print(f"throughput: {tp_rounds} round(s) of {seconds:g} s windows", flush=True)
        tp, latencies = throughput(url, admin, seconds, tp_rounds)
        trips = round_trips(url, admin, 500 if args.quick else 2000)
        admin.function_delete("plbench")
        admin.close()

    print_per_cycle(cyc)
    tps = throughput_summary(tp, cpus)
    latency = print_throughput(tps, latencies, cpus)
    print_round_trips(trips)
    summary = targets(cyc, tps, trips, cpus)
    host["loadavg_at_end"] = os.getloadavg()
    print(
        f"\n{build} build, CPython {platform.python_version()}, Redis {version}, {cpus} CPUs, load "
        f"average {host['loadavg_at_start'][0]:.2f} at the start, {host['loadavg_at_end'][0]:.2f} "
        "at the end:\n"
    )
    print("| target | bound | measured | baseline (same run) | verdict |")
    print("|---|---|---|---|---|")
    for t in summary:
        print(
            f"| {t['target']} | {t['bound']} | {t['measured']} | {t['baseline']} | {t['verdict']} |"
        )
    if args.json:
        meta = {
            "build": build,
            "python": platform.python_version(),
            "redis": version,
            "gate_lua": VERSION,
            "quick": args.quick,
            "seconds": seconds,
            **host,
        }
        payload = {
            "meta": meta,
            "targets": summary,
            "per_cycle": cyc,
            "throughput": tps,
            "latency_us": latency,
            "round_trips": trips,
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
