"""Decisions per second: the Redis gate on loopback against the in-process gate, in one table.

    python benchmarks/redis_bench.py [--redis-url URL] [--seconds S] [--quick] [--json PATH]

Without ``--redis-url`` it starts its own ``redis-server`` (Debian's binary) on a free loopback
port with no persistence, and stops it at the end. Each worker loops over one *cycle*: a
``try_enter`` that is admitted, then the release of that reservation (the exchange rejected it),
so the book stays small and every decision does the full check-and-reserve. "decisions/s" counts
the ``try_enter`` calls; the release that follows each is part of the cost.

Round trips are counted on the server: ``INFO commandstats`` gives the number of ``EVALSHA``
commands (a script cannot issue ``EVALSHA``, so each one is a client round trip) for a
calibration run of decisions alone, and a ``MONITOR`` sample lists every command clients sent,
so any other command would show up. The target is exactly one round trip per decision.

The in-process rows with several processes are given for scale only: separate processes hold
separate in-process ledgers, which is exactly what the Redis gate exists to fix.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits

LIMITS = PortfolioLimits(
    max_concurrent_positions=1_000, max_gross_exposure=10**12, max_symbol_exposure=10**11
)
SYMBOLS = [f"SYM{i:03d}" for i in range(64)]


# ---------------------------------------------------------------------------- a server of our own


@contextmanager
def own_server() -> Iterator[str]:
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
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------- workers


def _make_gate(backend: str, url: str, namespace: str) -> Any:
    if backend == "memory":
        return PortfolioGate(PendingEntryLedger(ttl=60.0), LIMITS)
    from pendingledger.redis import RedisGate

    return RedisGate.from_url(url, LIMITS, ttl=60.0, namespace=namespace, timeout=5)


def _cycles(gate: Any, seconds: float, index: int, latencies: list[float] | None) -> int:
    """Admit-and-release cycles for ``seconds``; returns how many. Each decision carries its own
    client order id (a str, as both gates require), unique to this worker and process."""
    n = 0
    symbols = SYMBOLS
    k = index
    prefix = f"bench-{os.getpid()}-{index}-"
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


def _threads_run(
    gate: Any, threads: int, seconds: float, latencies: list[float] | None
) -> tuple[int, float]:
    """(cycles, wall seconds from the common start until the last thread finished)."""
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def body(i: int) -> None:
        barrier.wait()
        counts[i] = _cycles(gate, seconds, i * 7, latencies if i == 0 else None)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return sum(counts), time.perf_counter() - t0


def _process_main(backend: str, url: str, namespace: str, threads: int, seconds: float,
                  start: Any, out: Any) -> None:  # fmt: skip
    gate = _make_gate(backend, url, namespace)
    _cycles(gate, 0.05, 0, None)  # connect and load the script before the clock starts
    start.wait(30)
    out.put(_threads_run(gate, threads, seconds, None))


def _processes_run(backend: str, url: str, namespace: str, procs: int, threads: int,
                   seconds: float) -> tuple[int, float]:  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    ps = [
        ctx.Process(target=_process_main,
                    args=(backend, url, namespace, threads, seconds, start, out))
        for _ in range(procs)
    ]  # fmt: skip
    for p in ps:
        p.start()
    time.sleep(1.0)  # imports, connections
    start.set()
    results = [out.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join(10)
    return sum(n for n, _ in results), max(wall for _, wall in results)


# ---------------------------------------------------------------------------- round trips


def round_trips(url: str, namespace: str, decisions: int = 2_000) -> dict[str, Any]:
    """EVALSHA per decision (commandstats) and every client command in a MONITOR sample."""
    import redis

    from pendingledger.redis import RedisGate

    client = redis.Redis.from_url(url, socket_timeout=5)
    gate = RedisGate(client, LIMITS, ttl=60.0, namespace=namespace + "-rt")
    gate.restore({})
    assert gate.try_enter("WARM", 1, order_id="rt-warm")
    client.config_resetstat()
    admitted = [gate.try_enter(SYMBOLS[i % 64], 1, order_id=f"rt-{i}") for i in range(decisions)]
    stats = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    result: dict[str, Any] = {
        "decisions": decisions,
        "evalsha": evalsha.get("calls", 0),
        "evalsha_per_decision": evalsha.get("calls", 0) / decisions,
        "server_us_per_decision": evalsha.get("usec_per_call"),
        "all_admitted": all(admitted),
    }
    # MONITOR sample: what clients sent, script-internal commands excluded
    seen: list[str] = []
    lua = [0]
    ready = threading.Event()
    sentinel = f"bench-{uuid.uuid4().hex}"
    monitor_client = redis.Redis.from_url(url, socket_timeout=10)

    def watch() -> None:
        with monitor_client.monitor() as m:  # type: ignore[no-untyped-call]
            ready.set()
            for entry in m.listen():
                if entry["client_type"] == "lua":
                    lua[0] += 1
                elif sentinel in entry["command"]:
                    if entry["command"].endswith('end"') or "end" in entry["command"]:
                        return
                else:
                    seen.append(entry["command"].split(" ", 1)[0].upper())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(5)
    client.echo(f"{sentinel}-start")
    time.sleep(0.1)
    seen.clear()
    sample = 200
    for i in range(sample):
        gate.try_enter(SYMBOLS[i % 64], 1, order_id=f"rt-monitor-{i}")
    client.echo(f"{sentinel}-end")
    watcher.join(10)
    result["monitor_sample"] = sample
    result["monitor_client_commands"] = {c: seen.count(c) for c in sorted(set(seen))}
    result["monitor_script_commands_per_decision"] = lua[0] / sample
    client.close()
    monitor_client.close()
    return result


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis-url", help="use this server instead of starting one")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per row")
    parser.add_argument("--quick", action="store_true", help="0.5 s per row")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    seconds = 0.5 if args.quick else args.seconds

    rows: list[dict[str, Any]] = []

    def record(
        backend: str, shape: str, run: Callable[[], tuple[int, float]], note: str = ""
    ) -> None:
        n, wall = run()
        rows.append({"backend": backend, "shape": shape, "decisions": n,
                     "decisions_per_s": n / wall, "wall_s": wall, "note": note})  # fmt: skip
        print(f"  {backend:<10} {shape:<24} {n / wall:>12,.0f} decisions/s", flush=True)

    with own_server() if args.redis_url is None else _given(args.redis_url) as url:
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        from pendingledger.redis import RedisGate

        RedisGate.from_url(url, LIMITS, ttl=60.0, namespace=ns).restore({})
        import pendingledger

        build = "compiled" if pendingledger.COMPILED else "pure"
        print(
            f"{build} build (pendingledger.COMPILED = {pendingledger.COMPILED}), "
            f"{platform.python_implementation()} {platform.python_version()}; server {url}; "
            f"{seconds:g} s per row; each decision is followed by its release"
        )
        latencies: list[float] = []
        for backend in ("memory", "redis"):
            gate = _make_gate(backend, url, ns)
            _cycles(gate, 0.1, 0, None)  # warm up
            lat = latencies if backend == "redis" else None
            note = "separate ledgers: no shared limit" if backend == "memory" else "one namespace"
            record(backend, "1 thread", partial(_threads_run, gate, 1, seconds, lat))
            record(backend, "16 threads", partial(_threads_run, gate, 16, seconds, None))
            for threads in (1, 4):
                record(
                    backend,
                    f"4 processes x {threads} thread{'s' if threads > 1 else ''}",
                    partial(_processes_run, backend, url, ns, 4, threads, seconds),
                    note,
                )
        trips = round_trips(url, ns)

    print()
    print("| backend | workers | decisions/s | note |")
    print("|---|---|---:|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['shape']} | {row['decisions_per_s']:,.0f} | {row['note']} |"
        )
    if latencies:
        lat_us = sorted(x * 1e6 for x in latencies)
        p50 = statistics.median(lat_us)
        p99 = lat_us[int(len(lat_us) * 0.99)]
        print(f"\nredis, 1 thread: try_enter latency p50 {p50:.0f} µs, p99 {p99:.0f} µs")
    print(
        f"round trips per decision: {trips['evalsha_per_decision']:.3f} EVALSHA "
        f"({trips['evalsha']} for {trips['decisions']} decisions, INFO commandstats); "
        f"server time {trips['server_us_per_decision']} µs per decision"
    )
    print(
        f"MONITOR sample of {trips['monitor_sample']} decisions: client commands "
        f"{trips['monitor_client_commands']}, "
        f"{trips['monitor_script_commands_per_decision']:.1f} commands run inside the script each"
    )
    if args.json:
        with open(args.json, "w") as fh:
            meta = {"build": build, "python": platform.python_version()}
            payload = {"meta": meta, "rows": rows, "round_trips": trips, "seconds": seconds}
            json.dump(payload, fh, indent=2)
    return 0


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    sys.exit(main())
