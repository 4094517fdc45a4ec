"""One process of the multi-process Redis stress race (imported by spawned children).

``run`` starts ``threads`` threads on one ``RedisGate``, tells the parent it is ready (``ready``)
and waits for the parent's start event; each thread races ``ops`` entries on a handful of symbols
and gives every admitted order a fate: filled (``confirm_fill``), rejected (``release``, twice: the
second must do nothing), partially filled down to zero (``reduce``), or lost (left to expire).
Counts of what each call reported go back to the parent, which checks them against the counters
kept in Redis.

``broken=True`` uses ``pendingledger.redis.testing.check_then_reserve``: the check in one script
call and the reservation in a second, the race this library exists to close. The parent's auditor
must find breaches with it.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pendingledger import PortfolioLimits
from pendingledger.limits import Decision
from pendingledger.redis import RedisGate
from pendingledger.redis.testing import check_then_reserve

SYMBOLS = [f"SYM{i:02d}" for i in range(12)]
AMOUNTS: list[Any] = [100, 250.5, Decimal("175.25"), Fraction(301, 2), 80.0]


def broken_try_enter(gate: RedisGate, symbol: str, notional: Any) -> Decision:
    """Check in one round trip, reserve in another: a deliberately broken gate."""
    # any thread switch between the two calls lets another entry in
    return check_then_reserve(gate, symbol, notional, between=lambda: time.sleep(0))


def run(
    url: str,
    namespace: str,
    limits: PortfolioLimits,
    ttl: float,
    threads: int,
    ops: int,
    seed: int,
    broken: bool,
    ready: Any,
    start: Any,
    out: Any,
) -> None:
    counts: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    gate = RedisGate.from_url(url, limits, ttl=ttl, namespace=namespace, timeout=10)
    gate.sweep()  # loads the script and opens a connection before the race starts
    enter: Callable[[RedisGate, str, Any], Decision] = (
        broken_try_enter if broken else RedisGate.try_enter
    )

    def thread_main(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        local: Counter[str] = Counter()
        try:
            start.wait(30)
            for _ in range(ops):
                symbol = rng.choice(SYMBOLS)
                notional = rng.choice(AMOUNTS)
                if rng.random() < 0.15 and gate.close_position(rng.choice(SYMBOLS)):
                    local["closed"] += 1  # positions come and go, so the race never settles
                decision = enter(gate, symbol, notional)
                if decision.reservation is None:
                    local[f"denied:{decision.reason}"] += 1
                    continue
                local["admitted"] += 1
                res: Any = decision.reservation
                time.sleep(rng.random() * 0.002)  # the order is on its way to the exchange
                fate = rng.random()
                if fate < 0.4:
                    exposure = notional if rng.random() < 0.5 else -notional
                    local["filled" if gate.confirm_fill(res.order_id, exposure) else "late"] += 1
                elif fate < 0.75:
                    local["released" if res.release() else "late"] += 1
                    if res.release():
                        local["double_release"] += 1
                    if gate.release_order(res.order_id):
                        local["double_release"] += 1
                elif fate < 0.96:
                    half = Fraction(str(notional)) / 2  # a float counts as its repr
                    ok = res.reduce(half) and res.reduce(half)
                    local["filled" if ok else "late"] += 1
                    if res.reduce(1) or res.release():
                        local["double_release"] += 1
                else:
                    local["lost"] += 1
        except BaseException:
            with lock:
                errors.append(traceback.format_exc())
        with lock:
            counts.update(local)

    workers = [threading.Thread(target=thread_main, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    ready.release()  # connected, script loaded, threads waiting for `start`
    for worker in workers:
        worker.join(120)
    gate.client.close()
    out.put({"counts": dict(counts), "errors": errors})
