"""One process's share of a race against a shared Redis, and the audit of the shared state.

Needs the ``redis`` extra (``pip install '.[redis]'`` from a checkout); ``import pendingledger.sim``
does not import this module. ``pendingledger.sim.processes`` runs several processes, each with a
``RedisBackend`` on the same namespace; the parent process audits the namespace while they race.

The gate each process's brains call (``SharedGate``) is the ``RedisGate`` (or, for the broken run,
the same script split in two calls: check, then reserve without checking), with two additions:

* **An admission check.** Right after each admission it reads the whole namespace (one atomic
  server call) and checks it against the limits: positions open or reserved, and the worst-case
  figures (``rules.worst_case`` of each symbol's signed position and pending orders by side,
  their sum, and the net), with the entry just admitted in it. That is the cross-process
  analogue of the in-process auditor's check at every admission.
* **Reservation accounting.** A ``RedisGate`` runs no ``on_expire`` callback (the TTL ends
  reservations inside the server), so the backend tells expiries apart from the ends this
  process's calls made, and reports each expiry of its own orders through ``on_expire``.

What a reading of the shared state can and cannot see (``SharedAudit``): it sees what the gate
counts, every process's positions and outstanding reservations at one instant. It cannot see an
order between a process's decision and Redis: nothing is in flight from the store's point of view
(an admission is in Redis when ``try_enter`` returns), but an order the exchange has already
rejected stays reserved until the router's release reaches Redis, and a lost order, which can
never fill, stays reserved until its TTL. Both only make a reading count more than the true
exposure, and no more than the gate itself counts; the gate never counts more than the limits
allow without a decision. The router hands every fill over in one call (``confirm_fill``, with
``filled=`` for a part), so no reading sees a fill twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from pendingledger import _units, rules
from pendingledger.decision import Admitted, Decision
from pendingledger.limits import Number, PortfolioLimits
from pendingledger.protocols import ReservationHandle
from pendingledger.redis import SCALE, RedisGate, RedisReservation, Snapshot, audit
from pendingledger.redis.testing import check_then_reserve, enable_test_ops
from pendingledger.sim.broken import GAP
from pendingledger.sim.config import LIMIT_KINDS
from pendingledger.sim.latch import LatchRace, LatchRaceResult
from pendingledger.stats import GateStats
from pendingledger.trading import Latch, Side, TradingState

if TYPE_CHECKING:
    from pendingledger.protocols import Gate

__all__ = [
    "RedisBackend",
    "SharedAudit",
    "SharedGate",
    "SharedReading",
    "redis_latch_race",
]

SOCKET_TIMEOUT: Final = 2.0
"""Seconds a sim client waits for Redis: a demo would rather wait than deny on a busy machine."""


# --------------------------------------------------------------------------- reading the store


@dataclass(frozen=True)
class SharedReading:
    """The shared state at one instant, as the limits count it (amounts in Redis units).

    ``positions``: symbols open or with a live reservation; ``symbols``: each one's worst case
    (signed position, pending buys, sells and orders of unknown side); ``gross``: their sum;
    ``net``: the worst case over the sums; ``over``: ``(limit kind, description)`` for every
    limit the state exceeds; ``snapshot``: the raw reading.
    """

    snapshot: Snapshot
    positions: int
    gross: int
    symbols: dict[str, int]
    over: tuple[tuple[str, str], ...]
    net: int = 0

    @property
    def max_symbol(self) -> int:
        return max(self.symbols.values(), default=0)


class SharedAudit:
    """Reads one namespace atomically (the gate's server ``snapshot``) and checks it against
    ``limits``. Reservations past their expiry are left out (the gate no longer counts them;
    the next operation sweeps them)."""

    def __init__(self, gate: RedisGate, limits: PortfolioLimits) -> None:
        self._gate = gate
        self._limits = rules.unit_limits(limits)

    def read(self) -> SharedReading:
        return self.count(self._gate.snapshot())

    def count(self, snap: Snapshot) -> SharedReading:
        books: dict[str, list[int]] = {s: [v, 0, 0, 0] for s, v in snap.positions.items()}
        now = snap.now_us
        for rec in snap.orders.values():
            if rec.expires_at_us is None or rec.expires_at_us > now:
                book = books.setdefault(rec.symbol, [0, 0, 0, 0])
                book[_SLOTS[rec.side]] += rec.units
        totals = [sum(book[i] for book in books.values()) for i in range(4)]
        exposure = {s: rules.worst_case(*book) for s, book in books.items()}
        gross = sum(exposure.values())
        net = rules.worst_case(*totals)
        over = self._over(len(books), exposure, gross, net)
        return SharedReading(snap, len(books), gross, exposure, over, net)

    def _over(
        self, count: int, exposure: dict[str, int], gross: int, net: int
    ) -> tuple[tuple[str, str], ...]:
        """``(limit kind, description)`` of every limit the state exceeds (a breach is a state
        over a limit, so this compares states, where the rules judge an entry)."""
        limits = self._limits
        over: list[tuple[str, str]] = []
        if rules.NO_LIMIT < limits.max_positions < count:
            over.append(("positions", f"{count} positions > {limits.max_positions}"))
        if rules.NO_LIMIT < limits.max_gross < gross:
            over.append(("gross", f"gross {_amount(gross)} > {_amount(limits.max_gross)}"))
        worst = max(exposure.items(), key=lambda item: item[1], default=None)
        if worst is not None and rules.NO_LIMIT < limits.max_symbol < worst[1]:
            over.append(
                ("symbol", f"{worst[0]} {_amount(worst[1])} > {_amount(limits.max_symbol)}")
            )
        if rules.NO_LIMIT < limits.max_net < net:
            over.append(("net", f"net {_amount(net)} > {_amount(limits.max_net)}"))
        return tuple(over)

    @staticmethod
    def problems(reading: SharedReading) -> list[str]:
        """Inconsistencies in the store's own bookkeeping (``pendingledger.redis.audit``)."""
        return audit(reading.snapshot)


# Where a side code's units go in a [position, buys, sells, unknown] book.
_SLOTS: Final = {rules.UNKNOWN_SIDE: 3, rules.BUY: 1, rules.SELL: 2}


def _amount(units: int) -> str:
    """Units as the sim's amounts: whole numbers print as ints."""
    return str(_units.to_number(units, _units.KIND_INT))


def to_amount(units: int) -> int:
    """Units back to a whole amount (the sim trades whole lots), rounded up."""
    return -(-units // SCALE)


# --------------------------------------------------------------------------- what one process sees


@dataclass
class AdmissionChecks:
    """What the admission checks of one process found (see ``SharedGate``)."""

    checks: int = 0
    breaches: int = 0
    by_limit: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIMIT_KINDS, 0))
    first_breach: str | None = None
    max_positions: int = 0
    max_gross: int = 0  # units
    max_symbol: int = 0  # units
    max_net: int = 0  # units
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, reading: SharedReading, what: str) -> None:
        with self.lock:
            self.checks += 1
            self.max_positions = max(self.max_positions, reading.positions)
            self.max_gross = max(self.max_gross, reading.gross)
            self.max_symbol = max(self.max_symbol, reading.max_symbol)
            self.max_net = max(self.max_net, reading.net)
            if reading.over:
                self.breaches += 1
                for kind, _ in reading.over:
                    self.by_limit[kind] += 1
                if self.first_breach is None:
                    self.first_breach = f"{what}: " + ", ".join(text for _, text in reading.over)

    def figures(self) -> dict[str, Any]:
        """Plain values, to send to the parent process."""
        with self.lock:
            return {
                "checks": self.checks,
                "breaches": self.breaches,
                "by_limit": dict(self.by_limit),
                "first_breach": self.first_breach,
                "max_positions": self.max_positions,
                "max_gross": to_amount(self.max_gross),
                "max_symbol": to_amount(self.max_symbol),
                "max_net": to_amount(self.max_net),
            }


