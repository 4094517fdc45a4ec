"""The peers pendingledger is measured against, and the timing loops every subject shares.

The *floor* is the cheapest code that could do the job at all: a bare ``threading.Lock`` cycle,
``with lock: book[key] = 1.0`` then ``with lock: del book[key]``, nothing else.

``StraightforwardLedger`` / ``StraightforwardGate`` is *the straightforward port*: the ledger a
user would otherwise write, with the same semantics as pendingledger (exact ``str`` symbols and
order ids, amounts in units of 1e-9 through ``pendingledger._units``, one reservation per order,
the rules decided by calling ``pendingledger.rules.first_failing_rule``, the one copy of them),
written the obvious way:

- one ``dict`` of order id -> reservation guarded by one ``threading.Lock``;
- ``lock()`` is a generator-based ``contextlib.contextmanager`` that reads the clock and scans
  every reservation on each acquisition to drop the expired ones;
- the gate reads the positions, then sums every reservation and counts the open symbols on each
  check, all inside the lock.

It has the surface the driver uses on the real gate (``try_enter(symbol, notional, positions,
*, order_id=...)`` returning a decision whose ``reservation.release()`` ends it), so the same
loops time both. Nothing here is part of the package, and nothing here is a test.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pendingledger import _units, rules
from pendingledger.limits import REASONS, DenyReason, PortfolioLimits

__all__ = [
    "PortDecision",
    "PortReservation",
    "StraightforwardGate",
    "StraightforwardLedger",
    "floor_loop",
    "floor_worker",
    "gate_loop",
    "gate_worker",
]


class _Entry:
    __slots__ = ("reserved_at", "symbol", "units")

    def __init__(self, symbol: str, units: int, reserved_at: float) -> None:
        self.symbol = symbol
        self.units = units
        self.reserved_at = reserved_at


class StraightforwardLedger:
    """Reservations by order id; expiry by a full scan on every acquisition."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._orders: dict[str, _Entry] = {}
        self.now = 0.0  # the clock reading of the current acquisition

    @contextmanager
    def lock(self) -> Iterator[dict[str, _Entry]]:
        with self._lock:
            now = self.now = self._clock()
            ttl = self.ttl
            expired = [
                order_id
                for order_id, entry in self._orders.items()
                if now - entry.reserved_at >= ttl
            ]
            for order_id in expired:
                del self._orders[order_id]
            yield self._orders

    def release_order(self, order_id: str) -> bool:
        oid = _units.check_order_id(order_id)
        with self.lock() as orders:
            return orders.pop(oid, None) is not None

    def prefill(self, symbols: Sequence[str], notional: object) -> None:
        """Outstanding reservations for a benchmark's book (order id = symbol), without the O(N)
        check per entry that filling through ``try_enter`` would cost."""
        units = _units.notional_units("notional", notional)
        with self.lock() as orders:
            for symbol in symbols:
                orders[symbol] = _Entry(symbol, units, self.now)

    def __len__(self) -> int:
        return len(self._orders)


class PortReservation:
    __slots__ = ("_ledger", "notional", "order_id", "symbol")

    def __init__(
        self, ledger: StraightforwardLedger, symbol: str, order_id: str, notional: object
    ) -> None:
        self._ledger = ledger
        self.symbol = symbol
        self.order_id = order_id
        self.notional = notional

    def release(self) -> bool:
        return self._ledger.release_order(self.order_id)


class PortDecision:
    __slots__ = ("reason", "reservation")

    def __init__(self, reason: DenyReason | None, reservation: PortReservation | None) -> None:
        self.reason = reason
        self.reservation = reservation

    def __bool__(self) -> bool:
        return self.reason is None


_DENIED = tuple(PortDecision(reason, None) for reason in REASONS)


