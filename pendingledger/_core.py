"""The ledger's state and the one lock that guards it.

This is the only module that reads or writes that state. ``LedgerCore._lock`` (a plain
``threading.Lock``) must be held whenever any of the following is read in a way that must be
consistent, and whenever it is changed:

* a ``LedgerCore``'s reservations (``_index``, keyed by the caller's order id, or by the sequence
  number when the ledger names the order), ``_symbols`` (each reserved symbol's total), totals,
  counters, owned position book
  (``_book``), the thread in a ``lock()`` block (``_owner``, ``_block``) and ``_epoch``;
* a ``GateCore``'s halt flag and decision counters;
* a ``Reservation``'s remaining ``_units``, ``_state`` and ``_reserved_at``.

``LedgerCore._turn`` guards no state: it orders the threads waiting for ``_lock`` to be free
(``wait_free``). It is taken only there, always before ``_lock`` and never while holding it.

Methods named ``*_locked`` are only called with the lock held; they are the only code that runs
under it, and they call nothing but each other, ``rules.first_failing_rule`` and builtins. No
caller code runs under the lock: the clock is read before it is taken, ``on_expire`` is called
after it is released, positions are read into a ``Snapshot`` before it, and symbols and order ids
are exact ``str`` (hashed and compared in C). ``lock()`` blocks are the one exception, by design:
the caller's block runs with the lock held, and is journaled so that it is undone if it raises.

Compiled with mypyc, no Python bytecode runs while the lock is held, so CPython can neither
switch threads nor run a signal handler there: a ``KeyboardInterrupt`` cannot land mid-update,
and contending threads do not queue behind a descheduled holder. (One exception no code here can
rule out: on CPython 3.11 a garbage collection may start at an allocation under the lock and
run some object's ``__del__`` or weakref callback; one that calls into this ledger deadlocks.)
Interpreted, every acquisition (of either lock) still releases it whatever is raised
(``_acquire_into``), except at the first instruction of ``LockBlock.__exit__``, where no Python
code can help.

The two operations every order makes, a decision (``GateCore.try_decide``) and the end of its
reservation (``LedgerCore.end``), take the lock through its methods bound once (``_acquire``,
``_release``) when compiled: a plain acquire before the ``try``, which no interrupt can cut there,
and no method lookup: 1,045 fewer instructions (9%) for a decision and its release on the own
book (callgrind, CPython 3.11). Interpreted they take the safe forms above.

Expiry: the TTL is fixed per ledger and stamps never go backwards (clamped to ``_last_stamp``),
so deadlines are in sequence order, which ``_index`` keeps (a dict keeps insertion order). A sweep
takes reservations oldest first and stops at the first not yet due, or after ``SWEEP_LIMIT`` of
them (the rest count until a later acquisition sweeps them: over-blocking, the safe side).
``_next_expiry`` is a lower bound on every deadline to come; only a sweep moves it. Decisions,
``lock()`` blocks and writes to the owned book sweep; ending a reservation does not need to.

Every outstanding reservation holds at least one unit (a reduction to nothing ends it), so a
symbol is in ``_symbols`` exactly while it has reservations, and its total is never 0 there.

``_epoch`` counts every change that gives room back (a reservation ends or shrinks). A decision on
a caller's positions reads it before reading them and commits only if it is unchanged: the fill
router puts a fill in its cache *before* it releases the reservation, so a position missing from
the snapshot means its release came after the epoch was read, and the decision reads again.
What the epoch cannot see is a position that closed after the read: the snapshot then counts too
much, the safe side for every sum of an order that adds (see Sides below), but the symbol is no
longer open, and another entry may have
taken its slot meanwhile. So a symbol open only in the snapshot (not reserved) is decided as one
that needs a slot beside the others: adding to it is admitted while the open symbols are within
the limit, and denied past it (where the owned book, read under the lock, would admit).

Sides: a symbol's worst case needs its position and its pending buys, sells and orders of unknown
side (``rules.worst_case``). ``_symbols`` keeps each symbol's reserved total as before, and
``_sided`` the buys and sells of only the symbols that have any, each with its ``excess``: how
much less its worst case is than ``|position| + reserved``. So gross (the sum of worst cases) is
``_book_gross + _reserved - _excess``, kept up to date by every change to a sided symbol
(``_resum_locked``), and a side-blind book pays nothing for sides. A decision on a caller's
positions takes the sided symbols' worst cases with the caller's positions, which it turns into
units before the lock for the symbols sided when it began (``sided_symbols``); a symbol sided
since is open in the read without its units, and the decision reads again. Counting too much is
the safe side only for an order that adds: one judged to reduce a position (a sell against a
long) raises nothing on a figure counted too high, and may raise the true one. So with sides a
caller's cache must hand a fill over in one step under the lock its reads take (README), which
leaves no fill counted twice, and change only by fills; the owned book has no such caveat. On
that footing the epoch makes the read exact, and a sided order on a symbol open in the read
needs no slot of its own (it is vouched for as on the owned book).
"""

from __future__ import annotations

import enum
import importlib.machinery
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from . import _units, rules
from .errors import LedgerError, LockTimeout, ReentrantLockError, StaleViewError
from .rules import UnitLimits
from .trading import SIDES, Side, side_code

if TYPE_CHECKING:
    from types import TracebackType

__all__: list[str] = []

logger = logging.getLogger("pendingledger")

SWEEP_LIMIT: Final = 1000
"""Reservations one acquisition expires at most (the Redis script sweeps as many)."""

# Reservation states (the ReservationState members, in this order).
ACTIVE: Final = 0
RELEASED: Final = 1
FILLED: Final = 2
EXPIRED: Final = 3
ROLLED_BACK: Final = 4
# Answers of GateCore.try_decide besides the rules' codes.
RETRY: Final = -1  # the positions read went stale before the commit: read again
DUPLICATE: Final = -2  # the order id has an outstanding reservation
BUSY: Final = -3  # another thread holds the lock: wait for it, read the clock again, retry
# Journal records of a lock() block.
_RESERVED: Final = 0
_ENDED: Final = 1
_REDUCED: Final = 2