class TrackedReservation:
    """A ``RedisReservation`` plus whether a call of this process ended it.

    ``ended`` is set when ``release()`` or the last ``reduce()`` ended it here, or when the gate's
    ``confirm_fill``/``release_order`` did; ``RedisBackend.sweep`` sets it for reservations the
    TTL ended (and reports them as expired). What is left to reduce is counted here in units, as
    the gate counts it (an ended reservation keeps its last ``notional``, so that cannot tell).
    """

    __slots__ = ("_left", "ended", "inner")

    def __init__(self, inner: RedisReservation) -> None:
        self.inner = inner
        self.ended = False
        self._left = _units.notional_units("notional", inner.initial_notional)

    @property
    def symbol(self) -> str:
        return self.inner.symbol

    @property
    def order_id(self) -> str:
        return self.inner.order_id

    @property
    def side(self) -> Side | None:
        return self.inner.side

    @property
    def strategy(self) -> str | None:
        return self.inner.strategy

    @property
    def notional(self) -> Number:
        return self.inner.notional

    @property
    def initial_notional(self) -> Number:
        return self.inner.initial_notional

    @property
    def reserved_at(self) -> float:
        return self.inner.reserved_at

    @property
    def expires_at(self) -> float:
        return self.inner.expires_at

    @property
    def active(self) -> bool:
        return not self.ended and self.inner.active

    def release(self) -> bool:
        done = self.inner.release()
        if done:
            self.ended = True
        return done

    def reduce(self, amount: Number) -> bool:
        done = self.inner.reduce(amount)
        if done:
            self.reduced(amount)
        return done

    def reduced(self, amount: Number) -> None:
        """A call that was answered True took ``amount`` off: count it, as the gate does."""
        self._left = _units.after_fill(self._left, *_units.reduction_units("amount", amount))
        if self._left <= 0:  # reduced to zero: the reservation ended
            self.ended = True

    def __repr__(self) -> str:
        return f"TrackedReservation({self.inner!r}, ended={self.ended})"