class StraightforwardGate:
    """The port's gate: every check reads the positions and sums the whole book in the lock."""

    def __init__(self, ledger: StraightforwardLedger, limits: PortfolioLimits) -> None:
        self.ledger = ledger
        self._limits = rules.unit_limits(limits)
        self._book: dict[str, int] = {}  # its own position book, in units
        self._ids = itertools.count()
        self.halted = False

    def set_position(self, symbol: str, exposure: object) -> None:
        name = _units.check_symbol(symbol)
        units = _units.units("exposure", exposure, True)
        with self.ledger.lock():
            self._book[name] = units

    def try_enter(
        self,
        symbol: str,
        notional: object,
        positions: Mapping[str, object] | None = None,
        *,
        order_id: str | None = None,
    ) -> PortDecision:
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        oid = f"port-{next(self._ids)}" if order_id is None else _units.check_order_id(order_id)
        ledger = self.ledger
        with ledger.lock() as orders:
            if oid in orders:
                raise ValueError(f"order_id {oid!r} already has an outstanding reservation")
            book = self._book if positions is None else _read(positions)
            state = rules.HALTED_STATE if self.halted else rules.ACTIVE
            code = rules.first_failing_rule(
                self._limits, state, *_figures(book, orders, name, units)
            )
            if code == rules.ADMIT:
                orders[oid] = _Entry(name, units, ledger.now)
        if code != rules.ADMIT:
            return _DENIED[code]
        return PortDecision(None, PortReservation(ledger, name, oid, notional))


def _read(positions: Mapping[str, object]) -> dict[str, int]:
    return {
        _units.check_symbol(symbol): _units.units("positions", exposure, True)
        for symbol, exposure in positions.items()
    }


def _figures(
    book: Mapping[str, int], orders: Mapping[str, _Entry], symbol: str, units: int
) -> tuple[int, bool, int, int, int, int, int, int, int, int, float, float]:
    """The rules' figures for an order of ``units`` (side not given), summed: ``(open_count,
    symbol_open, gross, before, after, net_before, net_after, units, orders, symbol_orders,
    window_start, now)`` (no rate limit: no window)."""
    open_symbols = set(book)
    reserved = 0
    reserved_here = 0
    orders_here = 0
    for entry in orders.values():
        open_symbols.add(entry.symbol)
        reserved += entry.units
        if entry.symbol == symbol:
            reserved_here += entry.units
            orders_here += 1
    gross = sum(abs(position) for position in book.values()) + reserved
    before = abs(book.get(symbol, 0)) + reserved_here
    net = sum(book.values())
    return (
        len(open_symbols),
        symbol in open_symbols,
        gross,
        before,
        before + units,
        rules.worst_case(net, 0, 0, reserved),
        rules.worst_case(net, 0, 0, reserved + units),
        units,
        len(orders),
        orders_here,
        rules.NO_WINDOW,
        0.0,
    )


# --- single-thread timing loops -------------------------------------------------------------------
# One ``for`` over a prepared list per loop, so the loop overhead is alike in all of them; the
# gates' loops also unpack a (symbol, order id) pair, a cost the floor does not pay.


def floor_loop(lock: Any, book: dict[str, float], symbols: Sequence[str]) -> None:
    """The floor: insert in one critical section, delete in a second, nothing else."""
    for symbol in symbols:
        with lock:
            book[symbol] = 1.0
        with lock:
            del book[symbol]


def sided_loop(
    try_enter: Callable[..., Any], orders: Sequence[tuple[str, str]], notional: object, side: object
) -> None:
    """``gate_loop`` on the gate's own book with ``side=`` given."""
    for symbol, order_id in orders:
        try_enter(symbol, notional, order_id=order_id, side=side).reservation.release()


def strategy_loop(
    try_enter: Callable[..., Any],
    orders: Sequence[tuple[str, str]],
    notional: object,
    strategy: str,
) -> None:
    """``gate_loop`` on the gate's own book with ``strategy=`` given (a decision at two scopes)."""
    for symbol, order_id in orders:
        try_enter(symbol, notional, order_id=order_id, strategy=strategy).reservation.release()


