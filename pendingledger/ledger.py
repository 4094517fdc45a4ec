"""The pending-entry ledger: reservations per order, under one ``threading.Lock``.

A reservation stands for an order that a gate admitted and whose fill has not reached the
position cache yet. While it is outstanding the gate counts it, so no other thread can be admitted
into the same room. It ends exactly once: released (exchange reject, or the fill is visible),
reduced to zero by partial fills, or expired after the ledger's TTL.

Design notes a maintainer must keep:

* **Nothing but dict work and int arithmetic runs while the lock is held on the hot paths.** A
  call of any kind inside the critical section lets CPython switch threads while the lock is held,
  and 64 contending threads then degrade into one context switch per operation (a lock convoy;
  see the project's performance notes). The clock is read, arguments are validated and objects
  are built before the lock is taken. The hot paths (``PortfolioGate.try_enter`` and
  ``Reservation.release``/``release_order``) therefore inline what the slow paths do through
  ``_insert_locked``/``_end_locked``; keep the copies in step.
* **Expiry is O(1) amortized.** TTL is fixed per ledger and reservation times never go backwards
  (they are clamped to the latest time seen), so deadlines are ordered like the sequence numbers
  reservations get. ``_queue`` maps sequence number to reservation and, being a dict, keeps them
  in the order they were made: the sweep takes them oldest first and stops at the first whose
  deadline is still ahead, so it touches only what expires plus one (and skips, at C speed, the
  slots of entries deleted since the dict last compacted itself). (Walking sequence numbers
  instead would also step over every reservation made and released since the oldest one: one
  long stall under the lock per TTL in a busy bot.) A rollback that restores an ended
  reservation re-sorts ``_queue`` once, the only time a seq is inserted out of order.
  ``_next_expiry`` is a lower bound on the deadline of every outstanding reservation *and of
  every one yet to be made* (their stamps are at least ``_last_stamp``). Only a sweep raises it:
  making or ending a reservation never has to touch it (no branch on the hot paths), and a bound
  gone stale costs one sweep. A comparison against it is the whole per-acquisition cost.
* **Amounts are exact integers over a common denominator ``_den``** (see ``_amounts``). The
  denominator only grows while anything is outstanding (an empty ledger starts again, unless an
  open ``lock()`` block could restore what it ended); a new one rescales every stored integer
  once (rare, under the lock).
* **``_version`` changes on every mutation.** ``PortfolioGate`` reads it, computes outside the
  lock, and commits only if it is unchanged (see ``gate.py`` for why that keeps the guarantee).
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final, cast

from . import _amounts
from .errors import LedgerError, LockTimeout, ReentrantLockError, StaleViewError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "LedgerStats",
    "PendingEntryLedger",
    "PendingMap",
    "Reservation",
    "ReservationState",
]

logger = logging.getLogger("pendingledger")

Clock = Callable[[], float]
Number = int | float | Decimal | Fraction

_INF: Final = math.inf
_MAX_DEN_BITS: Final = 4096  # cap on the common denominator (see _ensure_den_locked)
_get_ident: Final = threading.get_ident
_ledger_serials: Final = itertools.count(1)  # next() is atomic: safe from any thread


def _new_ledger_serial() -> int:
    """A number naming one ledger: unique in this process (the counter), and apart from every
    ledger of another process or an earlier run (64 random bits from the OS, drawn per ledger, so
    a child forked before it was made draws its own), so an id kept in a bot's records or sent
    elsewhere names no unrelated reservation (short of a 1 in 2**64 draw)."""
    return next(_ledger_serials) << 64 | secrets.randbits(64)


# Reservation states as small ints: compared inside the lock, where an Enum would cost a call.
_ACTIVE: Final = 0
_RELEASED: Final = 1
_FILLED: Final = 2
_EXPIRED: Final = 3
_ROLLED_BACK: Final = 4


class ReservationState(str, enum.Enum):
    """How a reservation stands; every reservation leaves ``ACTIVE`` exactly once."""

    ACTIVE = "active"
    RELEASED = "released"
    """Released by ``release()``, ``release_order()`` or ``release(symbol)``."""
    FILLED = "filled"
    """Reduced to zero by partial fills."""
    EXPIRED = "expired"
    """Its TTL ran out before anything released it."""
    ROLLED_BACK = "rolled_back"
    """Made inside a ``lock()`` block that raised, so it never took effect."""


_STATES: Final = (
    ReservationState.ACTIVE,
    ReservationState.RELEASED,
    ReservationState.FILLED,
    ReservationState.EXPIRED,
    ReservationState.ROLLED_BACK,
)


class _GeneratedOrderId:
    """The order id of a reservation made without one: equal only to the ids of that same
    reservation, never to a caller's id.

    Made when ``Reservation.order_id`` is read, not when the reservation is: a reservation made
    without an id then costs neither an id object nor an entry in the ledger's order index, which
    is most of a decision's dict work besides the reservation itself.

    It names the reservation by its ledger's serial number (``_new_ledger_serial``) and its
    sequence number, and holds no reference: keeping an id keeps nothing else alive, and it
    pickles and copies as two ints. Unpickled in another process, it equals no id made there (see
    ``_new_ledger_serial`` for the odds).
    """

    __slots__ = ("_ledger_serial", "_seq")

    def __init__(self, ledger_serial: int, seq: int) -> None:
        self._ledger_serial = ledger_serial
        self._seq = seq

    def __eq__(self, other: object) -> bool:
        if type(other) is not _GeneratedOrderId:
            return NotImplemented
        return other._seq == self._seq and other._ledger_serial == self._ledger_serial

    def __hash__(self) -> int:
        return hash((self._ledger_serial, self._seq))

    def __getstate__(self) -> tuple[int, int]:
        return (self._ledger_serial, self._seq)

    def __setstate__(self, state: tuple[int, int]) -> None:
        self._ledger_serial, self._seq = state

    def __repr__(self) -> str:
        return f"<generated order id {self._seq} of ledger {self._ledger_serial:#x}>"


def _check_order_id(order_id: object) -> None:
    """A caller's order id: hashable, not None, and not one the ledger generated."""
    _amounts.check_order_id(order_id)
    if type(order_id) is _GeneratedOrderId:
        raise ValueError(
            f"order_id {order_id!r} was generated by a ledger; pass an id of your own, or None"
        )


