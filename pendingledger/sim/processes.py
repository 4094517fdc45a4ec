"""The simulated app across processes, racing one namespace of a running Redis server.

Why: once a bot runs as several processes, each process's own lock no longer covers the others;
``RedisGate`` makes every decision in one atomic script call in the shared store instead. This
module shows it the way ``race`` shows the in-process gate: the same app, split over processes,
first on the broken variant (check in one script call, reserve in a second), then on the gate.

How a run is structured (``ProcessRace.run``):

1. The parent process makes a fresh namespace ``race-<uuid>`` and restores an empty book in it.
2. It starts ``processes`` worker processes (``multiprocessing``, spawn). ``config.threads`` is
   the total: the brains are split between the processes (numbered across them, so seeds and
   order ids stay distinct), and so are the symbols (symbol ``i`` goes to process
   ``i % processes``). Each process trades its own symbols, as a bot sharded by symbol does:
   the gate's book takes *whole* positions (``set_position``, ``confirm_fill``), so a symbol's
   position must be written by the one process that holds it. The concurrency and gross limits
   are shared by every process, and that is where they race each other.
3. Each worker builds its own ``RedisGate`` (a client cannot be pickled), connects, loads the
   script and reports ready; the parent starts them together once all are.
4. Each worker runs a ``Simulation`` with ``book="gate"`` on a ``RedisBackend``: its brains, its
   own simulated exchange and fill router, against the shared book (``confirm_fill``,
   ``set_position``, ``close_position``, ``Reservation.release``/``reduce``). After each
   admission it reads the whole namespace and checks it against the limits.
5. Meanwhile the parent's auditor reads the namespace in a loop (``SharedAudit``: one atomic
   read each) and counts the readings over a limit and any inconsistency in the store.
6. Workers send progress, then their ``SimResult`` and check figures, over a queue; the parent
   merges them into one ``SimResult``, reads the final state and deletes the namespace.

What the auditors can and cannot see: the parent samples the shared state, so a breach that
lasts less than the time between two readings can slip between them; the workers' checks right
after each admission cover that (an admission is in Redis when ``try_enter`` returns, and its
check sees it with everything else in the namespace). Nobody can see an order between a
process's decision and Redis: there is no such moment for the real gate (decision and
reservation are one script call), and for the broken variant it is exactly the gap the checks
catch the consequences of. A reading counts what the gate counts: a lost order stays counted
until its TTL, a rejected one until the router's release lands. That over-counts the true
exposure, never under-counts an admitted order, so a breach a reading reports is one the gate
let in. See ``pendingledger.sim.redis_backend`` for partial fills.

Nothing is left behind: ``run`` joins every worker (terminating, then killing, one that does not
finish in time), also on Ctrl-C (``KeyboardInterrupt``: the workers ignore SIGINT and are told to
stop; a second Ctrl-C terminates them at once) and on errors, and deletes the namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import queue
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any, Final

from pendingledger.protocols import ReservationHandle
from pendingledger.redis import RedisGate
from pendingledger.redis.testing import enable_test_ops
from pendingledger.sim.app import Simulation, SimulationError
from pendingledger.sim.config import LIMIT_KINDS, Progress, SimConfig, SimResult
from pendingledger.sim.redis_backend import (
    SOCKET_TIMEOUT,
    RedisBackend,
    SharedAudit,
    SharedReading,
    to_amount,
)

__all__ = ["ProcessRace", "run_across_processes"]

_START_TIMEOUT: Final = 60.0  # seconds for every worker to import, connect and report ready
_STOP_GRACE: Final = 10.0  # seconds beyond the TTL a told-to-stop worker may take to drain
_PROGRESS_EVERY: Final = 0.2  # seconds between a worker's progress messages
SAMPLE_INTERVAL: Final = 0.002
"""Seconds the parent's auditor waits between two readings of the shared state."""