class SharedGate:
    """The gate one process's brains race: a ``RedisGate`` (or the broken variant of its
    script) that checks the shared state after every admission and tracks its reservations.

    A ``pendingledger.Gate``: everything but ``try_enter`` and the calls that end reservations
    is passed on unchanged.
    """

    def __init__(
        self,
        gate: RedisGate,
        audit: SharedAudit,
        *,
        broken: bool,
        between: Callable[[], object] | None = None,
    ) -> None:
        self._gate = gate
        self._audit = audit
        self._broken = broken
        self._between = _gap if between is None else between
        self.checks = AdmissionChecks()
        self.tracked: dict[str, TrackedReservation] = {}

    @property
    def redis_gate(self) -> RedisGate:
        return self._gate

    def try_enter(
        self,
        symbol: str,
        notional: Number,
        positions: None = None,
        *,
        order_id: str | None = None,
        side: Side | str | None = None,
        strategy: str | None = None,
    ) -> Decision:
        if positions is not None:
            raise TypeError("the shared gate keeps the position book in Redis: no positions")
        if strategy is not None:
            # The race across processes trades for the account only (see ProcessRace).
            raise ValueError(f"strategy={strategy!r}: the shared race has no strategies")
        if self._broken:
            decision = check_then_reserve(
                self._gate, symbol, notional, order_id=order_id, side=side, between=self._between
            )
        else:
            decision = self._gate.try_enter(symbol, notional, order_id=order_id, side=side)
        inner = decision.reservation
        if not isinstance(inner, RedisReservation):
            return decision
        tracked = TrackedReservation(inner)
        self.tracked[inner.order_id] = tracked
        self.checks.record(
            self._audit.read(), f"admitting {inner.order_id} ({inner.symbol} {notional})"
        )
        return Admitted(tracked)

    def confirm_fill(
        self,
        order_id: str,
        position_exposure: Number,
        *,
        symbol: str | None = None,
        filled: Number | None = None,
        strategy: str | None = None,
    ) -> bool:
        _no_strategy(strategy)
        done = self._gate.confirm_fill(order_id, position_exposure, symbol=symbol, filled=filled)
        if filled is None:
            self._ended(order_id, done)
        elif done:  # counted here, as the gate counts it: no extra round trip for a part
            tracked = self.tracked.get(order_id)
            if tracked is not None:
                tracked.reduced(filled)
        return done

    def reduce_order(self, order_id: str, amount: Number) -> bool:
        done = self._gate.reduce_order(order_id, amount)
        self._ended(order_id, done and not self._still_active(order_id))
        return done

    def _still_active(self, order_id: str) -> bool:
        """After a partial fill: whether the reservation stayed (a reading of the server)."""
        tracked = self.tracked.get(order_id)
        return tracked is not None and tracked.inner.active

    def release_order(self, order_id: str) -> bool:
        done = self._gate.release_order(order_id)
        self._ended(order_id, done)
        return done

    def release(self, symbol: str) -> bool:
        """Passed on. The simulation never calls it: the reservations it drops are booked as
        ended here, also one that had expired just before."""
        done = self._gate.release(symbol)
        if done:
            for tracked in list(self.tracked.values()):
                if tracked.symbol == symbol:
                    tracked.ended = True
        return done

    def _ended(self, order_id: str, done: bool) -> None:
        if done:
            tracked = self.tracked.get(order_id)
            if tracked is not None:
                tracked.ended = True

    def set_position(self, symbol: str, exposure: Number, *, strategy: str | None = None) -> None:
        _no_strategy(strategy)
        self._gate.set_position(symbol, exposure)

    def close_position(self, symbol: str, *, strategy: str | None = None) -> bool:
        _no_strategy(strategy)
        return self._gate.close_position(symbol)

    def positions(self, *, strategy: str | None = None) -> dict[str, Number]:
        _no_strategy(strategy)
        return self._gate.positions()

    def halt(self) -> None:
        self._gate.halt()

    def reduce_only(self) -> None:
        self._gate.reduce_only()

    def resume(self) -> None:
        self._gate.resume()

    def record_pnl(self, amount: Number) -> None:
        self._gate.record_pnl(amount)

    def set_equity(self, equity: Number) -> None:
        self._gate.set_equity(equity)

    @property
    def halted(self) -> bool:
        return self._gate.halted

    @property
    def state(self) -> TradingState:
        return self._gate.state

    @property
    def latch(self) -> Latch | None:
        return self._gate.latch

    def stats(self) -> GateStats:
        return self._gate.stats()

    @property
    def limits(self) -> PortfolioLimits:
        return self._gate.limits

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None:
        self._gate.limits = limits

    @property
    def budgets(self) -> Mapping[str, PortfolioLimits]:
        return _NO_BUDGETS

    @budgets.setter
    def budgets(self, budgets: Mapping[str, PortfolioLimits] | None) -> None:
        if budgets:
            raise ValueError("the shared race has no strategies: no budgets")