def gate_loop(
    try_enter: Callable[..., Any],
    orders: Sequence[tuple[str, str]],
    notional: object,
    positions: Mapping[str, object] | None,
    timeout: float | None = None,
) -> None:
    """One admitted ``try_enter`` with a client order id and the release of its reservation.

    ``positions=None`` calls ``try_enter(symbol, notional, order_id=...)`` (the gate's own book),
    without passing the argument. A denied decision has no reservation, so a denial fails loudly
    (AttributeError) instead of being timed as if it were an admission.
    """
    if timeout is not None:
        for symbol, order_id in orders:
            try_enter(symbol, notional, order_id=order_id, timeout=timeout).reservation.release()
    elif positions is None:
        for symbol, order_id in orders:
            try_enter(symbol, notional, order_id=order_id).reservation.release()
    else:
        for symbol, order_id in orders:
            try_enter(symbol, notional, positions, order_id=order_id).reservation.release()


# --- contention workers ---------------------------------------------------------------------------
# Each worker waits at the barrier, then runs chunks of ``len(symbols)`` untimed operations
# followed by one operation timed with perf_counter_ns (its decision latency sampled), until the
# perf_counter_ns deadline in ``deadline[0]`` (set before the barrier opens) or until ``stop[0]``
# is set (another worker failed). Workers stop themselves at the deadline: a main thread waking
# from a sleep would have to win the GIL from 64 busy threads first. Each returns
# ``(operations, denials, latencies in ns)``.

_ns = time.perf_counter_ns


def floor_worker(
    lock: Any,
    book: dict[str, float],
    symbols: Sequence[str],
    *,
    barrier: threading.Barrier,
    stop: list[bool],
    deadline: list[int],
) -> tuple[int, int, list[int]]:
    latencies: list[int] = []
    sample = latencies.append
    timed = symbols[0]
    count = 0
    chunk = len(symbols) + 1
    barrier.wait()
    end = deadline[0]
    while not stop[0] and _ns() < end:
        for symbol in symbols:
            with lock:
                book[symbol] = 1.0
            with lock:
                del book[symbol]
        t0 = _ns()
        with lock:
            book[timed] = 1.0
        t1 = _ns()
        with lock:
            del book[timed]
        sample(t1 - t0)
        count += chunk
    return count, 0, latencies


def gate_worker(
    try_enter: Callable[..., Any],
    symbols: Sequence[str],
    notional: object,
    positions: Mapping[str, object] | None,
    *,
    barrier: threading.Barrier,
    stop: list[bool],
    deadline: list[int],
) -> tuple[int, int, list[int]]:
    """Each symbol is entered with its own client order id, as a bot does; the ids repeat, which
    is fine: each reservation is released before its id comes round again. A denial (there
    should be none: the limits are generous) is counted, not released."""
    latencies: list[int] = []
    sample = latencies.append
    orders = [(symbol, f"{symbol}-order") for symbol in symbols]
    timed, timed_id = orders[0]
    count = 0
    denials = 0
    chunk = len(symbols) + 1
    barrier.wait()
    end = deadline[0]
    while not stop[0] and _ns() < end:
        if positions is None:  # the own book: try_enter(symbol, notional, order_id=...)
            for symbol, order_id in orders:
                res = try_enter(symbol, notional, order_id=order_id).reservation
                if res is None:
                    denials += 1
                else:
                    res.release()
            t0 = _ns()
            res = try_enter(timed, notional, order_id=timed_id).reservation
            t1 = _ns()
        else:
            for symbol, order_id in orders:
                res = try_enter(symbol, notional, positions, order_id=order_id).reservation
                if res is None:
                    denials += 1
                else:
                    res.release()
            t0 = _ns()
            res = try_enter(timed, notional, positions, order_id=timed_id).reservation
            t1 = _ns()
        if res is None:
            denials += 1
        else:
            res.release()
        sample(t1 - t0)
        count += chunk
    return count, denials, latencies