_INF: Final = float("inf")
# Said only of a C extension module: a sourceless .pyc install is interpreted, and must take the
# interrupt-safe forms (see _acquire_into).
_COMPILED: Final = (__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
_SEQ_DIGITS: Final = 19  # a sequence number fits a machine word
_get_ident: Final = threading.get_ident


def read_clock(clock: Callable[[], object]) -> float:
    """Call ``clock`` (caller code: never under the lock) and check it gave finite seconds."""
    now = clock()
    if type(now) is float and -_INF < now < _INF:
        return now
    if isinstance(now, (int, float)) and not isinstance(now, bool) and -_INF < now < _INF:
        return float(now)
    raise LedgerError(f"the ledger's clock returned {now!r}; it must return finite seconds")


class Reservation:
    """One admitted order's claim on the portfolio limits, held until it ends.

    Read-only for callers. ``notional`` is what is still reserved (after ``reduce``); once the
    reservation has ended it keeps the amount it held when it ended. ``release()`` and
    ``reduce()`` may be called from any thread, any number of times; on an ended reservation
    they do nothing. From inside the same ledger's ``lock()`` block on the same thread they act
    through that block (and are undone with it if it raises). Made by ``PendingMap.reserve()``
    and ``PortfolioGate.try_enter()``.
    """

    __slots__ = (
        "_core",
        "_initial",
        "_initial_units",
        "_kind",
        "_order_id",
        "_reserved_at",
        "_seq",
        "_side",
        "_state",
        "_symbol",
        "_units",
    )

    def __init__(
        self,
        core: LedgerCore,
        symbol: str,
        order_id: str,
        initial: object,
        units: int,
        side: int = rules.UNKNOWN_SIDE,
    ) -> None:
        self._core = core
        self._side = side
        self._symbol = symbol
        self._order_id = order_id  # "" when the ledger names the order (see order_id)
        self._initial = initial
        self._kind = _units.kind_of(initial)
        self._initial_units = units
        self._units = units
        self._seq = -1
        self._reserved_at = 0.0
        self._state = ACTIVE

    @property
    def symbol(self) -> str:
        return self._symbol

    @property
    def order_id(self) -> str:
        """The caller's order id, or the one the ledger made for it (``"pl-<hex>-<seq>"``)."""
        if self._order_id:
            return self._order_id
        return self._core.generated_id(self._seq)

    @property
    def side(self) -> Side | None:
        """The order's side, or None when it was not given (counted in both directions)."""
        return SIDES[self._side]

    @property
    def notional(self) -> _units.Number:
        """What is still reserved, in the kind of amount it was made with."""
        if self._units == self._initial_units:
            return self._initial  # type: ignore[return-value]
        return _units.to_number(self._units, self._kind)

    @property
    def initial_notional(self) -> _units.Number:
        """The notional the reservation was made with, as given."""
        return self._initial  # type: ignore[return-value]

    @property
    def reserved_at(self) -> float:
        """The ledger clock's reading when the reservation was made."""
        return self._reserved_at

    @property
    def expires_at(self) -> float:
        """``reserved_at + ttl``: from this clock reading on, the reservation is expired."""
        return self._reserved_at + self._core.ttl

    @property
    def active(self) -> bool:
        """Still counted against the limits (see ``state``)."""
        return self.state is ReservationState.ACTIVE

    @property
    def state(self) -> ReservationState:
        """How the reservation stands now.

        A reservation past its ``expires_at`` is expired here and now (firing ``on_expire``),
        exactly as the next decision would find it: it never reads as active past its TTL.
        Inside this thread's own ``lock()`` block nothing is swept: the state is as the block
        sees it.
        """
        if self._state == ACTIVE:
            self._core.expire_if_due(self)
        return _STATES[self._state]

    def release(self) -> bool:
        """End the reservation now (e.g. the exchange rejected the order). True if it was active."""
        return self._core.end(self, RELEASED)

    def reduce(self, amount: object) -> bool:
        """Shrink the remaining notional by ``amount`` (a partial fill); at zero it is filled.

        An ``amount`` at least what remains ends the reservation as filled. Returns True if the
        reservation was active. ``amount`` must be a finite number > 0.
        """
        down, up = _units.reduction_units("amount", amount)
        return self._core.reduce(self, down, up, _units.kind_of(amount))

    def __repr__(self) -> str:
        return (
            f"Reservation(symbol={self._symbol!r}, order_id={self.order_id!r}, "
            f"initial_notional={self._initial!r}, state={_STATE_NAMES[self._state]})"
        )


class ReservationState(enum.StrEnum):
    """How a reservation stands; every reservation leaves ``ACTIVE`` exactly once."""

    ACTIVE = "active"
    RELEASED = "released"
    """Released by ``release()``, ``release_order()`` or ``release(symbol)``."""
    FILLED = "filled"
    """Filled: by ``confirm_fill``, or reduced to zero by partial fills (``reduce``,
    ``reduce_order``, ``confirm_fill(filled=)``)."""
    EXPIRED = "expired"
    """Its TTL ran out before anything ended it."""
    ROLLED_BACK = "rolled_back"
    """Made inside a ``lock()`` block that raised, so it never took effect."""


_STATES: Final = tuple(ReservationState)
_STATE_NAMES: Final = tuple(state.value for state in ReservationState)


class _Sides:
    """The pending buys and sells of one symbol that has any (units), its position in the owned
    book (signed units, 0 when not open: kept here too, so that keeping the worst case needs no
    book lookup) and its ``excess``: how much less its worst case is than the side-blind
    ``|position| + reserved`` (see ``LedgerCore._resum_locked``)."""

    __slots__ = ("buys", "excess", "position", "sells")

    def __init__(self, position: int) -> None:
        self.buys = 0
        self.sells = 0
        self.position = position
        self.excess = 0


class _Position:
    """One symbol of the owned position book: its exposure in units and as it was given."""

    __slots__ = ("magnitude", "units", "value")

    def __init__(self, units: int, value: object) -> None:
        self.units = units
        self.magnitude = -units if units < 0 else units
        self.value = value


class Snapshot:
    """A caller's positions read before the lock, for a decision on one symbol.

    ``open`` has the open symbols (exact str), ``gross`` and ``net`` the sums of their exposures'
    magnitudes and signed units, ``holds`` and ``held`` whether the decided symbol is open and
    its signed exposure in units; ``sided`` has the units of the open symbols that had pending
    buys or sells when it was read (None: there were none). ``epoch`` is the ledger's epoch read
    before the positions were (see the module notes).
    """

    __slots__ = ("epoch", "gross", "held", "holds", "net", "open", "sided")

    def __init__(
        self,
        epoch: int,
        open_: dict[str, object],
        gross: int,
        net: int,
        holds: bool,
        held: int,
        sided: dict[str, int] | None,
    ) -> None:
        self.epoch = epoch
        self.open = open_
        self.gross = gross
        self.net = net
        self.holds = holds
        self.held = held
        self.sided = sided


class _Undo:
    """One journal record of a ``lock()`` block: what to put back if the block raises."""

    __slots__ = ("kind", "res", "units")

    def __init__(self, kind: int, res: Reservation, units: int) -> None:
        self.kind = kind
        self.res = res
        self.units = units


class LedgerCore:
    """The reservations, the owned position book and the lock that guards them."""

    __slots__ = (
        "_acquire",
        "_block",
        "_book",
        "_book_gross",
        "_book_net",
        "_buys",
        "_epoch",
        "_excess",
        "_expired",
        "_id_prefix",
        "_index",
        "_kinds",
        "_last_stamp",
        "_lock",
        "_next_expiry",
        "_on_expire",
        "_open",
        "_owner",
        "_release",
        "_released",
        "_reserved",
        "_sells",
        "_seq",
        "_sided",
        "_symbols",
        "_turn",
        "clock",
        "ttl",
    )

    def __init__(
        self,
        ttl: float,
        clock: Callable[[], object],
        on_expire: Callable[[Reservation], object] | None,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._acquire: Callable[..., bool] = self._lock.acquire  # see the module notes
        self._release: Callable[[], None] = self._lock.release
        self._turn = threading.RLock()  # see wait_free
        self._owner = 0  # the thread in a lock() block, 0 when none
        self._block: PendingMap | None = None  # that thread's view
        # 64 random bits per ledger: a generated id names nothing in another process or run.
        self._id_prefix = f"pl-{secrets.token_hex(8)}-"
        # In stamp order: a caller's id (str) or the ledger's sequence number (int) as the key.
        self._index: dict[str | int, Reservation] = {}
        self._symbols: dict[str, int] = {}  # units reserved per symbol, only symbols reserved
        self._reserved = 0  # units reserved in all
        self._sided: dict[str, _Sides] = {}  # only symbols with pending buys or sells
        self._buys = 0  # units of pending buys in all (the rest of _reserved: sells, unknown)
        self._sells = 0
        self._excess = 0  # sum of the _Sides' excess: the book's gross is short of it
        self._book: dict[str, _Position] = {}
        self._book_gross = 0  # sum of the book's |exposure| units
        self._book_net = 0  # sum of the book's signed exposure units
        self._open = 0  # symbols open in the book or reserved (or both)
        self._kinds = 0  # every kind of amount reserved (sticky): the type sums come back in
        self._seq = 0
        self._last_stamp = -_INF
        self._next_expiry = -_INF
        self._epoch = 0
        self._released = 0
        self._expired = 0

    # ---------------------------------------------------------------- reads without the lock

    @property
    def epoch(self) -> int:
        """Read without the lock on purpose: a stale value only costs a retry (module notes)."""
        return self._epoch

    def generated_id(self, seq: int) -> str:
        return self._id_prefix + str(seq)

    def check_new_order_id(self, order_id: object) -> str:
        """A caller's order id for a new reservation: ``""`` (generate one) or an exact str."""
        if order_id is None:
            return ""
        oid = _units.check_order_id(order_id)
        if oid.startswith(self._id_prefix):
            raise ValueError(f"order_id {oid!r} is an id this ledger generated; pass your own")
        return oid

    def refuse_reentry(self, what: str) -> None:
        if self._owner and self._owner == _get_ident():
            raise ReentrantLockError(f"{what} called while this thread holds the ledger lock")

    def locked(self) -> bool:
        return self._lock.locked()

    # ---------------------------------------------------------------- acquisitions

    def now(self) -> float:
        return read_clock(self.clock)

    def fire_expired(self, expired: list[Reservation] | None) -> None:
        """Call ``on_expire`` for each of ``expired``, after the lock is released."""
        callback = self._on_expire
        if expired is None or callback is None:
            return
        for res in expired:
            try:
                callback(res)
            except Exception:
                logger.exception("on_expire raised for %r; ignored", res)

    def end(self, res: Reservation, state: int) -> bool:
        block = self.own_block()
        if block is not None:
            return block.end_locked(res, state)
        if _COMPILED:
            self._acquire()
            try:
                return self._end_counted_locked(res, state)
            finally:
                self._release()
        with self._lock:
            return self._end_counted_locked(res, state)

    def reduce(self, res: Reservation, down: int, up: int, kind: int) -> bool:
        block = self.own_block()
        if block is not None:
            return block.reduce_locked(res, down, up, kind)
        with self._lock:
            return self._reduce_locked(res, down, up, kind) >= 0

    def reduce_order(self, order_id: str, down: int, up: int, kind: int) -> bool:
        """``reduce`` for the outstanding reservation of ``order_id``; False if there is none."""
        block = self.own_block()
        if block is not None:
            return block.reduce_order_locked(order_id, down, up, kind)
        seq = self.generated_seq(order_id)
        with self._lock:
            res = self._find_locked(order_id, seq)
            return res is not None and self._reduce_locked(res, down, up, kind) >= 0

    def expire_if_due(self, res: Reservation) -> None:
        """Expire ``res`` now if its deadline has passed (unless this thread is in a block)."""
        if self._owner == _get_ident():
            return
        now = self.now()
        if now < res._reserved_at + self.ttl:
            return
        with self._lock:
            expired = self._sweep_locked(now)
            if res._state == ACTIVE and now >= res._reserved_at + self.ttl:
                expired = self._expire_one_locked(res, expired)
        self.fire_expired(expired)

    def release_order(self, order_id: str) -> bool:
        block = self.own_block()
        if block is not None:
            return block.release_order(order_id)
        seq = self.generated_seq(order_id)
        with self._lock:
            res = self._find_locked(order_id, seq)
            return res is not None and self._end_counted_locked(res, RELEASED)

    def release_symbol(self, symbol: str) -> bool:
        block = self.own_block()
        if block is not None:
            return block.release(symbol)
        with self._lock:
            return self._release_symbol_locked(symbol)

    def lock(self, timeout: float) -> LockBlock:
        return LockBlock(self, timeout)

    def counts(self) -> tuple[int, int, int, int, int]:
        """``(outstanding, reserved units, kinds, released, expired)``, consistent."""
        if self.own_block() is not None:
            return self._counts_locked()
        now = self.now()
        with self._lock:
            expired = self._sweep_locked(now)
            counts = self._counts_locked()
        self.fire_expired(expired)
        return counts

    def audit(self) -> list[str]:
        """Every running total recomputed from the reservations and the book; the differences."""
        if self.own_block() is not None:
            return self._audit_locked()
        with self._lock:
            return self._audit_locked()

    def wait_free(self, timeout: float) -> bool:
        """Wait until the lock is free, at most ``timeout`` seconds (< 0: for ever, 0: no wait),
        holding it for no time at all; whether it was free in time.

        Waiters take turns (``_turn``): one at a time waits on the lock itself. A thread that
        acquires the lock only to release it holds it while it waits for the GIL, and if every
        waiter queued on the lock, they would pass it among themselves while the threads with
        work found it busy (interpreted, 16 threads on a caller's dict: about 2 ms a decision).
        ``_turn`` is re-entrant because a signal handler may decide on this ledger while its
        thread waits here.
        """
        if timeout == 0:
            return self._lock_free_within(0.0)
        deadline = time.monotonic() + timeout if timeout > 0 else 0.0
        turn: list[bool] = []
        try:
            _acquire_into(turn, self._turn, timeout)
            if not turn[0]:
                return False
            left = timeout if timeout < 0 else max(0.0, deadline - time.monotonic())
            return self._lock_free_within(left)
        finally:
            if turn and turn[0]:
                self._turn.release()

    def _lock_free_within(self, timeout: float) -> bool:
        held: list[bool] = []
        try:
            _acquire_into(held, self._lock, timeout)
            return held[0]
        finally:
            if held and held[0]:
                self._lock.release()

    def own_block(self) -> PendingMap | None:
        """This thread's open ``lock()`` block, or None (any other thread's block is not ours)."""
        if not self._owner or self._owner != _get_ident():
            return None
        return self._block

    # ---------------------------------------------------------------- the owned book

    def set_position(self, symbol: str, units: int, value: object) -> None:
        now = self.now()
        with self._lock:
            expired = self._sweep_locked(now)
            self._set_position_locked(symbol, units, value)
        self.fire_expired(expired)

    def close_position(self, symbol: str) -> bool:
        now = self.now()
        with self._lock:
            expired = self._sweep_locked(now)
            done = self._close_position_locked(symbol)
        self.fire_expired(expired)
        return done

    def confirm_fill(
        self, order_id: str, units: int, value: object, symbol: str, fill: tuple[int, int, int]
    ) -> bool:
        """Set the order's symbol's position and end its reservation as filled, in one step;
        with a ``fill`` (``(down, up, kind)`` as for ``reduce``; ``up`` 0: none) reduce it by
        that instead, in the same step.

        With no outstanding reservation, the position is still set when ``symbol`` is given.
        """
        seq = self.generated_seq(order_id)
        now = self.now()
        with self._lock:
            # Before the sweep: a fill that lands as its TTL runs out is a fill, not an expiry.
            res = self._find_locked(order_id, seq)
            elsewhere = res is not None and bool(symbol) and symbol != res._symbol
            if res is not None and not elsewhere:
                self._set_position_locked(res._symbol, units, value)
                self._fill_locked(res, fill)
            elif res is None and symbol:
                self._set_position_locked(symbol, units, value)
            expired = self._sweep_locked(now)
        self.fire_expired(expired)
        if res is not None and elsewhere:
            raise ValueError(
                f"order_id {order_id!r} is reserved on {res.symbol!r}, not symbol={symbol!r}"
            )
        return res is not None

    def positions(self) -> dict[str, object]:
        with self._lock:
            return {symbol: pos.value for symbol, pos in self._book.items()}

    # ---------------------------------------------------------------- locked primitives

    def _sweep_locked(self, now: float) -> list[Reservation] | None:
        """Expire what is due at ``now``, oldest first, at most ``SWEEP_LIMIT``; return them."""
        if now < self._next_expiry:
            return None
        ttl = self.ttl
        expired: list[Reservation] = []
        for res in self._index.values():
            deadline = res._reserved_at + ttl
            if deadline > now:
                self._next_expiry = deadline
                break
            if len(expired) == SWEEP_LIMIT:
                break  # _next_expiry stays <= now: the next acquisition sweeps on
            expired.append(res)
        else:
            # Nothing left: whatever is reserved from now on is stamped at least `now`.
            self._last_stamp = max(self._last_stamp, now)
            self._next_expiry = self._last_stamp + ttl
        for res in expired:
            self._end_locked(res, EXPIRED)
        self._expired += len(expired)
        return expired or None

    def _expire_one_locked(
        self, res: Reservation, expired: list[Reservation] | None
    ) -> list[Reservation]:
        self._end_locked(res, EXPIRED)
        self._expired += 1
        if expired is None:
            return [res]
        expired.append(res)
        return expired

    def generated_seq(self, order_id: str) -> int:
        """The sequence number if ``order_id`` is an id this ledger generated, else -1 (parsed
        before the lock: the string is the caller's)."""
        if not order_id.startswith(self._id_prefix):
            return -1
        digits = order_id[len(self._id_prefix) :]
        if not 0 < len(digits) <= _SEQ_DIGITS or not digits.isascii() or not digits.isdigit():
            return -1
        seq = int(digits)
        return seq if str(seq) == digits else -1  # the ledger writes no leading zeros

    def _find_locked(self, order_id: str, seq: int) -> Reservation | None:
        """The outstanding reservation of ``order_id`` (``seq`` from ``generated_seq``)."""
        return self._index.get(order_id if seq < 0 else seq)

    def insert_locked(self, res: Reservation, now: float) -> None:
        """Make ``res`` outstanding, stamped ``now`` (never before the last stamp)."""
        self._last_stamp = max(self._last_stamp, now)
        res._reserved_at = self._last_stamp
        res._seq = self._seq
        self._seq += 1
        self._kinds |= res._kind
        self._link_locked(res)

    def _link_locked(self, res: Reservation) -> None:
        """Add an active ``res`` (seq and stamp set) to every index and total."""
        symbol = res._symbol
        self._index[res._order_id or res._seq] = res
        held = self._symbols.get(symbol, 0)
        if not held and symbol not in self._book:
            self._open += 1
        self._symbols[symbol] = held + res._units
        self._reserved += res._units
        res._state = ACTIVE
        if res._side:
            self._side_locked(res, res._units, held + res._units)

    def _end_locked(self, res: Reservation, state: int) -> None:
        """Remove an active ``res`` from every index and total; it ends as ``state``."""
        symbol = res._symbol
        del self._index[res._order_id or res._seq]
        left = self._symbols[symbol] - res._units
        if left:
            self._symbols[symbol] = left
        else:
            del self._symbols[symbol]
            if symbol not in self._book:
                self._open -= 1
        self._reserved -= res._units
        res._state = state
        self._epoch += 1
        if res._side:
            self._side_locked(res, -res._units, left)

    def _end_counted_locked(self, res: Reservation, state: int) -> bool:
        if res._state != ACTIVE:
            return False
        self._end_locked(res, state)
        self._released += 1
        return True

    def _reduce_locked(self, res: Reservation, down: int, up: int, kind: int) -> int:
        """Reduce an active ``res`` by a fill of ``down`` to ``up`` units (``_units.after_fill``);
        the units removed, or -1 if it was not active. Nothing left ends it as filled (keeping
        the amount it held)."""
        if res._state != ACTIVE:
            return -1
        self._kinds |= kind  # kind_of() is called before the lock: an ABC check runs bytecode
        remaining = _units.after_fill(res._units, down, up)
        if not remaining:
            self._end_counted_locked(res, FILLED)
            return res._units
        units = res._units - remaining
        res._units = remaining
        left = self._symbols[res._symbol] - units
        self._symbols[res._symbol] = left
        self._reserved -= units
        self._epoch += 1
        if res._side:
            self._side_locked(res, -units, left)
        return units

    def _side_locked(self, res: Reservation, units: int, reserved: int) -> None:
        """Count ``units`` more (negative: fewer) of a sided ``res`` under its side, once its
        symbol's reserved total has changed (to ``reserved``), and that symbol's worst case
        again."""
        symbol = res._symbol
        sides = self._sided.get(symbol)
        if sides is None:
            position = self._book.get(symbol)
            sides = self._sided[symbol] = _Sides(0 if position is None else position.units)
        if res._side == rules.BUY:
            sides.buys += units
            self._buys += units
        else:
            sides.sells += units
            self._sells += units
        self._resum_locked(symbol, sides, reserved)

    def _resum_locked(self, symbol: str, sides: _Sides, reserved: int) -> None:
        """Recompute ``symbol``'s excess (``reserved``: its reserved total): gross is kept
        side-blind (``_book_gross + _reserved``, as with no side given) less the sum of what
        pending buys and sells against each other or against the position do not add to a worst
        case."""
        units = sides.position
        unknown = reserved - sides.buys - sides.sells
        excess = (units if units >= 0 else -units) + reserved
        excess -= rules.worst_case(units, sides.buys, sides.sells, unknown)
        self._excess += excess - sides.excess
        sides.excess = excess
        if not sides.buys and not sides.sells:
            del self._sided[symbol]

    def _fill_locked(self, res: Reservation, fill: tuple[int, int, int]) -> None:
        """End an active ``res`` as filled, or reduce it by ``fill`` if one is given."""
        down, up, kind = fill
        if up:
            self._reduce_locked(res, down, up, kind)
        else:
            self._end_counted_locked(res, FILLED)

    def on_symbol_locked(self, symbol: str) -> list[Reservation]:
        """The reservations outstanding on ``symbol``: a walk of all of them, as dropping every
        order of a symbol is rare (a per-symbol index would cost every reservation two dict
        operations)."""
        if symbol not in self._symbols:
            return []
        return [res for res in self._index.values() if res._symbol == symbol]

    def _release_symbol_locked(self, symbol: str) -> bool:
        members = self.on_symbol_locked(symbol)
        for res in members:
            self._end_counted_locked(res, RELEASED)
        return bool(members)

    def _set_position_locked(self, symbol: str, units: int, value: object) -> None:
        position = self._book.get(symbol)
        if position is None:
            if symbol not in self._symbols:
                self._open += 1
        else:
            self._book_gross -= position.magnitude
            self._book_net -= position.units
        position = self._book[symbol] = _Position(units, value)
        self._book_gross += position.magnitude
        self._book_net += units
        sides = self._sided.get(symbol)
        if sides is not None:
            sides.position = units
            self._resum_locked(symbol, sides, self._symbols[symbol])

    def _close_position_locked(self, symbol: str) -> bool:
        position = self._book.pop(symbol, None)
        if position is None:
            return False
        self._book_gross -= position.magnitude
        self._book_net -= position.units
        if symbol not in self._symbols:
            self._open -= 1
        sides = self._sided.get(symbol)
        if sides is not None:
            sides.position = 0
            self._resum_locked(symbol, sides, self._symbols[symbol])
        return True

    def _counts_locked(self) -> tuple[int, int, int, int, int]:
        return (len(self._index), self._reserved, self._kinds, self._released, self._expired)

    def reserved_on_locked(self, symbol: str) -> int:
        return self._symbols.get(symbol, 0)

    def sided_symbols(self) -> tuple[str, ...] | list[str]:
        """The symbols with pending buys or sells, read without the lock on purpose: a decision
        on a caller's positions turns theirs into units before the lock, and one that finds a
        symbol sided since reads again (``_excess_over_locked``)."""
        return list(self._sided) if self._sided else ()

    def _excess_over_locked(self, snapshot: Snapshot) -> int:
        """``_excess`` with a caller's positions (read before the lock) in place of the book's: a
        walk of the symbols with pending buys or sells; -1 if one of them is open in the read
        but was not sided when its units were taken (the decision reads again)."""
        excess = 0
        open_, units_of = snapshot.open, snapshot.sided
        for symbol, sides in self._sided.items():
            if units_of is not None and symbol in units_of:
                units = units_of[symbol]
            elif symbol in open_:
                return -1
            else:
                units = 0
            reserved = self._symbols[symbol]
            unknown = reserved - sides.buys - sides.sells
            worst = rules.worst_case(units, sides.buys, sides.sells, unknown)
            excess += (units if units >= 0 else -units) + reserved - worst
        return excess

    def _overlap_locked(self, open_: dict[str, object]) -> int:
        """How many reserved symbols are in ``open_`` (walks the smaller of the two)."""
        symbols = self._symbols
        found = 0
        if len(symbols) < len(open_):
            for symbol in symbols:
                if symbol in open_:
                    found += 1
        else:
            for symbol in open_:
                if symbol in symbols:
                    found += 1
        return found

    def _audit_locked(self) -> list[str]:
        problems: list[str] = []
        units: dict[str, int] = {}
        last = -1
        for key, res in self._index.items():
            units[res._symbol] = units.get(res._symbol, 0) + res._units
            if res._state != ACTIVE or res._units <= 0:
                problems.append(f"indexed reservation {res!r} is not active with units left")
            if key != (res._order_id or res._seq):
                problems.append(f"reservation {res!r} is indexed as {key!r}")
            if res._seq <= last:
                problems.append(f"reservation {res!r} is out of stamp order")
            last = res._seq
        # Every key of both (a total is kept only while positive), not just the kept ones.
        for symbol in sorted(self._symbols.keys() | units.keys()):
            kept, recomputed = self._symbols.get(symbol, 0), units.get(symbol, 0)
            if kept != recomputed or kept <= 0:
                problems.append(f"{symbol!r} reserved: kept {kept}, recomputed {recomputed}")
        _expect(problems, "reserved", self._reserved, sum(units.values()))
        magnitudes = sum(position.magnitude for position in self._book.values())
        _expect(problems, "book gross", self._book_gross, magnitudes)
        _expect(problems, "book net", self._book_net, sum(p.units for p in self._book.values()))
        _audit_sides(self, problems)
        _expect(problems, "symbols open", self._open, len(set(self._book) | set(units)))
        return problems


def _expect(problems: list[str], what: str, kept: int, recomputed: int) -> None:
    if kept != recomputed:
        problems.append(f"{what}: kept {kept}, recomputed {recomputed}")


def _audit_sides(core: LedgerCore, problems: list[str]) -> None:
    """The pending buys and sells, and the excess, recomputed from the reservations."""
    sides: dict[str, list[int]] = {}
    for res in core._index.values():
        if res._side:
            entry = sides.setdefault(res._symbol, [0, 0])
            entry[res._side - 1] += res._units
    excess = 0
    for symbol in sorted(core._sided.keys() | sides.keys()):
        kept = core._sided.get(symbol)
        buys, sells = sides.get(symbol, [0, 0])
        if kept is None or (kept.buys, kept.sells) != (buys, sells):
            got = None if kept is None else (kept.buys, kept.sells)
            problems.append(f"{symbol!r} buys, sells: kept {got}, recomputed {(buys, sells)}")
            continue
        reserved = core._symbols.get(symbol, 0)
        position = core._book.get(symbol)
        units = 0 if position is None else position.units
        _expect(problems, f"{symbol!r} position", kept.position, units)
        worst = rules.worst_case(units, buys, sells, reserved - buys - sells)
        _expect(problems, f"{symbol!r} excess", kept.excess, abs(units) + reserved - worst)
        excess += kept.excess
    _expect(problems, "excess", core._excess, excess)
    _expect(problems, "buys", core._buys, sum(b for b, _ in sides.values()))
    _expect(problems, "sells", core._sells, sum(s for _, s in sides.values()))


def _seq_of(res: Reservation) -> int:
    return res._seq


def _acquire_into(held: list[bool], lock: threading.Lock | threading.RLock, timeout: float) -> None:
    """``lock.acquire()`` within ``timeout`` seconds (< 0: for ever, 0: no wait), its answer
    appended to ``held``.

    The caller enters its ``try`` first, calls this, and releases in its ``finally`` if ``held``
    says so. Compiled, nothing can be raised between ``acquire()`` returning and the append.
    Interpreted, a signal handler may run as ``acquire()`` returns, so there ``extend()`` stores
    the answer from C first (three times the instructions: hence two forms). ``with lock:`` has
    no such window, but neither a timeout nor a try that does not wait.
    """
    if _COMPILED:
        if timeout == 0:
            held.append(lock.acquire(False))  # the common case: fewest arguments to parse
        else:
            held.append(lock.acquire(True, timeout))
    elif timeout == 0:
        held.extend(map(lock.acquire, _NO_WAIT))
    else:
        held.extend(map(lock.acquire, _WAIT, (timeout,)))


_NO_WAIT: Final = (False,)
_WAIT: Final = (True,)


class PendingMap:
    """The ledger as seen inside ``with ledger.lock() as pending:``; valid only in that block.

    Everything here runs with the lock held, so the block sees one consistent state and what it
    reserves is visible to the next thread that takes the lock. Changes are journaled, so a
    block that raises leaves the ledger as it found it.
    """

    __slots__ = ("_core", "_expired", "_journal", "_kinds_before", "_now", "_open")

    def __init__(self, core: LedgerCore, now: float, expired: list[Reservation] | None) -> None:
        self._core = core
        self._now = now
        self._expired = expired
        self._open = True
        self._journal: list[_Undo] = []
        self._kinds_before = core._kinds

    def _live(self) -> LedgerCore:
        if not self._open:
            raise StaleViewError("this PendingMap's lock() block has ended; take the lock again")
        return self._core

    def contains(self, symbol: object) -> bool:
        """Whether any reservation is outstanding for ``symbol``."""
        return _units.check_symbol(symbol) in self._live()._symbols

    def __contains__(self, symbol: object) -> bool:
        core = self._live()
        return isinstance(symbol, str) and str.__str__(symbol) in core._symbols

    def __len__(self) -> int:
        """Number of outstanding reservations (not symbols)."""
        return len(self._live()._index)

    def __iter__(self) -> Iterator[str]:
        """The symbols with outstanding reservations (a snapshot)."""
        return iter(list(self._live()._symbols))

    def gross_notional(self) -> _units.Number:
        """Sum of outstanding reserved notional, in the kind of the amounts reserved."""
        core = self._live()
        return _units.to_number(core._reserved, core._kinds)

    def symbol_notional(self, symbol: object) -> _units.Number:
        """Reserved notional outstanding on ``symbol`` (0 if none)."""
        core = self._live()
        return _units.to_number(core.reserved_on_locked(_units.check_symbol(symbol)), core._kinds)

    def new_slots(self, is_open: Callable[[str], object]) -> int:
        """How many reserved symbols are not open, i.e. take a concurrency slot of their own."""
        return sum(1 for symbol in list(self._live()._symbols) if not is_open(symbol))

    def reserve(
        self, symbol: object, notional: object, *, order_id: object = None, side: object = None
    ) -> Reservation:
        """Record a reservation of ``notional`` on ``symbol`` for one order.

        ``order_id`` is the client order id (a non-empty str); the ledger makes one if it is not
        given. An ``order_id`` already outstanding raises ``ValueError``. Reservations on one
        symbol add up, but each keeps its own TTL and can be released alone. ``side`` is the
        order's (``Side``, ``"buy"``/``"sell"``, or ``None``: unknown), as in ``try_enter``.
        """
        core = self._live()
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        code = side_code(side)
        oid = core.check_new_order_id(order_id)
        if oid and oid in core._index:
            raise ValueError(f"order_id {oid!r} already has an outstanding reservation")
        res = Reservation(core, name, oid, notional, units, code)
        core.insert_locked(res, self._now)  # the block's time: the clock is not read under it
        self._journal.append(_Undo(_RESERVED, res, 0))
        return res

    def release(self, symbol: object) -> bool:
        """Drop every reservation on ``symbol``; True if anything was released."""
        members = self._live().on_symbol_locked(_units.check_symbol(symbol))
        for res in members:
            self.end_locked(res, RELEASED)
        return bool(members)

    def release_order(self, order_id: object) -> bool:
        """Drop the reservation of ``order_id``; True if it was outstanding."""
        core = self._live()
        oid = _units.check_order_id(order_id)
        res = core._find_locked(oid, core.generated_seq(oid))
        return res is not None and self.end_locked(res, RELEASED)

    def end_locked(self, res: Reservation, state: int) -> bool:
        """End ``res`` through this block (journaled); it must be this ledger's."""
        if res._core is not self._live() or not self._core._end_counted_locked(res, state):
            return False
        self._journal.append(_Undo(_ENDED, res, 0))
        return True

    def reduce_locked(self, res: Reservation, down: int, up: int, kind: int) -> bool:
        """Reduce ``res`` through this block (journaled); it must be this ledger's."""
        if res._core is not self._live():
            return False
        active_before = res._state == ACTIVE
        removed = self._core._reduce_locked(res, down, up, kind)
        if removed < 0:
            return False
        if active_before and res._state != ACTIVE:
            self._journal.append(_Undo(_ENDED, res, 0))
        else:
            self._journal.append(_Undo(_REDUCED, res, removed))
        return True

    def reduce_order_locked(self, order_id: str, down: int, up: int, kind: int) -> bool:
        """Reduce the reservation of ``order_id`` (an exact str) through this block."""
        core = self._live()
        res = core._find_locked(order_id, core.generated_seq(order_id))
        return res is not None and self.reduce_locked(res, down, up, kind)

    def close_locked(self, failed: bool) -> list[Reservation] | None:
        """End the block (lock held): undo it if it ``failed``; what its entry expired."""
        self._open = False
        if failed:
            self._rollback_locked()
        return self._expired

    def _rollback_locked(self) -> None:
        """Undo the journal, newest first."""
        core = self._core
        restored = False
        for undo in reversed(self._journal):
            res = undo.res
            if undo.kind == _RESERVED:
                core._end_locked(res, ROLLED_BACK)  # any later end was undone already
            elif undo.kind == _ENDED:
                core._link_locked(res)
                core._released -= 1
                restored = True
            else:
                res._units += undo.units
                reserved = core._symbols[res._symbol] + undo.units
                core._symbols[res._symbol] = reserved
                core._reserved += undo.units
                if res._side:
                    core._side_locked(res, undo.units, reserved)
        self._journal.clear()
        core._kinds = self._kinds_before
        if restored:  # restored ones went to the end: put the index back in stamp order
            ordered = sorted(core._index.values(), key=_seq_of)
            core._index = {res._order_id or res._seq: res for res in ordered}


class LockBlock:
    """The context manager ``PendingEntryLedger.lock()`` returns (single use)."""

    __slots__ = ("_core", "_timeout", "_view")

    def __init__(self, core: LedgerCore, timeout: float) -> None:
        self._core = core
        self._timeout = timeout
        self._view: PendingMap | None = None

    def __enter__(self) -> PendingMap:
        if self._view is not None:
            raise LedgerError("a lock() context manager can be entered only once")
        core = self._core
        core.refuse_reentry("lock()")
        deadline = time.monotonic() + self._timeout
        while True:
            now = core.now()  # just before a try that does not wait: the block's time
            held: list[bool] = []
            try:
                _acquire_into(held, core._lock, 0.0)
                if held[0]:
                    view = self._view = PendingMap(core, now, core._sweep_locked(now))
                    core._block = view
                    core._owner = _get_ident()
            except BaseException:
                if held and held[0]:
                    core._owner = 0
                    core._block = None
                    core._lock.release()
                raise
            if held[0]:
                return view  # nothing between the try and here where an interrupt could land
            left = -1.0 if self._timeout < 0 else max(0.0, deadline - time.monotonic())
            if not core.wait_free(left):
                raise LockTimeout(f"ledger lock not acquired within {self._timeout} s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        core = self._core
        view = self._view
        if view is None or not view._open or core._owner != _get_ident():
            raise LedgerError("this lock() block is not open in this thread")
        try:
            expired = view.close_locked(exc_type is not None)
        finally:
            core._block = None
            core._owner = 0
            core._lock.release()
        core.fire_expired(expired)


class LatchRecord:
    """The loss latch as it fired (units and wall-clock seconds; ``trading.Latch`` is the public
    form): read-only once made, so it may be handed out of the lock."""

    __slots__ = ("at", "code", "kinds", "limit", "state", "until", "value")

    def __init__(
        self, state: int, code: int, limit: int, value: int, at: float, until: float, kinds: int
    ) -> None:
        self.state = state
        self.code = code
        self.limit = limit
        self.value = value
        self.at = at
        self.until = until
        self.kinds = kinds


class GateCore:
    """One gate's trading state, loss latch and decision counters, on a ledger's lock.

    The effective state is the stricter of the operator's (``halt``, ``reduce_only``,
    ``resume``) and the latch's. The loss book (the day's realized P&L, the last equity and its
    peak) belongs to the day that ends at ``_day_end`` (unset, +inf, until the first loss call);
    the first call at or past it starts a new day, which clears the latch (``_roll_locked``).
    """

    __slots__ = (
        "_counts",
        "_day_end",
        "_day_pnl",
        "_equity",
        "_has_equity",
        "_kinds",
        "_latch",
        "_on_loss",
        "_operator",
        "_peak",
        "_reset_offset",
        "_timeouts",
        "_timeouts_lock",
        "_undated",
        "ledger",
    )

    def __init__(self, ledger: LedgerCore, on_loss: int, reset_offset: float) -> None:
        self.ledger = ledger
        self._operator = rules.ACTIVE
        self._on_loss = on_loss
        self._reset_offset = reset_offset
        self._latch: LatchRecord | None = None
        self._day_end = _INF
        self._day_pnl = 0
        self._undated = 0  # P&L recorded while the wall clock failed: its day is not known
        self._equity = 0
        self._peak = 0
        self._has_equity = False
        self._kinds = 0  # the kinds of the loss amounts recorded (sticky)
        self._counts = [0] * len(_REASON_SLOTS)  # by outcome code; [0] counts admissions
        # Timeouts are counted under a lock of their own: they happen when the ledger's is busy.
        self._timeouts_lock = threading.Lock()
        self._timeouts = 0

    @property
    def latched(self) -> bool:
        """Read without the lock on purpose: a decision that misses a latch set meanwhile finds
        it under the lock; one that misses its clearing only stays denied (the safe side)."""
        return self._latch is not None

    @property
    def tracking(self) -> bool:
        """Whether a loss call has started the day (read without the lock, as ``latched``)."""
        return self._day_end < _INF

    def set_operator(self, state: int) -> None:
        with self.ledger._lock:
            self._operator = state

    def resume(self) -> None:
        """The operator's resume: ACTIVE, the latch cleared, a new measuring period."""
        with self.ledger._lock:
            self._operator = rules.ACTIVE
            self._latch = None
            self._day_pnl = 0
            self._undated = 0
            self._peak = self._equity

    def trading(self, wall: float) -> tuple[int, LatchRecord | None]:
        """The effective state and the latch at wall time ``wall`` (-inf: not read); inside
        this thread's ``lock()`` block, as the block sees them (no new day starts there)."""
        if self.ledger.own_block() is not None:
            return self._state_locked(), self._latch
        with self.ledger._lock:
            self._roll_locked(wall)
            return self._state_locked(), self._latch

    def record_pnl(self, limits: UnitLimits, units: int, kind: int, wall: float) -> None:
        """Add ``units`` to the day's P&L at wall time ``wall`` (-inf: the wall clock failed;
        the amount counts in the day under way and, if a loss, in the next one too)."""
        with self.ledger._lock:
            self._start_day_locked(wall)
            self._day_pnl += units
            if wall == -_INF:
                self._undated += units
            self._kinds |= kind
            self._check_loss_locked(limits, wall)

    def set_equity(self, limits: UnitLimits, units: int, kind: int, wall: float) -> None:
        with self.ledger._lock:
            self._start_day_locked(wall)
            if not self._has_equity or units > self._peak:
                self._peak = units
            self._equity = units
            self._has_equity = True
            self._kinds |= kind
            self._check_loss_locked(limits, wall)

    def counts(self) -> tuple[list[int], int, LatchRecord | None]:
        """Decisions by outcome code (``[0]``: admitted), with the state and the latch at that
        moment: a consistent snapshot (the state as of the last roll)."""
        if self.ledger.own_block() is not None:
            counts, state, latch = list(self._counts), self._state_locked(), self._latch
        else:
            with self.ledger._lock:
                counts, state, latch = list(self._counts), self._state_locked(), self._latch
        with self._timeouts_lock:
            counts[rules.LOCK_TIMEOUT] = self._timeouts
        return counts, state, latch

    def count_timeout(self) -> None:
        """Count a decision denied with ``LOCK_TIMEOUT`` (without the ledger lock: it is busy)."""
        with self._timeouts_lock:
            self._timeouts += 1

    def try_decide(
        self,
        res: Reservation,
        limits: UnitLimits,
        now: float,
        wall: float,
        snapshot: Snapshot | None,
    ) -> int:
        """Check the rules and reserve ``res`` if they pass, in one critical section.

        ``wall`` is the wall clock's reading (-inf when not read: nothing is latched). Returns
        the outcome code; ``RETRY`` if ``snapshot`` went stale; ``DUPLICATE`` if the order id is
        outstanding already; ``BUSY``, having waited for nothing, if another thread holds the
        lock: the caller waits for it (``LedgerCore.wait_free``), reads the clock again and
        tries again, so no reservation is ever stamped with a reading from before a wait.
        """
        ledger = self.ledger
        if _COMPILED:
            if not ledger._acquire(False):
                return BUSY
            try:
                code, expired = self._sweep_and_decide_locked(res, limits, now, wall, snapshot)
            finally:
                ledger._release()
        else:
            held: list[bool] = []
            try:
                _acquire_into(held, ledger._lock, 0.0)
                if not held[0]:
                    return BUSY
                code, expired = self._sweep_and_decide_locked(res, limits, now, wall, snapshot)
            finally:
                if held and held[0]:
                    ledger._release()
        ledger.fire_expired(expired)
        return code

    def _sweep_and_decide_locked(
        self,
        res: Reservation,
        limits: UnitLimits,
        now: float,
        wall: float,
        snapshot: Snapshot | None,
    ) -> tuple[int, list[Reservation] | None]:
        expired = self.ledger._sweep_locked(now)
        if wall >= self._day_end:
            self._roll_locked(wall)
        return self._decide_locked(res, limits, now, snapshot), expired

    def _decide_locked(
        self, res: Reservation, limits: UnitLimits, now: float, snapshot: Snapshot | None
    ) -> int:
        ledger = self.ledger
        state = self._state_locked()
        if snapshot is not None and snapshot.epoch != ledger._epoch and state != rules.HALTED_STATE:
            return RETRY
        if res._order_id and res._order_id in ledger._index:
            return DUPLICATE
        if snapshot is None:
            code = self._rule_on_book_locked(res, limits, state)
        else:
            code = self._rule_on_snapshot_locked(res, limits, state, snapshot)
            if code == RETRY:
                return RETRY
        self._counts[code] += 1
        if code == rules.ADMIT:
            ledger.insert_locked(res, now)
        return code

    def _rule_on_book_locked(self, res: Reservation, limits: UnitLimits, state: int) -> int:
        """The rules' answer with the owned book's running totals (no walk of anything)."""
        ledger = self.ledger
        position = ledger._book.get(res._symbol)
        reserved = ledger._symbols.get(res._symbol, 0)
        return self._rule_locked(
            res,
            limits,
            state,
            ledger._open,
            position is not None or reserved > 0,
            ledger._book_gross + ledger._reserved - ledger._excess,
            0 if position is None else position.units,
            reserved,
            ledger._book_net,
        )

    def _rule_on_snapshot_locked(
        self, res: Reservation, limits: UnitLimits, state: int, snapshot: Snapshot
    ) -> int:
        """The rules' answer with a caller's positions, read before the lock.

        A symbol open in the read and not reserved may have closed since, and its slot been
        taken by another entry: an order of unknown side on it is decided as if it had, needing
        a slot beside the others. An order with a side is decided on the read as it is: sides
        rest on a cache that changes only by fills handed over in one step (module notes), so a
        reducing order needs no slot, in ``REDUCING`` too."""
        ledger = self.ledger
        reserved = ledger._symbols.get(res._symbol, 0)
        open_ = snapshot.open
        count = len(open_) + len(ledger._symbols) - ledger._overlap_locked(open_)
        vouched = reserved > 0 or (snapshot.holds and res._side != rules.UNKNOWN_SIDE)
        if not vouched and snapshot.holds:
            count -= 1
        excess = ledger._excess_over_locked(snapshot) if ledger._sided else 0
        if excess < 0:  # a symbol sided since the read: read again, unless halted (denied)
            if state != rules.HALTED_STATE:
                return RETRY
            excess = 0
        return self._rule_locked(
            res,
            limits,
            state,
            count,
            vouched,
            snapshot.gross + ledger._reserved - excess,
            snapshot.held,
            reserved,
            snapshot.net,
        )

    def _rule_locked(
        self,
        res: Reservation,
        limits: UnitLimits,
        state: int,
        open_count: int,
        symbol_open: bool,
        gross: int,
        position: int,
        reserved: int,
        net_position: int,
    ) -> int:
        """``rules.first_failing_rule`` on the symbol's and the book's worst cases before and
        after ``res``, given the symbol's signed ``position`` and ``reserved`` units, and the
        book's position (``net_position``)."""
        ledger = self.ledger
        sides = ledger._sided.get(res._symbol) if ledger._sided else None
        units, side = res._units, res._side
        if side == rules.UNKNOWN_SIDE and sides is None:
            # Nothing sided on the symbol: its worst case is |position| + reserved, which this
            # order of unknown side raises by all of it (rules.worst_case, summed by hand).
            before = (position if position >= 0 else -position) + reserved
            after = before + units
        else:
            buys, sells = (0, 0) if sides is None else (sides.buys, sides.sells)
            unknown = reserved - buys - sells
            before, after = rules.worst_cases(position, buys, sells, unknown, side, units)
        net_before = net_after = 0
        if rules.uses_net(limits, state):
            net_before, net_after = self._net_locked(net_position, units, side)
        return rules.first_failing_rule(
            limits, state, open_count, symbol_open, gross, before, after, net_before, net_after
        )

    def _net_locked(self, position: int, units: int, side: int) -> tuple[int, int]:
        """The book's net worst case before and after an order of ``units`` on ``side``."""
        ledger = self.ledger
        buys, sells = ledger._buys, ledger._sells
        unknown = ledger._reserved - buys - sells
        if side == rules.UNKNOWN_SIDE and not buys and not sells:
            before = (position if position >= 0 else -position) + unknown  # as above
            return before, before + units
        return rules.worst_cases(position, buys, sells, unknown, side, units)

    # ---------------------------------------------------------------- the loss book (locked)

    def _state_locked(self) -> int:
        latch = self._latch
        if latch is not None and latch.state > self._operator:
            return latch.state
        return self._operator

    def _start_day_locked(self, wall: float) -> None:
        """Roll to ``wall``'s day, or start the first one (-inf: no reading, nothing moves)."""
        if wall == -_INF:
            return
        if self._day_end == _INF:
            self._day_end = rules.next_reset(wall, self._reset_offset)
        else:
            self._roll_locked(wall)

    def _roll_locked(self, wall: float) -> None:
        """At or past the day's end: a new day, with the peak at the last equity and no P&L but
        the losses of unknown day (they may be today's: counting them again only over-blocks),
        and no latch but one fired with no wall time (``until`` inf: it waits for resume)."""
        if wall < self._day_end:
            return
        self._day_pnl = self._undated if self._undated < 0 else 0
        self._undated = 0
        self._peak = self._equity
        if self._latch is not None and self._latch.until < _INF:
            self._latch = None
        self._day_end = rules.next_reset(wall, self._reset_offset)

    def _check_loss_locked(self, limits: UnitLimits, wall: float) -> None:
        """Latch, if no latch is set and the loss book has reached a loss limit."""
        if self._latch is not None:
            return
        drawdown = self._peak - self._equity if self._has_equity else 0
        code = rules.loss_to_latch(limits, self._day_pnl, drawdown)
        if code == rules.NO_LATCH:
            return
        if code == rules.DAILY_LOSS:
            limit, value = limits.max_daily_loss, self._day_pnl
        else:
            limit, value = limits.max_drawdown, drawdown
        kinds = self._kinds | limits.loss_kinds
        until = _INF if wall == -_INF else self._day_end  # no time: no day to end with
        self._latch = LatchRecord(self._on_loss, code, limit, value, wall, until, kinds)


_REASON_SLOTS: Final = range(rules.LOCK_TIMEOUT + 1)
