"""A simulated threaded trading app racing a portfolio gate, and an auditor that catches breaches.

Why this module exists: pendingledger promises that however many threads race
check-and-reserve, the portfolio limits are never breached and no reservation is lost or leaked.
A promise like that is only worth something if a harness that *could* catch a breach runs
against it. This module is that harness, shaped like the app that imports the library:

* **Brains** (strategy threads, ``SimConfig.threads`` of them, started together behind a
  ``threading.Barrier``) pick a symbol, a notional and a side and call ``gate.try_enter`` with
  ``side=``: buys and sells from flat (longs and shorts), and orders that reduce the position
  held (a sell against a long, a buy against a short, at most its size).
* A **simulated exchange** (``SimConfig.exchange_threads`` threads) answers each admitted order
  after a random latency: it rejects it, fills it in full, fills it in parts, or never answers
  (a lost order, whose reservation only the ledger's TTL can end).
* A **fill router** thread hands each fill over in one step: into the position cache (signed)
  and off the reservation under the cache's own lock, which the gate's read of the positions
  takes too (or ``confirm_fill`` on the gate's own book). A fill the gate could see twice, in
  the position and still reserved, is not the safe direction with sides: it inflates one side
  of a worst case and hides a raise on the other. On a reject it releases at once. Positions
  are closed after a random holding time with closing orders through the gate (the opposite
  side, the position's size), so slots free up and the race keeps going.
* An **auditor** is told about every admitted entry, fill, reject and close, in the order they
  become true, and independently tracks the *true* state: signed positions plus orders that
  can still fill, per side. At every admitted decision it takes the worst-case figures of that
  state (``rules.worst_case``: per symbol, their sum, the net) with the admitted entry added
  and counts a breach of each limit the admission raised past it (positions, gross, per
  symbol, net), and of each order cap it took past its limit, at every scope (see
  Strategies below).
* **Reservation accounting**: every reservation must end exactly once (released by the router,
  reduced to zero by the last partial fill, or expired, seen through ``on_expire``). Leaks and
  double ends are counted.

**Strategies** (``SimConfig(strategies=N)``, N >= 2, ``strategies_config`` for a set-up in which
every limit binds at both scopes): N strategies (``s1`` to ``sN``) trade one account, each
under a budget of its own (``SimConfig.budgets()``: a ``PortfolioLimits`` with positions, gross,
symbol and net limits and the order caps, derived from the account's limits), the account with
limits and order caps of its own. Brain ``i`` trades as strategy ``i % N`` (every order under
its strategy, reducing orders against that strategy's own position); the router hands fills
over with ``confirm_fill`` (which follows the reservation's strategy) and closes each
strategy's positions with that strategy's orders. The gate keeps the book (``book="gate"``:
budgets are decided on the gate's own book); in one process only. The auditor keeps the truth
of every scope (each strategy's own orders and positions, and the account's: everything) and
checks each against its limits, and the order caps: one order's notional, the open orders in
all and on a symbol, and the admissions in any sliding window of the rate's seconds on the
ledger clock (judged on the reservations' stamps). ``SimResult.scopes`` has each scope's
limits, peaks, breaches and decisions.

``SimConfig(broken=True)`` runs the same app on ``BrokenGate``, the classic check-then-act bug
(check under the lock, reserve in a second acquisition). The auditor must find breaches with it:
that is the proof that a zero from the real gate means something.

What callers may rely on:

* ``run_simulation(config)`` (or ``Simulation(config).run()``) returns a ``SimResult`` and leaves
  no thread behind: every thread it starts is joined before it returns, also when it raises or is
  interrupted (``KeyboardInterrupt`` in the calling thread, or ``Simulation.stop()`` from another
  thread). A thread that does not finish within a bound raises ``SimulationError`` (a likely
  deadlock in the gate) instead of hanging.
* The run is bounded in time: ``config.seconds`` of racing, then a drain bounded by the exchange
  latency and the TTL.
* Randomness is seeded: brain ``i`` uses ``random.Random(seed + i)`` for every choice about its
  orders (symbol, notional, outcome, latency, partial split); the router uses
  ``random.Random(seed + threads)`` for holding times (``Simulation(first_brain=k)``, one share
  of a multi-process run, adds ``k`` to both). Thread scheduling is not reproducible, so the
  figures differ from run to run, but the stream of orders each brain *wants* does not.
* The gate is injected through a backend factory (``memory_backend`` by default), so another
  store (for example a shared one) can be raced by the same app. It is typed with the core
  protocols: with ``book="gate"`` any ``pendingledger.Gate``; with ``book="cache"`` a
  ``CacheGate`` (a ``try_enter`` that also takes the app's ``positions``). Decisions are
  ``pendingledger.Decision``s carrying a ``pendingledger.ReservationHandle``.

Time: the ledger's TTL runs on the clock passed to ``Simulation``. By default that is real time
(``time.monotonic``, plus a single jump forward once the race is over and every answer has
landed, so the last lost orders expire without waiting out their TTL): this is the demo. Pass a
``pendingledger.testing.ManualClock`` and the simulation drives it itself from a driver thread,
in steps of ``ttl / 8``, only while no answered order could expire before its answer lands, and
jumps it past the TTL at the end; tests use this. Any other clock is used as given, and the drain
waits (at most ``ttl`` + 1 s) for it to pass the last TTL. Exchange latency and holding times
always use real time.

An answer that lands after its order's reservation expired (``SimResult.late_answers``, also in
``notes``) means the TTL was too short for the exchange latency under that load: the gate then
stops counting an order that can still fill, and the auditor rightly reports any breach that
follows. That is the documented trade-off of a TTL, not the race; keep the TTL well above the
worst answer latency.

The package, one concern per module:

* ``config``: ``SimConfig``, ``Progress``, ``SimResult`` (what shapes a run, what it reports);
* ``backends``: the backend protocol, ``CacheGate``, ``MemoryBackend`` / ``memory_backend``;
* ``broken``: ``BrokenGate``, the check-then-act bug;
* ``exchange``: orders, the exchange's answers and their delivery;
* ``auditor``: the true-exposure auditor and the reservation accounts;
* ``clocks``: the demo's offset clock and the ``ManualClock`` driver's bookkeeping;
* ``app``: ``Simulation`` and ``run_simulation``;
* ``latch``: the loss latch race (``LatchRace``, ``memory_latch_race``): threads entering
  while another records losses until the latch fires; nothing may be admitted after it;
* ``redis_backend`` and ``processes`` (need the ``redis`` extra, not imported here): the app
  across processes on one Redis namespace, ``ProcessRace`` (``race --backend redis``).
"""