class ProcessRace:
    """One run of the simulated app across ``processes`` processes on one Redis namespace.

    ``config`` is the whole app (``threads`` in total; ``book`` is always the gate's). Use
    ``run()`` once; ``stop()`` from another thread ends the race early, as
    ``Simulation.stop()`` does. ``max_decisions`` and ``stop_after_breaches`` apply per process.
    """

    def __init__(
        self,
        config: SimConfig,
        *,
        redis_url: str,
        processes: int,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be an int >= 1, got {processes!r}")
        if processes > len(config.symbols):
            raise ValueError(
                f"{processes} processes need at least as many symbols to split between them, "
                f"got {len(config.symbols)}"
            )
        if processes > config.threads:
            raise ValueError(
                f"{processes} processes need at least as many threads, got {config.threads}"
            )
        if config.strategies > 1:
            raise ValueError(
                f"strategies={config.strategies}: the race across processes trades for the "
                "account only; race strategy budgets in one process (the memory backend)"
            )
        self.config = dataclasses.replace(config, book="gate")
        self.redis_url = redis_url
        self.processes = processes
        self._sample_interval = sample_interval
        self._stop_requested = threading.Event()
        self._used = False

    def stop(self) -> None:
        """End the race early (from any thread); ``run()`` then drains and returns."""
        self._stop_requested.set()

    def _follow(
        self,
        inbox: _Inbox,
        out: Any,
        workers: Sequence[BaseProcess],
        stop: Any,
        on_progress: Callable[[Progress], object] | None,
        interval: float,
    ) -> None:
        """Take the workers' messages until each has finished, passing on a stop request and
        reporting progress."""
        seconds = self.config.seconds
        started = time.monotonic()
        while not inbox.finished():
            inbox.pump(out, workers, timeout=interval)
            if self._stop_requested.is_set():
                stop.set()
            inbox.raise_errors()
            if on_progress is not None:
                elapsed = min(time.monotonic() - started, seconds)
                on_progress(inbox.progress(elapsed, seconds))

    def shares(self) -> list[tuple[SimConfig, int]]:
        """Each process's config (its threads and symbols) and the number of its first brain."""
        config, n = self.config, self.processes
        base, extra = divmod(config.threads, n)
        shares: list[tuple[SimConfig, int]] = []
        first = 0
        for k in range(n):
            threads = base + (1 if k < extra else 0)
            part = dataclasses.replace(config, threads=threads, symbols=config.symbols[k::n])
            shares.append((part, first))
            first += threads
        return shares

    def run(
        self,
        on_progress: Callable[[Progress], object] | None = None,
        *,
        interval: float = 0.1,
    ) -> SimResult:
        """Race, drain, and return the merged figures (see the module docstring).

        Raises ``SimulationError`` if a worker failed (its traceback in the message), and
        ``pendingledger.redis.StoreUnavailable`` if the server cannot be reached at the start.
        """
        if self._used:
            raise RuntimeError("a ProcessRace runs once; make a new one")
        self._used = True
        config = self.config
        limits = config.limits()
        namespace = f"race-{uuid.uuid4().hex}"
        gate = RedisGate.from_url(
            self.redis_url, limits, ttl=config.ttl, namespace=namespace,
            timeout=SOCKET_TIMEOUT,
        )  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        out: Any = ctx.Queue()
        start, stop = ctx.Event(), ctx.Event()
        workers: list[BaseProcess] = []
        inbox = _Inbox(self.processes)
        sampler: _Sampler | None = None
        try:
            gate.restore({})
            if config.broken:  # the broken gate's 'check' and 'force' are test operations
                enable_test_ops(gate)
            audit = SharedAudit(gate, limits)
            for k, (share, first_brain) in enumerate(self.shares()):
                worker = ctx.Process(
                    target=worker_main,
                    args=(k, self.redis_url, namespace, share, first_brain, start, stop, out),
                    name=f"pendingledger-race-{k}",
                    daemon=True,  # a last resort: every worker is joined before run() returns
                )
                worker.start()
                workers.append(worker)
            _wait_ready(inbox, out, workers)
            sampler = _Sampler(audit, self._sample_interval)
            sampler.start()
            start.set()
            self._follow(inbox, out, workers, stop, on_progress, interval)
            sampler.finish()
            gate.sweep()
            final = audit.read()
            return _merge(
                config, self.processes, inbox, sampler, final,
                interrupted=self._stop_requested.is_set(),
            )  # fmt: skip
        except BaseException:
            stop.set()
            raise
        finally:
            if sampler is not None:
                sampler.stop()
            _reap(workers, stop, out, inbox, grace=config.ttl + _STOP_GRACE)
            with contextlib.suppress(Exception):
                gate.wipe()
            gate.client.close()


def _wait_ready(inbox: _Inbox, out: Any, workers: Sequence[BaseProcess]) -> None:
    """Until every worker said it is ready (connected, script loaded, brains waiting)."""
    deadline = time.monotonic() + _START_TIMEOUT
    while inbox.ready < inbox.n:
        inbox.pump(out, workers, timeout=0.05)
        inbox.raise_errors()
        if time.monotonic() > deadline:
            raise SimulationError(f"workers not ready after {_START_TIMEOUT:.0f} s")


def run_across_processes(
    config: SimConfig,
    *,
    redis_url: str,
    processes: int,
    on_progress: Callable[[Progress], object] | None = None,
) -> SimResult:
    """Run one race across processes to completion; see ``ProcessRace``."""
    return ProcessRace(config, redis_url=redis_url, processes=processes).run(on_progress)


# --------------------------------------------------------------------------- the parent's side


class _Inbox:
    """What the workers said: ready, progress, results, errors."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ready = 0
        self.latest: dict[int, tuple[int, int, int]] = {}
        self.results: dict[int, tuple[SimResult, dict[str, Any]]] = {}
        self.errors: dict[int, str] = {}
        self.gone: set[int] = set()  # ended without a word (killed, crashed)

    def pump(self, out: Any, workers: Sequence[BaseProcess], *, timeout: float) -> None:
        """Take every message waiting (wait up to ``timeout`` for the first one)."""
        # A worker flushes its queue before it exits: whatever an exited worker said is in the
        # pipe by now, so one that exited and is still silent after this drain said nothing.
        exited = [k for k, worker in enumerate(workers) if worker.exitcode is not None]
        try:
            message = out.get(timeout=timeout)
            while True:
                self._take(message)
                message = out.get_nowait()
        except queue.Empty:
            pass
        for k in exited:
            if k not in self.results and k not in self.errors:
                self.gone.add(k)

    def _take(self, message: tuple[Any, ...]) -> None:
        kind, k = message[0], message[1]
        if kind == "ready":
            self.ready += 1
        elif kind == "progress":
            self.latest[k] = message[2]
        elif kind == "result":
            self.results[k] = (message[2], message[3])
            self.gone.discard(k)
        elif kind == "error":
            self.errors[k] = message[2]
            self.gone.discard(k)

    def finished(self) -> bool:
        return len(self.results) + len(self.errors) + len(self.gone) >= self.n

    def raise_errors(self) -> None:
        if self.errors:
            k = min(self.errors)
            raise SimulationError(f"race process {k} failed:\n{self.errors[k]}")
        if self.gone:
            k = min(self.gone)
            raise SimulationError(f"race process {k} ended without reporting (killed?)")

    def progress(self, elapsed: float, seconds: float) -> Progress:
        decisions = admitted = breaches = 0
        for d, a, b in self.latest.values():
            decisions += d
            admitted += a
            breaches += b
        return Progress(elapsed, seconds, decisions, admitted, breaches)


class _Sampler:
    """The parent's auditor: reads the shared state in a loop while the race runs."""

    def __init__(self, audit: SharedAudit, interval: float) -> None:
        self._audit = audit
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="race-sampler", daemon=True)
        self.samples = 0
        self.breaches = 0
        self.first_breach: str | None = None
        self.problems = 0
        self.problem_texts: list[str] = []
        self.max_positions = self.max_gross = self.max_symbol = self.max_net = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def finish(self) -> None:
        """Stop, and raise ``SimulationError`` if the auditor could not read the store."""
        self.stop()
        if self.error is not None:
            error, self.error = self.error, None
            raise SimulationError(f"the auditor could not read the store: {error!r}") from error

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                self.take(self._audit.read())
                self._done.wait(self._interval)
        except Exception as exc:
            self.error = exc

    def take(self, reading: SharedReading) -> None:
        self.samples += 1
        self.max_positions = max(self.max_positions, reading.positions)
        self.max_gross = max(self.max_gross, reading.gross)
        self.max_symbol = max(self.max_symbol, reading.max_symbol)
        self.max_net = max(self.max_net, reading.net)
        if reading.over:
            self.breaches += 1
            if self.first_breach is None:
                self.first_breach = "shared state: " + ", ".join(t for _, t in reading.over)
        problems = SharedAudit.problems(reading)
        if problems:
            self.problems += 1
            self.problem_texts.extend(problems[: 5 - len(self.problem_texts)])


