"""The peers pendingledger is measured against: the straightforward port and the floor.

``StraightforwardLedger`` / ``StraightforwardGate`` is the ledger a user would otherwise write by
porting the Rust pending-entry ledger this library descends from:

- one ``dict`` mapping symbol -> ``(notional, reserved_at)`` guarded by one ``threading.Lock``;
  a top-up on a symbol adds to its notional and refreshes its ``reserved_at``;
- ``lock()`` is a generator-based ``contextlib.contextmanager`` that scans every entry on each
  acquisition to drop the expired ones;
- the gate sums every reservation (and every position) on each check, inside the lock.

It exposes the same surface the benchmark driver uses on the real gate:
``gate.try_enter(symbol, notional, positions) -> decision`` (truthy when admitted, with
``decision.reservation.release()``), so one driver times both.

The *floor* is the cheapest code that could possibly do the job: a bare ``threading.Lock`` cycle
doing the same dict insert and delete, in two critical sections, with nothing else. ``floor_loop``
is the single-thread timing loop; ``floor_worker`` is the contention worker.

Nothing here is part of the pendingledger package, and nothing here is a test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "Reservation",
    "StraightforwardGate",
    "StraightforwardLedger",
    "floor_loop",
    "floor_worker",
    "gate_loop",
    "gate_worker",
]


class _PendingView:
    """The view ``StraightforwardLedger.lock()`` yields: the dict, plus the helpers the port has."""

    __slots__ = ("_entries", "_now")

    def __init__(self, entries: dict[str, tuple[Any, float]], now: float) -> None:
        self._entries = entries
        self._now = now

    def contains(self, symbol: str) -> bool:
        return symbol in self._entries

    def gross_notional(self) -> Any:
        return sum(notional for notional, _ in self._entries.values())

    def notional_of(self, symbol: str) -> Any:
        entry = self._entries.get(symbol)
        return 0 if entry is None else entry[0]

    def new_slots(self, is_open: Callable[[str], bool]) -> int:
        return sum(1 for symbol in self._entries if not is_open(symbol))

    def reserve(self, symbol: str, notional: Any) -> None:
        previous = self._entries.get(symbol)
        total = notional if previous is None else previous[0] + notional
        self._entries[symbol] = (total, self._now)  # a top-up refreshes the TTL (the port's bug)

    def release(self, symbol: str) -> bool:
        return self._entries.pop(symbol, None) is not None

    def __len__(self) -> int:
        return len(self._entries)


class StraightforwardLedger:
    """The Rust ledger ported line by line: per-symbol entries, expiry by full scan on each lock."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Any, float]] = {}

    @contextmanager
    def lock(self) -> Iterator[_PendingView]:
        with self._lock:
            now = self._clock()
            expired = [
                symbol
                for symbol, (_, reserved_at) in self._entries.items()
                if now - reserved_at >= self._ttl
            ]
            for symbol in expired:
                del self._entries[symbol]
            yield _PendingView(self._entries, now)

    def release(self, symbol: str) -> bool:
        with self.lock() as pending:
            return pending.release(symbol)

    def prefill(self, symbols: Sequence[str], notional: Any) -> None:
        """Outstanding reservations for a benchmark's book, without the O(N) check per entry."""
        with self.lock() as pending:
            for symbol in symbols:
                pending.reserve(symbol, notional)

    def __len__(self) -> int:
        return len(self._entries)


class Reservation:
    __slots__ = ("_ledger", "symbol")

    def __init__(self, ledger: StraightforwardLedger, symbol: str) -> None:
        self._ledger = ledger
        self.symbol = symbol

    def release(self) -> bool:
        # The port keys reservations by symbol: this drops every order on the symbol.
        return self._ledger.release(self.symbol)


class _Decision:
    __slots__ = ("reason", "reservation")

    def __init__(self, reason: str | None, reservation: Reservation | None) -> None:
        self.reason = reason
        self.reservation = reservation

    def __bool__(self) -> bool:
        return self.reason is None


_DENIED = {
    reason: _Decision(reason, None)
    for reason in ("max_concurrent_positions", "max_gross_exposure", "max_symbol_exposure")
}