class Reservation:
    """One admitted order's claim on the portfolio limits, held until it ends.

    Read-only for callers. ``notional`` is what is still reserved (after ``reduce``), and once the
    reservation has ended it keeps the amount it held when it ended. ``release()`` and ``reduce()``
    may be called from any thread, any number of times; on an ended reservation they do nothing.
    From inside the same ledger's ``lock()`` block on the same thread they act through that block
    (and are undone with it if it raises).
    """

    __slots__ = (
        "_den_end",
        "_initial",
        "_ledger",
        "_n",
        "_order_id",
        "_reserved_at",
        "_seq",
        "_state",
        "_sym_next",
        "_sym_prev",
        "_symbol",
    )

    _ledger: PendingEntryLedger
    _symbol: Hashable
    _order_id: Hashable  # None when the ledger generates it (see _GeneratedOrderId)
    _initial: Number
    _n: int  # remaining amount, as a numerator over the ledger's _den
    _reserved_at: float
    _den_end: int  # the ledger's _den when the reservation ended (rescaling skips ended ones)
    # Outstanding reservations of one symbol form a doubly linked list from _syms[symbol][2].
    _sym_prev: Reservation | None
    _sym_next: Reservation | None
    _seq: int
    _state: int

    def __init__(self) -> None:
        raise TypeError(
            "reservations are made by PendingMap.reserve() or PortfolioGate.try_enter()"
        )

    @property
    def symbol(self) -> Hashable:
        return self._symbol

    @property
    def order_id(self) -> Hashable:
        """The caller's order id, or one generated for a reservation made without it (equal to
        every other reading of this reservation's ``order_id``, and to nothing else)."""
        order_id = self._order_id
        if order_id is None:
            return _GeneratedOrderId(self._ledger._serial, self._seq)
        return order_id

    @property
    def notional(self) -> Number:
        """What is still reserved, in the type it was given (see the class docstring)."""
        ledger = self._ledger
        if ledger._owner == _get_ident():
            n, den = self._n, ledger._den if self._state == _ACTIVE else self._den_end
        else:
            with ledger._lock:
                n, den = self._n, ledger._den if self._state == _ACTIVE else self._den_end
        p0, q0 = self._initial.as_integer_ratio()
        if n * q0 == p0 * den:
            return self._initial
        return _amounts.to_number(n, den, _amounts.kind_of(self._initial))

    @property
    def initial_notional(self) -> Number:
        """The notional the reservation was made with."""
        return self._initial

    @property
    def reserved_at(self) -> float:
        """The ledger clock's reading when the reservation was made."""
        return self._reserved_at

    @property
    def expires_at(self) -> float:
        """``reserved_at + ttl``: from this clock reading on, the reservation is expired."""
        return self._reserved_at + self._ledger._ttl

    @property
    def active(self) -> bool:
        """Still counted against the limits (see ``state``)."""
        return self.state is ReservationState.ACTIVE

    @property
    def state(self) -> ReservationState:
        """How the reservation stands now.

        A reservation past its ``expires_at`` is expired here and now (the ledger sweeps it,
        firing ``on_expire``), exactly as the next decision would find it; it never reads as
        active past its TTL. Inside this thread's own ``lock()`` block no sweep can run, so the
        state is read as the block sees it.
        """
        if self._state == _ACTIVE:
            ledger = self._ledger
            if ledger._now() >= self._reserved_at + ledger._ttl and ledger._owner != _get_ident():
                with ledger._guard():  # sweeps what is due; on_expire runs after release
                    pass
        return _STATES[self._state]

    def release(self) -> bool:
        """End the reservation now (e.g. the exchange rejected the order). True if it was active."""
        ledger = self._ledger
        now = ledger._clock()
        if type(now) is not float or not -_INF < now < _INF:  # comparisons only: no call
            now = ledger._check_clock(now)
        owner = ledger._owner
        if owner is not None and owner == _get_ident():
            return ledger._own_view_or_raise()._end(self, _RELEASED)
        expired = None
        # Ordered so that a release falls through every branch (see PortfolioGate.try_enter:
        # on CPython 3.10 a taken branch here would be a thread switch with the lock held).
        with ledger._locked:
            if now < ledger._next_expiry:
                pass
            else:
                expired = ledger._sweep_locked(now)
            if not self._state:
                # Inlined PendingEntryLedger._end_locked(self, _RELEASED): no call under the lock.
                orders = ledger._orders
                syms = ledger._syms
                symbol, n, order_id = self._symbol, self._n, self._order_id
                if order_id is not None:  # a caller's id (the usual case)
                    del orders[order_id]
                queue = ledger._queue
                del queue[self._seq]
                entry = syms[symbol]
                if entry[0] == 1:
                    del syms[symbol]
                    ledger._nsyms -= 1
                    ledger._open_reserved -= symbol in ledger._book  # a bool: no branch
                else:
                    entry[0] -= 1
                    entry[1] -= n
                    prev, after = self._sym_prev, self._sym_next
                    if prev is None:
                        entry[2] = after
                    else:
                        prev._sym_next = after
                    if after is not None:
                        after._sym_prev = prev
                ledger._gross -= n
                self._state = _RELEASED
                self._den_end = ledger._den
                ledger._version += 1
                ledger._n_released += 1
                done = True
            else:
                done = False
        if expired:
            ledger._fire_expired(expired)
        return done

    def reduce(self, amount: Number) -> bool:
        """Shrink the remaining notional by ``amount`` (a partial fill); at zero it is released.

        An ``amount`` larger than what remains releases the reservation. Returns True if the
        reservation was active. ``amount`` must be a finite number > 0.
        """
        num, den, _ = _amounts.positive_ratio("amount", amount)
        return self._ledger._reduce_reservation(self, num, den)

    def _same_symbol(self) -> list[Reservation]:
        """This reservation and those after it in its symbol's list (lock held)."""
        members: list[Reservation] = []
        res: Reservation | None = self
        while res is not None:
            members.append(res)
            res = res._sym_next
        return members

    def __repr__(self) -> str:
        return (
            f"Reservation(symbol={self._symbol!r}, order_id={self.order_id!r}, "
            f"initial_notional={self._initial!r}, state={_STATES[self._state].value})"
        )