def _reap(
    workers: Sequence[BaseProcess], stop: Any, out: Any, inbox: _Inbox, *, grace: float
) -> None:
    """Join every worker: told to stop, then terminated, then killed. Never leaves one behind."""
    interrupted: KeyboardInterrupt | None = None
    try:
        deadline = time.monotonic() + grace
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            inbox.pump(out, workers, timeout=0.05)  # a worker exits once its queue is flushed
    except KeyboardInterrupt as exc:  # a second Ctrl-C: no more waiting
        interrupted = exc
    stop.set()
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(2)
        if worker.is_alive():
            worker.kill()
            worker.join(2)
    with contextlib.suppress(Exception):
        out.close()
        out.join_thread()
    if interrupted is not None:
        raise interrupted


def _merge(
    config: SimConfig,
    processes: int,
    inbox: _Inbox,
    sampler: _Sampler,
    final: SharedReading,
    *,
    interrupted: bool,
) -> SimResult:
    """One ``SimResult`` from every worker's figures and the parent's readings."""
    parts = [inbox.results[k] for k in sorted(inbox.results)]
    results = [r for r, _ in parts]
    checks = [c for _, c in parts]

    def total(name: str) -> int:
        return sum(int(getattr(r, name)) for r in results)

    denied: dict[str, int] = {}
    for r in results:
        for reason, count in r.denied.items():
            denied[reason] = denied.get(reason, 0) + count
    # Per process, the larger of its two counts: admissions its check of the shared state
    # flagged, and admissions its own auditor (its own orders' true exposure) flagged.
    breaches = sum(max(c["breaches"], r.breaches) for r, c in parts)
    by_limit = {
        kind: sum(max(c["by_limit"][kind], r.breaches_by_limit[kind]) for r, c in parts)
        for kind in LIMIT_KINDS
    }
    first = next((c["first_breach"] for c in checks if c["first_breach"]), None)
    first = first or next((r.first_breach for r in results if r.first_breach), None)
    notes: list[str] = [
        f"{processes} processes, each trading its own share of the symbols; the parent's "
        f"auditor read the shared state {sampler.samples:,} times, "
        f"{sampler.breaches:,} over a limit"
    ]
    if sampler.first_breach and not first:
        first = sampler.first_breach
    late = total("late_answers")
    if late:
        notes.append(
            f"{late} answer(s) arrived after their reservation expired: the TTL is too short "
            "for the exchange latency"
        )
    unavailable = denied.get("backend_unavailable", 0)
    if unavailable:
        notes.append(f"{unavailable} decision(s) denied because Redis did not answer in time")
    notes += [f"store audit: {text}" for text in sampler.problem_texts]
    return SimResult(
        gate="broken" if config.broken else "pendingledger",
        backend="redis",
        seed=config.seed,
        threads=config.threads,
        seconds=config.seconds,
        elapsed=max((r.elapsed for r in results), default=0.0),
        max_positions=config.max_positions,
        max_gross=config.max_gross,
        max_symbol=config.max_symbol,
        decisions=total("decisions"),
        admitted=total("admitted"),
        denied=denied,
        rejected=total("rejected"),
        filled=total("filled"),
        partially_filled=total("partially_filled"),
        lost=total("lost"),
        expired=total("expired"),
        closes=total("closes"),
        duplicates=total("duplicates"),
        late_answers=late,
        max_positions_seen=max(
            [sampler.max_positions]
            + [c["max_positions"] for c in checks]
            + [r.max_positions_seen for r in results]
        ),
        max_gross_seen=max(
            [to_amount(sampler.max_gross)]
            + [c["max_gross"] for c in checks]
            + [r.max_gross_seen for r in results]
        ),
        max_symbol_seen=max(
            [to_amount(sampler.max_symbol)]
            + [c["max_symbol"] for c in checks]
            + [r.max_symbol_seen for r in results]
        ),
        breaches=breaches,
        breaches_by_limit=by_limit,
        first_breach=first,
        ended_released=total("ended_released"),
        ended_reduced=total("ended_reduced"),
        ended_expired=total("ended_expired"),
        leaked=total("leaked"),
        double_ended=total("double_ended"),
        ledger_outstanding=len(final.snapshot.orders),
        ledger_gross=float(to_amount(final.snapshot.reserved_gross_units)),
        book="gate",
        release_first=config.release_first,
        interrupted=interrupted or any(r.interrupted for r in results),
        notes=tuple(notes),
        processes=processes,
        samples=sampler.samples,
        sampled_breaches=sampler.breaches,
        store_problems=sampler.problems,
        max_net=config.max_net,
        # the shared readings only: one process's own net is no bound of the app's
        max_net_seen=max([to_amount(sampler.max_net)] + [c["max_net"] for c in checks]),
        admitted_buys=total("admitted_buys"),
        admitted_sells=total("admitted_sells"),
        reducing_admitted=total("reducing_admitted"),
        longs_opened=total("longs_opened"),
        shorts_opened=total("shorts_opened"),
    )