from __future__ import annotations

from pendingledger.limits import Decision
from pendingledger.protocols import Gate, ReservationHandle
from pendingledger.sim.app import Simulation, SimulationError, run_simulation
from pendingledger.sim.backends import (
    BackendFactory,
    CacheGate,
    MemoryBackend,
    SimBackend,
    SimGate,
    memory_backend,
)
from pendingledger.sim.broken import BrokenGate
from pendingledger.sim.config import (
    ACCOUNT,
    CAP_KINDS,
    DEFAULT_SYMBOLS,
    LIMIT_KINDS,
    Progress,
    SimConfig,
    SimResult,
    strategies_config,
)

__all__ = [
    "ACCOUNT",
    "CAP_KINDS",
    "DEFAULT_SYMBOLS",
    "LIMIT_KINDS",
    "BackendFactory",
    "BrokenGate",
    "CacheGate",
    "MemoryBackend",
    "Progress",
    "SimBackend",
    "SimConfig",
    "SimGate",
    "SimResult",
    "Simulation",
    "SimulationError",
    "memory_backend",
    "run_simulation",
    "strategies_config",
]

# The simulation's own protocols before it used the core ones; the names still import.
ReservationLike = ReservationHandle
DecisionLike = Decision
GateLike = SimGate
BookKeeper = Gate