class StraightforwardGate:
    """The port's gate: every check sums the whole book inside the lock.

    ``limits`` is any object with ``max_concurrent_positions``, ``max_gross_exposure`` and
    ``max_symbol_exposure`` attributes (``pendingledger.PortfolioLimits`` works).
    """

    # ``is_open`` is passed as the bound ``positions.__contains__`` rather than the more natural
    # ``lambda s: s in positions``: it is cheaper, so the port is not made slower than it needs to
    # be and the speed-up measured against it is not flattered.

    def __init__(self, ledger: StraightforwardLedger, limits: Any) -> None:
        self.ledger = ledger
        self.limits = limits

    def try_enter(
        self,
        symbol: str,
        notional: Any,
        positions: Mapping[str, Any],
        *,
        order_id: object = None,
    ) -> _Decision:
        del order_id  # the port has no per-order reservations
        limits = self.limits
        with self.ledger.lock() as pending:
            max_positions = limits.max_concurrent_positions
            if (
                max_positions is not None
                and symbol not in positions
                and not pending.contains(symbol)
                and len(positions) + pending.new_slots(positions.__contains__) >= max_positions
            ):
                return _DENIED["max_concurrent_positions"]
            max_gross = limits.max_gross_exposure
            if max_gross is not None:
                open_exposure = sum(abs(exposure) for exposure in positions.values())
                if open_exposure + pending.gross_notional() + notional > max_gross:
                    return _DENIED["max_gross_exposure"]
            max_symbol = limits.max_symbol_exposure
            if max_symbol is not None:
                exposure = abs(positions.get(symbol, 0)) + pending.notional_of(symbol)
                if exposure + notional > max_symbol:
                    return _DENIED["max_symbol_exposure"]
            pending.reserve(symbol, notional)
        return _Decision(None, Reservation(self.ledger, symbol))


# --- timing loops -------------------------------------------------------------------------------
# The single-thread loops have the same shape (one ``for`` over a prepared list of symbols) so the
# loop overhead is the same in the floor and in the gates.


def floor_loop(lock: Any, book: dict[str, Any], symbols: Sequence[str], value: Any) -> None:
    """The floor: insert in one critical section, delete in a second, nothing else."""
    for symbol in symbols:
        with lock:
            book[symbol] = value
        with lock:
            del book[symbol]


def gate_loop(
    try_enter: Callable[..., Any],
    symbols: Sequence[str],
    notional: Any,
    positions: Mapping[str, Any],
) -> None:
    """One admitted ``try_enter`` and the release of its reservation, per symbol.

    A denied decision has no reservation, so a denial fails loudly (AttributeError) instead of
    being timed as if it were an admission.
    """
    for symbol in symbols:
        try_enter(symbol, notional, positions).reservation.release()


# --- contention workers ---------------------------------------------------------------------------
# Each worker waits at the barrier, then runs chunks of ``len(symbols)`` untimed operations
# followed by one operation timed with perf_counter_ns (its decision latency sampled), until the
# perf_counter_ns deadline in ``deadline[0]`` (set before the barrier opens) or until ``stop[0]``
# is set (another worker failed). Workers stop themselves at the deadline: a main thread waking
# from a sleep would have to win the GIL from 64 busy threads first, which with a long switch
# interval takes minutes. Returns the number of operations done and the latencies in ns.

_ns = time.perf_counter_ns


def floor_worker(
    lock: Any,
    book: dict[str, Any],
    symbols: Sequence[str],
    value: Any,
    *,
    barrier: threading.Barrier,
    stop: list[bool],
    deadline: list[int],
) -> tuple[int, list[int]]:
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
                book[symbol] = value
            with lock:
                del book[symbol]
        t0 = _ns()
        with lock:
            book[timed] = value
        t1 = _ns()
        with lock:
            del book[timed]
        sample(t1 - t0)
        count += chunk
    return count, latencies


def gate_worker(
    try_enter: Callable[..., Any],
    symbols: Sequence[str],
    notional: Any,
    positions: Mapping[str, Any] | None,
    *,
    barrier: threading.Barrier,
    stop: list[bool],
    deadline: list[int],
) -> tuple[int, list[int]]:
    """Each symbol is entered with its own client order id, as a bot does (the port ignores it);
    the ids repeat, which is fine: each reservation is released before its id comes round."""
    latencies: list[int] = []
    sample = latencies.append
    orders = [(symbol, f"{symbol}-order") for symbol in symbols]
    timed, timed_id = orders[0]
    count = 0
    chunk = len(symbols) + 1
    barrier.wait()
    end = deadline[0]
    while not stop[0] and _ns() < end:
        for symbol, order_id in orders:
            try_enter(symbol, notional, positions, order_id=order_id).reservation.release()
        t0 = _ns()
        decision = try_enter(timed, notional, positions, order_id=timed_id)
        t1 = _ns()
        decision.reservation.release()
        sample(t1 - t0)
        count += chunk
    return count, latencies