# --------------------------------------------------------------------------- a worker process


def worker_main(
    index: int,
    url: str,
    namespace: str,
    config: SimConfig,
    first_brain: int,
    start: Any,
    stop: Any,
    out: Any,
) -> None:
    """Entry point of one worker process (spawned): race, then report on ``out``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        result, figures = _race_one_share(index, url, namespace, config, first_brain,
                                          start, stop, out)  # fmt: skip
    except _Cancelled:
        out.put(("error", index, "cancelled before the race started"))
    except BaseException:
        out.put(("error", index, traceback.format_exc()))
    else:
        out.put(("result", index, result, figures))


class _Cancelled(Exception):
    pass


def _race_one_share(
    index: int,
    url: str,
    namespace: str,
    config: SimConfig,
    first_brain: int,
    start: Any,
    stop: Any,
    out: Any,
) -> tuple[SimResult, dict[str, Any]]:
    made: list[RedisBackend] = []

    def backend(
        *,
        limits: Any,
        ttl: float,
        clock: Callable[[], float],
        on_expire: Callable[[ReservationHandle], None],
        broken: bool,
        budgets: Any = None,
    ) -> RedisBackend:
        made.append(
            RedisBackend(url, namespace=namespace, limits=limits, ttl=ttl,
                         on_expire=on_expire, broken=broken)
        )  # fmt: skip
        out.put(("ready", index))
        deadline = time.monotonic() + _START_TIMEOUT
        while not start.wait(0.05):  # every process starts racing at the same moment
            if stop.is_set() or time.monotonic() > deadline:
                made[0].close()
                raise _Cancelled
        return made[0]

    simulation = Simulation(config, backend=backend, first_brain=first_brain, share=True)
    done = threading.Event()

    def report() -> None:
        while not done.wait(_PROGRESS_EVERY):
            if stop.is_set():
                simulation.stop()
            p = simulation.progress()
            breaches = made[0].gate.checks.breaches if made else 0
            out.put(("progress", index, (p.decisions, p.admitted, breaches)))

    reporter = threading.Thread(target=report, name="race-reporter", daemon=True)
    reporter.start()
    try:
        result = simulation.run()
    finally:
        done.set()
        reporter.join(5)
    return result, made[0].figures()