_NO_BUDGETS: Final[Mapping[str, PortfolioLimits]] = MappingProxyType({})


def _no_strategy(strategy: str | None) -> None:
    if strategy is not None:
        raise ValueError(f"strategy={strategy!r}: the shared race has no strategies")


def _gap() -> None:
    """The broken run's gap between check and reservation: another entry can take the room the
    check saw (see ``pendingledger.redis.testing.check_then_reserve``)."""
    time.sleep(GAP)


class RedisBackend:
    """A ``SimBackend`` on a shared Redis namespace, for one process of a multi-process race.

    The namespace must exist (``RedisGate.restore``) before the race; several processes share
    it, each trading symbols of its own (the router writes whole positions, see
    ``pendingledger.sim.processes``). ``server_clock``: the TTL runs on the server's clock, so
    the drain waits for lost orders to expire in real time (at most ``ttl`` + 1 s).
    """

    name = "redis"
    server_clock = True

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        limits: PortfolioLimits,
        ttl: float,
        on_expire: Callable[[ReservationHandle], None],
        broken: bool,
    ) -> None:
        self._redis_gate = RedisGate.from_url(
            url, limits, ttl=ttl, namespace=namespace, timeout=SOCKET_TIMEOUT
        )
        self._gate: SharedGate | None = None
        try:
            self._redis_gate.sweep()  # connects and loads the library before the race
            self._audit = SharedAudit(self._redis_gate, limits)
            self._gate = SharedGate(self._redis_gate, self._audit, broken=broken)
        except BaseException:
            self._redis_gate.client.close()
            raise
        self._on_expire = on_expire

    @property
    def gate(self) -> SharedGate:
        assert self._gate is not None
        return self._gate

    def sweep(self) -> None:
        """Drop expired reservations now, and report each of this process's that the TTL ended
        (gone from the store, not ended by a call of this process) through ``on_expire``."""
        self._redis_gate.sweep()
        live = self._redis_gate.snapshot().orders
        for tracked in list(self.gate.tracked.values()):
            if tracked.ended:
                continue
            record = live.get(tracked.order_id)
            if record is None or record.token != tracked.inner.token:
                tracked.ended = True
                self._on_expire(tracked)

    def outstanding(self) -> tuple[int, float]:
        """Reservations outstanding in the whole namespace (every process's), and their gross."""
        snap = self._redis_gate.snapshot()
        return len(snap.orders), snap.reserved_gross_units / SCALE

    def figures(self) -> dict[str, Any]:
        return self.gate.checks.figures()

    def close(self) -> None:
        self._redis_gate.client.close()


def redis_latch_race(
    url: str, *, broken: bool, threads: int = 8, losses: int = 5, decisions_after: int = 20
) -> LatchRaceResult | None:
    """The latch race (``pendingledger.sim.latch``) on a fresh namespace of the server at
    ``url``: the ``RedisGate``, or for ``broken`` its script split in a check and an unchecked
    reservation, the gap held open while the latch fires. The namespace is deleted afterwards.
    None if this ``RedisGate`` has no loss latch to race."""
    if not hasattr(RedisGate, "record_pnl"):
        return None
    limits = PortfolioLimits(max_daily_loss=losses)
    gate = RedisGate.from_url(
        url, limits, ttl=_LATCH_TTL, namespace=f"latch-{uuid.uuid4().hex}", timeout=SOCKET_TIMEOUT
    )
    try:
        gate.restore({})
        race = LatchRace(
            name="broken" if broken else "pendingledger", threads=threads, losses=losses,
            decisions_after=decisions_after, hold_gap=broken,
        )  # fmt: skip
        if broken:
            enable_test_ops(gate)
            shared = SharedGate(gate, SharedAudit(gate, limits), broken=True, between=race.between)
            return race.run(shared, lambda: len(gate.snapshot().orders))
        return race.run(gate, lambda: len(gate.snapshot().orders))
    finally:
        try:
            gate.wipe()
        finally:
            gate.client.close()


_LATCH_TTL: Final = 3600.0  # the latch race ends no reservation: none may expire during it


if TYPE_CHECKING:  # mypy proves the shared gate offers the whole backend-neutral surface.

    def _conforms(gate: SharedGate) -> Gate:
        return gate

    def _handle(reservation: TrackedReservation) -> ReservationHandle:
        return reservation