def _new_reservation(
    ledger: PendingEntryLedger,
    symbol: Hashable,
    order_id: Hashable,
    initial: Number,
    n: int,
) -> Reservation:
    """Build a reservation outside the lock; the caller fills in seq and times under it."""
    res = object.__new__(Reservation)
    res._ledger = ledger
    res._symbol = symbol
    res._order_id = order_id
    res._initial = initial
    res._n = n
    res._state = _ACTIVE
    return res


def _lock_context(lock: threading.Lock) -> AbstractContextManager[Any]:
    """A context manager that takes and releases ``lock`` exactly as ``with lock:`` does, cheaper.

    ``with lock:`` looks ``__enter__`` and ``__exit__`` up on the lock's type and binds each to the
    lock: two method objects made and freed per block, about a third of a bare lock cycle. Here
    the lock's own bound methods are stored on a class made for this one lock; builtin methods
    are not descriptors, so ``with`` takes them as they are and allocates nothing (measured: 89 ns
    against 132 ns a block on CPython 3.11). A call of ``lock.acquire()`` would be cheaper still
    but is no substitute: CPython may switch threads right after a call returns, which would
    happen with the lock held, and ``with`` does not (see the module notes on lock convoys).
    """
    context = type(
        "_LockContext",
        (),
        {"__slots__": (), "__enter__": lock.acquire, "__exit__": lock.__exit__},
    )
    return cast("AbstractContextManager[Any]", context())


@dataclass(frozen=True)
class LedgerStats:
    """A consistent snapshot of a ledger, taken under its lock.

    ``reserved == released + expired + outstanding`` always holds (``released`` counts partial
    fills that reached zero, too). Reservations made in a ``lock()`` block that raised count
    nowhere.
    """

    outstanding: int
    gross_notional: Number
    reserved: int
    released: int
    expired: int


class PendingEntryLedger:
    """Outstanding reservations, guarded by one ``threading.Lock``.

    ``ttl`` (seconds, finite, > 0) is how long a reservation lives if nothing releases it: the
    safety net when no fill source releases it. Until it expires the gate counts it; erring that
    way over-blocks, which is the safe failure for a risk gate. ``clock`` is a zero-argument
    callable returning seconds (``time.monotonic`` by default; tests pass a
    ``pendingledger.testing.ManualClock``). ``on_expire(reservation)`` is called for each
    reservation that expires, in the thread that noticed, after the lock is released; an exception
    it raises is logged and swallowed so it cannot break an unrelated caller.

    Expired reservations are dropped whenever the lock is acquired, so no background thread runs.
    """

    __slots__ = (
        "__weakref__",
        "_book",
        "_book_gross",
        "_clock",
        "_den",
        "_gross",
        "_kinds",
        "_last_stamp",
        "_lock",
        "_locked",
        "_n_expired",
        "_n_released",
        "_nbook",
        "_next_expiry",
        "_nsyms",
        "_on_expire",
        "_open_reserved",
        "_orders",
        "_owner",
        "_queue",
        "_seq",
        "_serial",
        "_syms",
        "_ttl",
        "_version",
        "_view",
    )

    def __init__(
        self,
        ttl: float,
        *,
        clock: Clock = time.monotonic,
        on_expire: Callable[[Reservation], object] | None = None,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise TypeError(f"ttl must be a number of seconds, got {ttl!r}")
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be finite and > 0 seconds, got {ttl!r}")
        if not callable(clock):
            raise TypeError(
                f"clock must be a zero-argument callable returning seconds, got {clock!r}"
            )
        if on_expire is not None and not callable(on_expire):
            raise TypeError(f"on_expire must be callable or None, got {on_expire!r}")
        self._ttl = float(ttl)
        self._clock = clock
        self._on_expire = on_expire
        self._lock = threading.Lock()
        # ``with`` it on the hot paths (see _lock_context). It holds this lock's own methods:
        # replace _lock and _locked together, or the hot and slow paths take different locks.
        self._locked = _lock_context(self._lock)
        self._serial = _new_ledger_serial()  # names this ledger in its generated order ids
        self._owner: int | None = None  # thread holding the lock through a slow path or lock()
        self._view: PendingMap | None = None  # the open lock() block's view, if any
        # Outstanding reservations: every one by seq in _queue, those with a caller's order id
        # also by that id in _orders (generated ids are made on demand, see _GeneratedOrderId).
        self._orders: dict[Hashable, Reservation] = {}
        self._queue: dict[int, Reservation] = {}
        # symbol -> [number of reservations, reserved numerator, newest reservation on it]
        self._syms: dict[Hashable, list[Any]] = {}
        self._nsyms = 0
        # The owned position book (used by gates called with positions=None):
        # symbol -> [|exposure| numerator over _den, exposure as given]
        self._book: dict[Hashable, list[Any]] = {}
        self._nbook = 0
        self._book_gross = 0
        self._open_reserved = 0  # symbols both open in _book and reserved in _syms
        self._gross = 0
        self._den = 1
        self._kinds = 0  # every kind of amount ever reserved (sticky): picks the type of sums
        self._seq = 0
        # Below every deadline to come (module notes); the first acquisition sweeps and sets it.
        self._next_expiry = -_INF
        self._last_stamp = -_INF  # reservation times never go backwards (see the module notes)
        self._version = 0
        self._n_released = 0
        self._n_expired = 0

    # ------------------------------------------------------------------ public API

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def clock(self) -> Clock:
        return self._clock

    def lock(self, timeout: float | None = None) -> _LockBlock:
        """Hold the ledger lock for a ``with`` block and get the ``PendingMap`` view.

        Raises ``LockTimeout`` if the lock is not acquired within ``timeout`` seconds (``None``
        waits for ever), and ``ReentrantLockError`` at once if this thread already holds it. The
        block is atomic: if it raises, every change it made through the view is undone. The view
        is valid only inside the block. Keep the block short and free of I/O: every other thread
        that wants the ledger waits for it.
        """
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
            if not 0 <= timeout <= threading.TIMEOUT_MAX:
                raise ValueError(
                    f"timeout must be >= 0 and at most threading.TIMEOUT_MAX seconds, "
                    f"got {timeout!r}"
                )
        return _LockBlock(self, timeout)

    def release(self, symbol: Hashable) -> bool:
        """Drop every reservation on ``symbol`` (its fill is now visible in the position cache).

        Update the position cache first and call this after, never the other way round: in the
        gap the gate would see neither the reservation nor the position. Idempotent; returns True
        if anything was released.
        """
        _amounts.check_symbol(symbol)
        view = self._own_view()
        if view is not None:
            return view.release(symbol)
        with self._guard():
            if symbol not in self._syms:
                return False
            for res in self._syms[symbol][2]._same_symbol():
                self._end_locked(res, _RELEASED)
                self._n_released += 1
            return True

    def release_order(self, order_id: Hashable) -> bool:
        """Drop the reservation of ``order_id`` (exchange reject, or its fill is visible).

        Idempotent; returns True if it was outstanding.
        """
        _amounts.check_order_id(order_id)
        view = self._own_view()
        if view is not None:
            return view.release_order(order_id)
        res = self._outstanding(order_id)
        if res is None:
            # Not outstanding (or racing its own creation, which is indistinguishable from
            # arriving first). Still acquire, so expiry is noticed as on every acquisition.
            with self._guard():
                res = self._outstanding(order_id)
                if res is None:
                    return False
        return res.release()

    def stats(self) -> LedgerStats:
        """A consistent snapshot (taken under the lock, after dropping expired reservations).

        Inside this thread's ``lock()`` block it reads the block's current state.
        """
        with self._read_guard():
            gross, den, kinds = self._gross, self._den, self._kinds
            count = len(self._queue)
            released, expired = self._n_released, self._n_expired
            reserved = count + released + expired
        return LedgerStats(
            outstanding=count,
            gross_notional=_amounts.to_number(gross, den, kinds),
            reserved=reserved,
            released=released,
            expired=expired,
        )

    def __repr__(self) -> str:
        return f"PendingEntryLedger(ttl={self._ttl!r}, outstanding={len(self._queue)})"

    # ------------------------------------------------------------------ lock helpers

    def _guard(self) -> _Guard:
        """Acquire for a slow path: re-entrancy check, expiry sweep, on_expire after release."""
        return _Guard(self)

    def _read_guard(self) -> AbstractContextManager[None]:
        """``_guard()``, or nothing inside this thread's own ``lock()`` block (read in place)."""
        return nullcontext() if self._own_view() is not None else self._guard()

    def _own_view(self) -> PendingMap | None:
        """The open view if this thread is inside this ledger's ``lock()`` block, else None.

        Raises ``ReentrantLockError`` if this thread holds the lock some other way (for example
        from a ``positions`` callable that the gate calls under the lock).
        """
        owner = self._owner
        if owner is None or owner != _get_ident():
            return None
        if self._view is None:
            raise ReentrantLockError("this thread already holds the ledger lock")
        return self._view

    def _now(self) -> float:
        """The clock's reading, checked: a NaN or infinite time would corrupt expiry."""
        now = self._clock()
        if type(now) is not float or not -_INF < now < _INF:
            return self._check_clock(now)
        return now

    def _check_clock(self, now: object) -> float:
        """Accept any finite real reading as float seconds; anything else raises LedgerError."""
        if isinstance(now, (int, float)) and not isinstance(now, bool) and math.isfinite(now):
            return float(now)
        raise LedgerError(f"the ledger's clock returned {now!r}; it must return finite seconds")

    def _fire_expired(self, expired: list[Reservation]) -> None:
        callback = self._on_expire
        if callback is None:
            return
        for res in expired:
            try:
                callback(res)
            except Exception:
                logger.exception("on_expire raised for %r; ignored", res)

    def _outstanding(self, order_id: object) -> Reservation | None:
        """The reservation outstanding under ``order_id`` (a caller's or a generated one), or None.

        Exact with the lock held; without it, a hint that the caller confirms under the lock.
        """
        if type(order_id) is _GeneratedOrderId:
            if order_id._ledger_serial != self._serial:
                return None
            # _queue holds only outstanding reservations; the seq names this one for good.
            res = self._queue.get(order_id._seq)
            return res if res is not None and res._order_id is None else None
        return self._orders.get(order_id)

    # ------------------------------------------------------------------ locked primitives
    # Called with the lock held. They make calls, so the hot paths inline them instead.

    def _sweep_locked(self, now: float) -> list[Reservation]:
        """Expire every reservation whose deadline is <= now; return them (fire after release)."""
        expired: list[Reservation] = []
        ttl = self._ttl
        for res in self._queue.values():  # oldest first (module notes)
            deadline = res._reserved_at + ttl
            if deadline > now:
                self._next_expiry = deadline
                break
            expired.append(res)
        else:
            # Nothing left: every reservation made from now on is stamped at least `now` (stamps
            # are clamped to _last_stamp), so its deadline is at least now + ttl.
            self._last_stamp = max(self._last_stamp, now)
            self._next_expiry = self._last_stamp + ttl
        for res in expired:
            self._end_locked(res, _EXPIRED)
        self._n_expired += len(expired)
        return expired

    def _reorder_queue_locked(self) -> None:
        """Put ``_queue`` back in seq order after reservations were restored (rare: O(n log n))."""
        self._queue = dict(sorted(self._queue.items()))

    def _stamp_locked(self, now: float) -> float:
        """The time to stamp a new reservation with: ``now``, but never before the last stamp."""
        self._last_stamp = max(self._last_stamp, now)
        return self._last_stamp

    def _insert_locked(self, res: Reservation) -> None:
        """Insert an active reservation whose seq and times are set (new, or restored).

        A restored one (an older seq) lands at the end of ``_queue``: the caller re-sorts it with
        ``_reorder_queue_locked`` before the lock is released.
        """
        symbol, n, seq = res._symbol, res._n, res._seq
        if res._order_id is not None:
            self._orders[res._order_id] = res
        self._queue[seq] = res
        entry = self._syms.get(symbol)
        if entry is None:
            res._sym_prev = res._sym_next = None
            self._syms[symbol] = [1, n, res]
            self._nsyms += 1
            if symbol in self._book:
                self._open_reserved += 1
        else:
            entry[0] += 1
            entry[1] += n
            first = entry[2]
            res._sym_prev = None
            res._sym_next = first
            first._sym_prev = res
            entry[2] = res
        self._gross += n
        self._kinds |= _amounts.kind_of(res._initial)
        self._next_expiry = min(self._next_expiry, res._reserved_at + self._ttl)
        res._state = _ACTIVE
        self._version += 1

    def _end_locked(self, res: Reservation, state: int) -> None:
        """Remove an active reservation and mark how it ended (counters are the caller's)."""
        symbol, n = res._symbol, res._n
        if res._order_id is not None:
            del self._orders[res._order_id]
        del self._queue[res._seq]
        entry = self._syms[symbol]
        if entry[0] == 1:
            del self._syms[symbol]
            self._nsyms -= 1
            if symbol in self._book:
                self._open_reserved -= 1
        else:
            entry[0] -= 1
            entry[1] -= n
            prev, after = res._sym_prev, res._sym_next
            if prev is None:
                entry[2] = after
            else:
                prev._sym_next = after
            if after is not None:
                after._sym_prev = prev
        self._gross -= n
        res._state = state
        res._den_end = self._den
        self._version += 1

    def _ensure_den_locked(self, q: int) -> None:
        """Make ``_den`` a multiple of ``q``, rescaling every stored numerator (rare: O(n) once).

        An empty ledger starts again from ``q``, so one odd amount cannot slow it for ever; a
        common denominator past ``_MAX_DEN_BITS`` is refused (``ValueError``, nothing changed).
        """
        den = self._den
        if den % q == 0:
            return
        view = self._view
        if not self._queue and not self._book and (view is None or not view._restorable):
            # Start again from q, unless an open lock() block has ended reservations: its
            # rollback would rescale them by new den // old den, which needs the old den to
            # divide the new one.
            den = 1
        new = math.lcm(den, q)
        if new.bit_length() > _MAX_DEN_BITS:
            raise ValueError(
                f"amounts with denominator {q} would need a common denominator of "
                f"{new.bit_length()} bits in this ledger (at most {_MAX_DEN_BITS}); "
                "round the amount to fewer digits"
            )
        factor = new // den
        for res in self._queue.values():
            res._n *= factor
        for entry in self._syms.values():
            entry[1] *= factor
        for position in self._book.values():
            position[0] *= factor
        self._gross *= factor
        self._book_gross *= factor
        self._den = new
        self._version += 1

    def _set_position_locked(self, symbol: Hashable, num: int, q: int, exposure: Number) -> None:
        """Open or update ``symbol`` in the owned book with ``|num/q|`` (``exposure`` as given)."""
        n = self._scaled_locked(abs(num), q)
        position = self._book.get(symbol)
        if position is None:
            self._book[symbol] = [n, exposure]
            self._nbook += 1
            if symbol in self._syms:
                self._open_reserved += 1
        else:
            self._book_gross -= position[0]
            position[0] = n
            position[1] = exposure
        self._book_gross += n
        self._version += 1

    def _close_position_locked(self, symbol: Hashable) -> bool:
        position = self._book.pop(symbol, None)
        if position is None:
            return False
        self._nbook -= 1
        self._book_gross -= position[0]
        if symbol in self._syms:
            self._open_reserved -= 1
        self._version += 1
        return True

    def _scaled_locked(self, num: int, q: int) -> int:
        self._ensure_den_locked(q)
        return num * (self._den // q)

    # ------------------------------------------------------------------ hot paths

    def _own_view_or_raise(self) -> PendingMap:
        view = self._own_view()
        if view is None:  # pragma: no cover - _own_view only returns None for other threads
            raise ReentrantLockError("this thread already holds the ledger lock")
        return view

    def _reduce_reservation(self, res: Reservation, num: int, q: int) -> bool:
        view = self._own_view()
        if view is not None:
            return view._reduce(res, num, q)
        with self._guard():
            if res._state:
                return False
            self._reduce_locked(res, self._scaled_locked(num, q))
            return True

    def _reduce_locked(self, res: Reservation, amount: int) -> int:
        """Reduce an active reservation by a scaled amount; return the scaled amount removed."""
        if amount >= res._n:
            removed = res._n
            self._end_locked(res, _FILLED)
            self._n_released += 1
            return removed
        res._n -= amount
        self._syms[res._symbol][1] -= amount
        self._gross -= amount
        self._version += 1
        return amount


class _Guard:
    """Slow-path acquisition: refuses re-entry, sweeps expiry, fires ``on_expire`` after release."""

    __slots__ = ("_expired", "_ledger")

    def __init__(self, ledger: PendingEntryLedger) -> None:
        self._ledger = ledger
        self._expired: list[Reservation] = []

    def __enter__(self) -> None:
        ledger = self._ledger
        me = _get_ident()
        if ledger._owner == me:
            raise ReentrantLockError("this thread already holds the ledger lock")
        now = ledger._now()
        ledger._lock.acquire()
        ledger._owner = me
        if now >= ledger._next_expiry:
            self._expired = ledger._sweep_locked(now)

    def __exit__(self, *exc: object) -> None:
        ledger = self._ledger
        ledger._owner = None
        ledger._lock.release()
        if self._expired:
            ledger._fire_expired(self._expired)


class _LockBlock:
    """The context manager ``PendingEntryLedger.lock()`` returns (single use)."""

    __slots__ = ("_expired", "_ledger", "_timeout", "_view")

    def __init__(self, ledger: PendingEntryLedger, timeout: float | None) -> None:
        self._ledger = ledger
        self._timeout = timeout
        self._view: PendingMap | None = None
        self._expired: list[Reservation] = []

    def __enter__(self) -> PendingMap:
        if self._view is not None:
            raise LedgerError("a lock() context manager can be entered only once")
        ledger = self._ledger
        me = _get_ident()
        if ledger._owner == me:
            raise ReentrantLockError("this thread already holds the ledger lock")
        timeout = self._timeout
        if not ledger._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise LockTimeout(f"ledger lock not acquired within {timeout} s")
        try:
            ledger._owner = me
            # Read after acquiring: the block's time is the time it holds the lock.
            now = ledger._now()
            if now >= ledger._next_expiry:
                self._expired = ledger._sweep_locked(now)
            view = PendingMap(ledger, now)
        except BaseException:
            ledger._owner = None
            ledger._lock.release()
            raise
        ledger._view = view
        self._view = view
        return view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ledger = self._ledger
        view = self._view
        assert view is not None
        try:
            if exc_type is not None:
                view._rollback()
        finally:
            view._open = False
            ledger._view = None
            ledger._owner = None
            ledger._lock.release()
            if self._expired:
                ledger._fire_expired(self._expired)


class PendingMap:
    """The ledger as seen inside ``with ledger.lock() as pending:``; valid only in that block.

    Everything here runs with the lock held, so the block sees one consistent state and what it
    reserves is visible to the next thread that takes the lock. Changes are journaled so a block
    that raises leaves the ledger as it found it.
    """

    __slots__ = ("_journal", "_kinds_before", "_ledger", "_now", "_open", "_restorable")

    def __init__(self, ledger: PendingEntryLedger, now: float) -> None:
        self._ledger = ledger
        self._now = now
        self._open = True
        # ("reserve", res) | ("end", res) | ("reduce", res, removed, den then, state after)
        self._journal: list[tuple[Any, ...]] = []
        self._kinds_before = ledger._kinds  # the kinds of amounts seen, restored on rollback
        self._restorable = False  # whether a rollback would put back an ended or reduced one

    def _live(self) -> PendingEntryLedger:
        if not self._open:
            raise StaleViewError("this PendingMap's lock() block has ended; take the lock again")
        return self._ledger

    def contains(self, symbol: Hashable) -> bool:
        """Whether any reservation is outstanding for ``symbol``."""
        return symbol in self._live()._syms

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._live()._syms

    def __len__(self) -> int:
        """Number of outstanding reservations (not symbols)."""
        return len(self._live()._queue)

    def __iter__(self) -> Iterator[Hashable]:
        """The symbols with outstanding reservations (a snapshot)."""
        return iter(list(self._live()._syms))

    def gross_notional(self) -> Number:
        """Sum of outstanding reserved notional, exact (see ``_amounts`` for its type)."""
        ledger = self._live()
        return _amounts.to_number(ledger._gross, ledger._den, ledger._kinds)

    def symbol_notional(self, symbol: Hashable) -> Number:
        """Reserved notional outstanding on ``symbol`` (0 if none)."""
        ledger = self._live()
        entry = ledger._syms.get(symbol)
        if entry is None:
            return 0
        return _amounts.to_number(entry[1], ledger._den, ledger._kinds)

    def new_slots(self, is_open: Callable[[Any], object]) -> int:
        """How many reserved symbols are not open, i.e. will take a new concurrency slot."""
        ledger = self._live()
        return sum(1 for symbol in ledger._syms if not is_open(symbol))

    def reserve(
        self, symbol: Hashable, notional: Number, *, order_id: Hashable | None = None
    ) -> Reservation:
        """Record a reservation of ``notional`` on ``symbol`` for one order.

        ``order_id`` is any hashable (typically the client order id); one is generated if not
        given. An ``order_id`` already outstanding raises ``ValueError``. Reservations on one
        symbol add up but each keeps its own TTL and can be released alone.
        """
        ledger = self._live()
        _amounts.check_symbol(symbol)
        num, q, _ = _amounts.positive_ratio("notional", notional)
        if order_id is not None:
            _check_order_id(order_id)
        if order_id is not None and order_id in ledger._orders:
            raise ValueError(f"order_id {order_id!r} already has an outstanding reservation")
        n = ledger._scaled_locked(num, q)
        res = _new_reservation(ledger, symbol, order_id, notional, n)
        res._seq = ledger._seq
        ledger._seq += 1
        res._reserved_at = ledger._stamp_locked(self._now)
        ledger._insert_locked(res)
        self._journal.append(("reserve", res))
        return res

    def release(self, symbol: Hashable) -> bool:
        """Drop every reservation on ``symbol``; True if anything was released."""
        ledger = self._live()
        _amounts.check_symbol(symbol)
        entry = ledger._syms.get(symbol)
        if entry is None:
            return False
        for res in entry[2]._same_symbol():
            self._end(res, _RELEASED)
        return True

    def release_order(self, order_id: Hashable) -> bool:
        """Drop the reservation of ``order_id``; True if it was outstanding."""
        ledger = self._live()
        _amounts.check_order_id(order_id)
        res = ledger._outstanding(order_id)
        return res is not None and self._end(res, _RELEASED)

    def _end(self, res: Reservation, state: int) -> bool:
        ledger = self._live()
        if res._state:
            return False
        ledger._end_locked(res, state)
        ledger._n_released += 1
        self._journal.append(("end", res))
        self._restorable = True
        return True

    def _reduce(self, res: Reservation, num: int, q: int) -> bool:
        ledger = self._live()
        if res._state:
            return False
        removed = ledger._reduce_locked(res, ledger._scaled_locked(num, q))
        self._journal.append(("reduce", res, removed, ledger._den, res._state))
        self._restorable = True
        return True

    def _rollback(self) -> None:
        """Undo the journal, newest first. Runs under the lock, before it is released."""
        ledger = self._ledger
        restored = False
        for record in reversed(self._journal):
            res = record[1]
            if record[0] == "reserve":
                # Newest first: any later end of this reservation was undone already.
                ledger._end_locked(res, _ROLLED_BACK)
            elif record[0] == "end":
                res._n *= ledger._den // res._den_end
                ledger._insert_locked(res)
                ledger._n_released -= 1
                restored = True
            else:
                _, _, removed, den_then, state_after = record
                amount = removed * (ledger._den // den_then)
                if state_after == _FILLED:
                    res._n = amount  # the whole remainder, rescaled to the current _den
                    ledger._insert_locked(res)
                    ledger._n_released -= 1
                    restored = True
                else:
                    res._n += amount
                    ledger._syms[res._symbol][1] += amount
                    ledger._gross += amount
                    ledger._version += 1
        self._journal.clear()
        ledger._kinds = self._kinds_before
        if restored:
            ledger._reorder_queue_locked()
