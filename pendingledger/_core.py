"""The ledger's state and the one lock that guards it.

This is the only module that reads or writes that state. ``LedgerCore._lock`` (a plain
``threading.Lock``) must be held whenever any of the following is read in a way that must be
consistent, and whenever it is changed:

* a ``LedgerCore``'s reservations (``_index``, keyed by the caller's order id, or by the sequence
  number when the ledger names the order), its scopes (``_account`` and ``_strategies``: each
  a ``_Scope`` of per-symbol totals, sides, owned position book and counts), counters, the
  thread in a ``lock()`` block (``_owner``, ``_block``) and ``_epoch``;
* a ``GateCore``'s trading state, loss book, latch, decision counters, rate windows and its
  per-strategy entries (``_budgeted``);
* a ``Reservation``'s remaining ``_units``, ``_state``, ``_reserved_at`` and ``_scope``.

Scopes: a reservation counts in the account's scope and, if it was made for a strategy, in that
strategy's; a position is one strategy's part or the account's own, and the account's book
holds each symbol's sum of its parts (``_Position``). The running totals of every scope move
together in the critical section that changes them, so a decision sees every scope in one
state.

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
symbol is in a scope's ``symbols`` exactly while it has reservations there, and never with 0
units.

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
side (``rules.worst_case``). A scope's ``symbols`` keeps each symbol's reserved total, and
``sided`` the buys and sells of only the symbols that have any, each with its ``excess``: how
much less its worst case is than ``|position| + reserved``. So gross (the sum of worst cases) is
``book_gross + reserved - excess``, kept up to date by every change to a sided symbol
(``_Scope.resum_locked``), and a side-blind book pays nothing for sides. A decision on a caller's
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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from . import _units, rules
from .errors import LedgerError, LockTimeout, ReentrantLockError, StaleViewError
from .events import Ended, EndReason, Listeners
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
# How a reservation ended, as told to listeners (module constants: no class lookup per end).
_BY_RELEASE: Final = EndReason.RELEASED
_BY_FILL: Final = EndReason.FILLED
_BY_REDUCTION: Final = EndReason.REDUCED
_BY_EXPIRY: Final = EndReason.EXPIRED
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
        "_held",
        "_initial",
        "_initial_units",
        "_kind",
        "_order_id",
        "_reserved_at",
        "_scope",
        "_scope_held",
        "_seq",
        "_side",
        "_state",
        "_strategy",
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
        strategy: str = "",
    ) -> None:
        self._core = core
        self._side = side
        self._strategy = strategy  # "" for the account's own
        self._scope: _Scope | None = None  # its strategy's figures, set when it is linked
        # What its symbol holds in the account's scope and its strategy's, while it is linked.
        self._held = _NOT_HELD
        self._scope_held = _NOT_HELD
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
    def strategy(self) -> str | None:
        """The strategy the order was made for, or None (the account's own)."""
        return self._strategy or None

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
    ``|position| + reserved`` (see ``_Scope.resum_locked``)."""

    __slots__ = ("buys", "excess", "position", "sells")

    def __init__(self, position: int) -> None:
        self.buys = 0
        self.sells = 0
        self.position = position
        self.excess = 0


class _Position:
    """One symbol of an owned position book: its exposure in units and as it was given.

    In a strategy's book that is all. In the account's, ``units`` is the sum of the parts (its
    own, ``own`` units while ``own_open``, and ``parts`` strategies'), ``value`` is its own
    part as given and ``kinds`` every kind of amount the parts were given in."""

    __slots__ = ("kinds", "magnitude", "own", "own_open", "parts", "units", "value")

    def __init__(self, units: int, value: object, kinds: int) -> None:
        self.units = units
        self.magnitude = -units if units < 0 else units
        self.value = value
        self.kinds = kinds
        self.own = units
        self.own_open = True
        self.parts = 0


class _Held:
    """What one symbol has reserved in a scope: its units and its count of reservations (at
    least one: a symbol is kept only while reserved, so never with 0 units)."""

    __slots__ = ("orders", "units")

    def __init__(self) -> None:
        self.units = 0
        self.orders = 0


_NOT_HELD: Final = _Held()  # a reservation's _held before it is linked


class _Scope:
    """The figures of one book the limits bound: the account's (every reservation, and the
    positions summed over their parts) or one strategy's (its own reservations and positions).

    ``symbols`` has what each reserved symbol holds (``_Held``), ``sided`` the buys and sells
    of the symbols that have any (see Sides in the module notes), ``book`` the positions,
    ``open`` the symbols open or reserved or both. Everything here is guarded by the ledger
    lock.
    """

    __slots__ = (
        "book",
        "book_gross",
        "book_net",
        "buys",
        "excess",
        "open",
        "orders",
        "reserved",
        "sells",
        "sided",
        "spare",
        "symbols",
    )

    def __init__(self) -> None:
        self.symbols: dict[str, _Held] = {}  # only symbols reserved
        # The last _Held dropped (0 units, no orders), for the next symbol reserved: a symbol
        # entered and released in turn costs no allocation (benchmarks/README.md).
        self.spare: _Held | None = None
        self.orders = 0  # reservations outstanding
        self.reserved = 0  # units reserved in all
        self.sided: dict[str, _Sides] = {}  # only symbols with pending buys or sells
        self.buys = 0  # units of pending buys in all (the rest of reserved: sells, unknown)
        self.sells = 0
        self.excess = 0  # sum of the _Sides' excess: the book's gross is short of it
        self.book: dict[str, _Position] = {}
        self.book_gross = 0  # sum of the book's |exposure| units
        self.book_net = 0  # sum of the book's signed exposure units
        self.open = 0  # symbols open in the book or reserved (or both)

    def gross(self) -> int:
        return self.book_gross + self.reserved - self.excess

    def add_locked(self, symbol: str, units: int, side: int) -> _Held:
        """Count one more reservation of ``units`` on ``symbol``; what the symbol holds (valid
        while that reservation is outstanding: its end passes it back)."""
        held = self.symbols.get(symbol)
        if held is None:
            held = self.spare
            if held is None:
                held = _Held()
            else:
                self.spare = None
            self.symbols[symbol] = held
            if symbol not in self.book:
                self.open += 1
        held.units += units
        held.orders += 1
        self.orders += 1
        self.reserved += units
        if side:
            self.side_locked(symbol, side, units, held.units)
        return held

    def remove_locked(self, symbol: str, held: _Held, units: int, side: int) -> None:
        """Count one reservation of ``units`` on ``symbol`` (holding ``held``) fewer."""
        held.units -= units
        held.orders -= 1
        if not held.orders:
            del self.symbols[symbol]
            self.spare = held
            if symbol not in self.book:
                self.open -= 1
        self.orders -= 1
        self.reserved -= units
        if side:
            self.side_locked(symbol, side, -units, held.units)

    def shrink_locked(self, symbol: str, held: _Held, units: int, side: int) -> None:
        """A reservation on ``symbol`` (holding ``held``) holds ``units`` fewer (negative:
        more), and not 0."""
        held.units -= units
        self.reserved -= units
        if side:
            self.side_locked(symbol, side, -units, held.units)

    def side_locked(self, symbol: str, side: int, units: int, reserved: int) -> None:
        """Count ``units`` more (negative: fewer) under ``side`` on ``symbol``, once its
        reserved total has changed (to ``reserved``), and its worst case again."""
        sides = self.sided.get(symbol)
        if sides is None:
            position = self.book.get(symbol)
            sides = self.sided[symbol] = _Sides(0 if position is None else position.units)
        if side == rules.BUY:
            sides.buys += units
            self.buys += units
        else:
            sides.sells += units
            self.sells += units
        self.resum_locked(symbol, sides, reserved)

    def resum_locked(self, symbol: str, sides: _Sides, reserved: int) -> None:
        """Recompute ``symbol``'s excess (``reserved``: its reserved total): gross is kept
        side-blind (``book_gross + reserved``, as with no side given) less the sum of what
        pending buys and sells against each other or against the position do not add to a worst
        case."""
        units = sides.position
        unknown = reserved - sides.buys - sides.sells
        excess = (units if units >= 0 else -units) + reserved
        excess -= rules.worst_case(units, sides.buys, sides.sells, unknown)
        self.excess += excess - sides.excess
        sides.excess = excess
        if not sides.buys and not sides.sells:
            del self.sided[symbol]

    def put_locked(self, symbol: str, position: _Position) -> None:
        """Open ``symbol`` at ``position``, or replace the one it has."""
        old = self.book.get(symbol)
        if old is None:
            if symbol not in self.symbols:
                self.open += 1
        else:
            self.book_gross -= old.magnitude
            self.book_net -= old.units
        self.book[symbol] = position
        self.book_gross += position.magnitude
        self.book_net += position.units
        sides = self.sided.get(symbol)
        if sides is not None:
            sides.position = position.units
            self.resum_locked(symbol, sides, self.symbols[symbol].units)

    def drop_locked(self, symbol: str) -> _Position | None:
        """Close ``symbol``; the position it had, or None if it had none."""
        position = self.book.pop(symbol, None)
        if position is None:
            return None
        self.book_gross -= position.magnitude
        self.book_net -= position.units
        if symbol not in self.symbols:
            self.open -= 1
        sides = self.sided.get(symbol)
        if sides is not None:
            sides.position = 0
            self.resum_locked(symbol, sides, self.symbols[symbol].units)
        return position


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
        "_account",
        "_acquire",
        "_block",
        "_epoch",
        "_expired",
        "_id_prefix",
        "_index",
        "_kinds",
        "_last_stamp",
        "_lock",
        "_next_expiry",
        "_on_expire",
        "_owner",
        "_release",
        "_released",
        "_seq",
        "_strategies",
        "_turn",
        "clock",
        "listeners",
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
        self._account = _Scope()  # every reservation, the positions summed over their parts
        self._strategies: dict[str, _Scope] = {}  # each strategy's own, kept once it has any
        self._kinds = 0  # every kind of amount reserved (sticky): the type sums come back in
        self._seq = 0
        self._last_stamp = -_INF
        self._next_expiry = -_INF
        self._epoch = 0
        self._released = 0
        self._expired = 0
        self.listeners = Listeners()  # told of every end, after the lock is released

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
        """Call ``on_expire`` for each of ``expired`` and tell the listeners, after the lock is
        released; one warning line for them all (an expiry is usually a release missed)."""
        if expired is None:
            return
        logger.warning(
            "%d reservation(s) expired after the %g s TTL with no release; the oldest: %r",
            len(expired),
            self.ttl,
            expired[0],
        )
        callback = self._on_expire
        if callback is not None:
            for res in expired:
                try:
                    callback(res)
                except Exception:
                    logger.exception("on_expire raised for %r; ignored", res)
        self.announce(expired, _BY_EXPIRY)

    def announce(self, ended: list[Reservation], how: EndReason) -> None:
        """Tell the listeners that ``ended`` ended (lock released)."""
        listeners = self.listeners
        if listeners.active:
            for res in ended:
                listeners.emit(Ended(res._order_id, how, res))

    def _announce_one(self, res: Reservation, how: EndReason) -> None:
        listeners = self.listeners
        if listeners.active:
            listeners.emit(Ended(res._order_id, how, res))

    def end(self, res: Reservation, state: int) -> bool:
        block = self.own_block()
        if block is not None:
            return block.end_locked(res, state)
        if _COMPILED:
            self._acquire()
            try:
                done = self._end_counted_locked(res, state)
            finally:
                self._release()
        else:
            with self._lock:
                done = self._end_counted_locked(res, state)
        if done:
            self._announce_one(res, _BY_RELEASE)
        return done

    def reduce(self, res: Reservation, down: int, up: int, kind: int) -> bool:
        block = self.own_block()
        if block is not None:
            return block.reduce_locked(res, down, up, kind)
        with self._lock:
            done = self._reduce_locked(res, down, up, kind) >= 0
            ended = done and res._state != ACTIVE
        if ended:
            self._announce_one(res, _BY_REDUCTION)
        return done

    def reduce_order(self, order_id: str, down: int, up: int, kind: int) -> bool:
        """``reduce`` for the outstanding reservation of ``order_id``; False if there is none."""
        block = self.own_block()
        if block is not None:
            return block.reduce_order_locked(order_id, down, up, kind)
        seq = self.generated_seq(order_id)
        with self._lock:
            res = self._find_locked(order_id, seq)
            done = res is not None and self._reduce_locked(res, down, up, kind) >= 0
            ended = done and res is not None and res._state != ACTIVE
        if ended and res is not None:
            self._announce_one(res, _BY_REDUCTION)
        return done

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
            done = res is not None and self._end_counted_locked(res, RELEASED)
        if done and res is not None:
            self._announce_one(res, _BY_RELEASE)
        return done

    def release_symbol(self, symbol: str) -> bool:
        block = self.own_block()
        if block is not None:
            return block.release(symbol)
        with self._lock:
            ended = self._release_symbol_locked(symbol)
        self.announce(ended, _BY_RELEASE)
        return bool(ended)

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

    def set_position(
        self, symbol: str, units: int, value: object, kind: int, strategy: str
    ) -> None:
        """Set ``strategy``'s part of ``symbol``'s position ("": the account's own)."""
        now = self.now()
        with self._lock:
            expired = self._sweep_locked(now)
            self._set_position_locked(symbol, units, value, kind, strategy)
        self.fire_expired(expired)

    def close_position(self, symbol: str, strategy: str) -> bool:
        now = self.now()
        with self._lock:
            expired = self._sweep_locked(now)
            done = self._close_position_locked(symbol, strategy)
        self.fire_expired(expired)
        return done

    def confirm_fill(
        self,
        order_id: str,
        position: tuple[int, object, int],
        symbol: str,
        fill: tuple[int, int, int],
        strategy: str | None,
    ) -> bool:
        """Set the order's strategy's part of its symbol's position (``position``: units,
        value, kind) and end its reservation as filled, in one step; with a ``fill``
        (``(down, up, kind)`` as for ``reduce``; ``up`` 0: none) reduce it by that instead,
        in the same step.

        With no outstanding reservation, ``strategy``'s part ("" or None: the account's own)
        is still set when ``symbol`` is given. A ``symbol`` or ``strategy`` (None: any) that is
        not the reservation's changes nothing and raises ``ValueError``.
        """
        seq = self.generated_seq(order_id)
        now = self.now()
        units, value, kind = position
        with self._lock:
            # Before the sweep: a fill that lands as its TTL runs out is a fill, not an expiry.
            res = self._find_locked(order_id, seq)
            elsewhere = res is not None and (
                (bool(symbol) and symbol != res._symbol)
                or (strategy is not None and strategy != res._strategy)
            )
            filled = False
            if res is not None and not elsewhere:
                self._set_position_locked(res._symbol, units, value, kind, res._strategy)
                self._fill_locked(res, fill)
                filled = res._state != ACTIVE
            elif res is None and symbol:
                self._set_position_locked(symbol, units, value, kind, strategy or "")
            expired = self._sweep_locked(now)
        if filled and res is not None:
            self._announce_one(res, _BY_FILL)
        self.fire_expired(expired)
        if res is not None and elsewhere:
            raise ValueError(
                f"order_id {order_id!r} is reserved on {res.symbol!r} for strategy="
                f"{res.strategy!r}, not symbol={symbol or None!r}, strategy={strategy!r}"
            )
        return res is not None

    def positions(self, strategy: str) -> dict[str, object]:
        """The account's positions ("": each symbol's parts summed), or ``strategy``'s."""
        with self._lock:
            if strategy:
                scope = self._strategies.get(strategy)
                book = {} if scope is None else scope.book
                return {symbol: pos.value for symbol, pos in book.items()}
            return {
                symbol: self._value_locked(symbol, pos)
                for symbol, pos in self._account.book.items()
            }

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
        self._index[res._order_id or res._seq] = res
        res._held = self._account.add_locked(res._symbol, res._units, res._side)
        if res._strategy:
            scope = res._scope
            if scope is None:
                scope = res._scope = self._scope_locked(res._strategy)
            res._scope_held = scope.add_locked(res._symbol, res._units, res._side)
        res._state = ACTIVE

    def _scope_locked(self, strategy: str) -> _Scope:
        """``strategy``'s figures, made (empty) on first use."""
        scope = self._strategies.get(strategy)
        if scope is None:
            scope = self._strategies[strategy] = _Scope()
        return scope

    def _end_locked(self, res: Reservation, state: int) -> None:
        """Remove an active ``res`` from every index and total; it ends as ``state``."""
        del self._index[res._order_id or res._seq]
        self._account.remove_locked(res._symbol, res._held, res._units, res._side)
        scope = res._scope
        if scope is not None:
            scope.remove_locked(res._symbol, res._scope_held, res._units, res._side)
        res._state = state
        self._epoch += 1

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
        self._shrink_locked(res, units)
        self._epoch += 1
        return units

    def _shrink_locked(self, res: Reservation, units: int) -> None:
        """``res`` holds ``units`` fewer (negative: more) and stays active."""
        res._units -= units
        self._account.shrink_locked(res._symbol, res._held, units, res._side)
        scope = res._scope
        if scope is not None:
            scope.shrink_locked(res._symbol, res._scope_held, units, res._side)

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
        if symbol not in self._account.symbols:
            return []
        return [res for res in self._index.values() if res._symbol == symbol]

    def _release_symbol_locked(self, symbol: str) -> list[Reservation]:
        members = self.on_symbol_locked(symbol)
        for res in members:
            self._end_counted_locked(res, RELEASED)
        return members

    def _set_position_locked(
        self, symbol: str, units: int, value: object, kind: int, strategy: str
    ) -> None:
        """Set ``strategy``'s part ("": the account's own) and the account's sum."""
        old = self._account.book.get(symbol)
        if not strategy:
            total = units if old is None else old.units - old.own + units  # own: 0 if closed
            new = _Position(total, value, kind)
            new.own = units
        else:
            scope = self._scope_locked(strategy)
            part = scope.book.get(symbol)
            scope.put_locked(symbol, _Position(units, value, kind))
            base = 0 if old is None else old.units - (0 if part is None else part.units)
            new = _Position(base + units, None if old is None else old.value, kind)
            new.own_open = old is not None and old.own_open
            new.own = 0 if old is None else old.own
            new.parts = 1 if old is None else old.parts + (part is None)
        if old is not None:
            new.kinds |= old.kinds
            if not strategy:
                new.parts = old.parts
        self._account.put_locked(symbol, new)

    def _close_position_locked(self, symbol: str, strategy: str) -> bool:
        """Close ``strategy``'s part ("": the account's own); the account's symbol closes with
        its last part."""
        account = self._account
        old = account.book.get(symbol)
        if old is None:
            return False
        if not strategy:
            if not old.own_open:
                return False
            removed = old.own
        else:
            scope = self._strategies.get(strategy)
            part = None if scope is None else scope.drop_locked(symbol)
            if part is None:
                return False
            removed = part.units
        parts = old.parts - (1 if strategy else 0)
        own_open = old.own_open and bool(strategy)
        if not parts and not own_open:
            account.drop_locked(symbol)
            return True
        new = _Position(old.units - removed, old.value, old.kinds)
        new.own, new.own_open, new.parts = (old.own if own_open else 0), own_open, parts
        account.put_locked(symbol, new)
        return True

    def _value_locked(self, symbol: str, position: _Position) -> object:
        """The account's position on ``symbol`` as a caller reads it: its one part as given,
        or the sum in the kind of the amounts its parts were given in."""
        if not position.parts:
            return position.value
        if position.parts == 1 and not position.own_open:
            for scope in self._strategies.values():
                part = scope.book.get(symbol)
                if part is not None:
                    return part.value
        return _units.to_number(position.units, position.kinds)

    def _counts_locked(self) -> tuple[int, int, int, int, int]:
        reserved = self._account.reserved
        return (len(self._index), reserved, self._kinds, self._released, self._expired)

    def scope_orders_locked(self) -> dict[str, int]:
        """Each strategy's outstanding reservations (strategies with a scope)."""
        return {name: scope.orders for name, scope in self._strategies.items()}

    def reserved_on_locked(self, symbol: str) -> int:
        held = self._account.symbols.get(symbol)
        return 0 if held is None else held.units

    def sided_symbols(self) -> tuple[str, ...] | list[str]:
        """The symbols with pending buys or sells, read without the lock on purpose: a decision
        on a caller's positions turns theirs into units before the lock, and one that finds a
        symbol sided since reads again (``_excess_over_locked``)."""
        sided = self._account.sided
        return list(sided) if sided else ()

    def _excess_over_locked(self, snapshot: Snapshot) -> int:
        """The account's excess with a caller's positions (read before the lock) in place of
        the book's: a walk of the symbols with pending buys or sells; -1 if one of them is open
        in the read but was not sided when its units were taken (the decision reads again)."""
        excess = 0
        open_, units_of = snapshot.open, snapshot.sided
        account = self._account
        for symbol, sides in account.sided.items():
            if units_of is not None and symbol in units_of:
                units = units_of[symbol]
            elif symbol in open_:
                return -1
            else:
                units = 0
            reserved = account.symbols[symbol].units
            unknown = reserved - sides.buys - sides.sells
            worst = rules.worst_case(units, sides.buys, sides.sells, unknown)
            excess += (units if units >= 0 else -units) + reserved - worst
        return excess

    def _overlap_locked(self, open_: dict[str, object]) -> int:
        """How many reserved symbols are in ``open_`` (walks the smaller of the two)."""
        symbols = self._account.symbols
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
        last = -1
        by_strategy: dict[str, list[Reservation]] = {name: [] for name in self._strategies}
        for key, res in self._index.items():
            if res._state != ACTIVE or res._units <= 0:
                problems.append(f"indexed reservation {res!r} is not active with units left")
            if key != (res._order_id or res._seq):
                problems.append(f"reservation {res!r} is indexed as {key!r}")
            if res._seq <= last:
                problems.append(f"reservation {res!r} is out of stamp order")
            last = res._seq
            if res._strategy:
                if res._scope is not self._strategies.get(res._strategy):
                    problems.append(f"reservation {res!r} is not counted in its strategy")
                by_strategy.setdefault(res._strategy, []).append(res)
            elif res._scope is not None:
                problems.append(f"reservation {res!r} of the account counts in a strategy")
        _audit_scope("", self._account, list(self._index.values()), problems)
        for name, members in by_strategy.items():
            _audit_scope(name, self._strategies.get(name, _Scope()), members, problems)
        _audit_parts(self, problems)
        return problems


def _expect(problems: list[str], what: str, kept: int, recomputed: int) -> None:
    if kept != recomputed:
        problems.append(f"{what}: kept {kept}, recomputed {recomputed}")


def _audit_scope(name: str, scope: _Scope, members: list[Reservation], problems: list[str]) -> None:
    """One scope's running totals recomputed from its reservations and its book."""
    at = f"strategy {name!r}: " if name else ""
    units: dict[str, int] = {}
    orders: dict[str, int] = {}
    sides: dict[str, list[int]] = {}
    kept_units = {symbol: held.units for symbol, held in scope.symbols.items()}
    kept_orders = {symbol: held.orders for symbol, held in scope.symbols.items()}
    for res in members:
        units[res._symbol] = units.get(res._symbol, 0) + res._units
        orders[res._symbol] = orders.get(res._symbol, 0) + 1
        if res._side:
            entry = sides.setdefault(res._symbol, [0, 0])
            entry[res._side - 1] += res._units
    # Every key of both (a total is kept only while positive), not just the kept ones.
    for symbol in sorted(kept_units.keys() | units.keys()):
        kept, recomputed = kept_units.get(symbol, 0), units.get(symbol, 0)
        if kept != recomputed or kept <= 0:
            problems.append(f"{at}{symbol!r} reserved: kept {kept}, recomputed {recomputed}")
        kept, recomputed = kept_orders.get(symbol, 0), orders.get(symbol, 0)
        _expect(problems, f"{at}{symbol!r} orders", kept, recomputed)
    _expect(problems, f"{at}orders", scope.orders, len(members))
    _expect(problems, f"{at}reserved", scope.reserved, sum(units.values()))
    book = scope.book
    _expect(problems, f"{at}book gross", scope.book_gross, sum(p.magnitude for p in book.values()))
    _expect(problems, f"{at}book net", scope.book_net, sum(p.units for p in book.values()))
    _expect(problems, f"{at}symbols open", scope.open, len(set(book) | set(units)))
    excess = 0
    for symbol in sorted(scope.sided.keys() | sides.keys()):
        kept_sides = scope.sided.get(symbol)
        buys, sells = sides.get(symbol, [0, 0])
        if kept_sides is None or (kept_sides.buys, kept_sides.sells) != (buys, sells):
            got = None if kept_sides is None else (kept_sides.buys, kept_sides.sells)
            problems.append(f"{at}{symbol!r} buys, sells: kept {got}, recomputed {(buys, sells)}")
            continue
        reserved = kept_units.get(symbol, 0)
        position = book.get(symbol)
        held = 0 if position is None else position.units
        _expect(problems, f"{at}{symbol!r} position", kept_sides.position, held)
        worst = rules.worst_case(held, buys, sells, reserved - buys - sells)
        _expect(problems, f"{at}{symbol!r} excess", kept_sides.excess, abs(held) + reserved - worst)
        excess += kept_sides.excess
    _expect(problems, f"{at}excess", scope.excess, excess)
    _expect(problems, f"{at}buys", scope.buys, sum(b for b, _ in sides.values()))
    _expect(problems, f"{at}sells", scope.sells, sum(s for _, s in sides.values()))


def _audit_parts(core: LedgerCore, problems: list[str]) -> None:
    """Each of the account's positions against its parts: its own and the strategies'."""
    parts: dict[str, list[int]] = {}
    for scope in core._strategies.values():
        for symbol, position in scope.book.items():
            entry = parts.setdefault(symbol, [0, 0])
            entry[0] += position.units
            entry[1] += 1
    for symbol, position in core._account.book.items():
        summed, count = parts.pop(symbol, [0, 0])
        own = position.own if position.own_open else 0
        if not position.own_open and position.own:
            problems.append(f"{symbol!r}: a closed own part holds {position.own}")
        _expect(problems, f"{symbol!r} position", position.units, summed + own)
        _expect(problems, f"{symbol!r} parts", position.parts, count)
        if not count and not position.own_open:
            problems.append(f"{symbol!r} is open with no part open")
    for symbol in sorted(parts):
        problems.append(f"{symbol!r} is open in a strategy but not in the account")


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
        return _units.check_symbol(symbol) in self._live()._account.symbols

    def __contains__(self, symbol: object) -> bool:
        core = self._live()
        return isinstance(symbol, str) and str.__str__(symbol) in core._account.symbols

    def __len__(self) -> int:
        """Number of outstanding reservations (not symbols)."""
        return len(self._live()._index)

    def __iter__(self) -> Iterator[str]:
        """The symbols with outstanding reservations (a snapshot)."""
        return iter(list(self._live()._account.symbols))

    def gross_notional(self) -> _units.Number:
        """Sum of outstanding reserved notional, in the kind of the amounts reserved."""
        core = self._live()
        return _units.to_number(core._account.reserved, core._kinds)

    def symbol_notional(self, symbol: object) -> _units.Number:
        """Reserved notional outstanding on ``symbol`` (0 if none)."""
        core = self._live()
        return _units.to_number(core.reserved_on_locked(_units.check_symbol(symbol)), core._kinds)

    def new_slots(self, is_open: Callable[[str], object]) -> int:
        """How many reserved symbols are not open, i.e. take a concurrency slot of their own."""
        return sum(1 for symbol in list(self._live()._account.symbols) if not is_open(symbol))

    def reserve(
        self,
        symbol: object,
        notional: object,
        *,
        order_id: object = None,
        side: object = None,
        strategy: object = None,
    ) -> Reservation:
        """Record a reservation of ``notional`` on ``symbol`` for one order.

        ``order_id`` is the client order id (a non-empty str); the ledger makes one if it is not
        given. An ``order_id`` already outstanding raises ``ValueError``. Reservations on one
        symbol add up, but each keeps its own TTL and can be released alone. ``side`` is the
        order's (``Side``, ``"buy"``/``"sell"``, or ``None``: unknown), as in ``try_enter``, and
        ``strategy`` the strategy it counts for (a non-empty str; ``None``: the account's own).
        """
        core = self._live()
        name = _units.check_symbol(symbol)
        units = _units.notional_units("notional", notional)
        code = side_code(side)
        oid = core.check_new_order_id(order_id)
        owner = _units.check_strategy(strategy)
        if oid and oid in core._index:
            raise ValueError(f"order_id {oid!r} already has an outstanding reservation")
        res = Reservation(core, name, oid, notional, units, code, owner)
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

    def ended(self) -> list[Reservation]:
        """What a committed block ended, in order (after the lock is released: the journal is
        this thread's alone once the block is closed)."""
        return [undo.res for undo in self._journal if undo.kind == _ENDED]

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
                core._shrink_locked(res, -undo.units)
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
        if core.listeners.active:
            for res in view.ended():
                how = _BY_RELEASE if res._state == RELEASED else _BY_REDUCTION
                core.announce([res], how)


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

    A decision under a strategy's budget is decided at two scopes: the strategy's limits over
    its own figures (``LedgerCore.scope_locked``), then the account's over everything; a
    denial by the budget comes back as its code plus ``BY_BUDGET``. Each scope with a rate
    limit keeps its recent admissions' stamps (``_Window``).
    """

    __slots__ = (
        "_budgeted",
        "_changes",
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
        "_seen",
        "_timeouts",
        "_timeouts_by",
        "_timeouts_lock",
        "_undated",
        "_window",
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
        self._budgeted: dict[str, _Budgeted] = {}  # each strategy's figures, window, counts
        self._window = _Window()  # the account's recent admissions
        self._seen: tuple[int, LatchRecord | None] = (rules.ACTIVE, None)  # last state told
        self._changes: list[tuple[int, int, LatchRecord | None]] = []  # (was, now, latch) untold
        # Timeouts are counted under a lock of their own: they happen when the ledger's is busy.
        self._timeouts_lock = threading.Lock()
        self._timeouts = 0
        self._timeouts_by: dict[str, int] = {}

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
            self._note_locked()

    def resume(self) -> None:
        """The operator's resume: ACTIVE, the latch cleared, a new measuring period."""
        with self.ledger._lock:
            self._operator = rules.ACTIVE
            self._latch = None
            self._day_pnl = 0
            self._undated = 0
            self._peak = self._equity
            self._note_locked()

    def take_changes(self) -> Sequence[tuple[int, int, LatchRecord | None]]:
        """The changes of state or latch not yet taken, oldest first: ``(was, now, latch)``.
        Read first without the lock: almost always there are none. None inside this thread's
        ``lock()`` block: the lock is held there, and a listener must not run under it (a
        later call outside takes them)."""
        if not self._changes or self.ledger.own_block() is not None:
            return ()  # every decision asks: no list made for nothing
        with self.ledger._lock:
            changes = self._changes
            self._changes = []
        return changes

    def trading(self, wall: float) -> tuple[int, LatchRecord | None]:
        """The effective state and the latch at wall time ``wall`` (-inf: not read); inside
        this thread's ``lock()`` block, as the block sees them (no new day starts there)."""
        if self.ledger.own_block() is not None:
            return self._state_locked(), self._latch
        with self.ledger._lock:
            self._roll_locked(wall)
            self._note_locked()
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
            self._note_locked()

    def set_equity(self, limits: UnitLimits, units: int, kind: int, wall: float) -> None:
        with self.ledger._lock:
            self._start_day_locked(wall)
            if not self._has_equity or units > self._peak:
                self._peak = units
            self._equity = units
            self._has_equity = True
            self._kinds |= kind
            self._check_loss_locked(limits, wall)
            self._note_locked()

    def counts(self) -> GateCounts:
        """Decisions by outcome code, in all and per strategy, with the state, the latch and
        the outstanding reservations per strategy: a consistent snapshot (the state as of the
        last roll)."""
        if self.ledger.own_block() is not None:
            counts = self._counts_locked()
        else:
            with self.ledger._lock:
                counts = self._counts_locked()
        with self._timeouts_lock:
            counts.codes[rules.LOCK_TIMEOUT] = self._timeouts
            for name, timeouts in self._timeouts_by.items():
                counts.by_strategy.setdefault(name, [0] * len(_REASON_SLOTS))
                counts.by_strategy[name][rules.LOCK_TIMEOUT] = timeouts
        return counts

    def _counts_locked(self) -> GateCounts:
        ledger = self.ledger
        by_strategy = {name: list(entry.counts) for name, entry in self._budgeted.items()}
        return GateCounts(
            list(self._counts),
            by_strategy,
            self._state_locked(),
            self._latch,
            len(ledger._index),
            ledger.scope_orders_locked(),
        )

    def count_timeout(self, res: Reservation) -> None:
        """Count a decision on ``res`` denied with ``LOCK_TIMEOUT`` (without the ledger lock:
        it is busy)."""
        strategy = res._strategy
        with self._timeouts_lock:
            self._timeouts += 1
            if strategy:
                self._timeouts_by[strategy] = self._timeouts_by.get(strategy, 0) + 1

    def try_decide(
        self,
        res: Reservation,
        limits: UnitLimits,
        budget: UnitLimits | None,
        now: float,
        wall: float,
        snapshot: Snapshot | None,
    ) -> int:
        """Check the rules and reserve ``res`` if they pass, in one critical section.

        ``budget`` is the limits of ``res``'s strategy (None: the account's own order).
        ``wall`` is the wall clock's reading (-inf when not read: nothing is latched). Returns
        the outcome code (plus ``BY_BUDGET`` for a denial by the budget); ``RETRY`` if
        ``snapshot`` went stale; ``DUPLICATE`` if the order id is
        outstanding already; ``BUSY``, having waited for nothing, if another thread holds the
        lock: the caller waits for it (``LedgerCore.wait_free``), reads the clock again and
        tries again, so no reservation is ever stamped with a reading from before a wait.
        """
        ledger = self.ledger
        if _COMPILED:
            if not ledger._acquire(False):
                return BUSY
            try:
                code, expired = self._sweep_and_decide_locked(
                    res, limits, budget, now, wall, snapshot
                )
            finally:
                ledger._release()
        else:
            held: list[bool] = []
            try:
                _acquire_into(held, ledger._lock, 0.0)
                if not held[0]:
                    return BUSY
                code, expired = self._sweep_and_decide_locked(
                    res, limits, budget, now, wall, snapshot
                )
            finally:
                if held and held[0]:
                    ledger._release()
        ledger.fire_expired(expired)
        return code

    def _sweep_and_decide_locked(
        self,
        res: Reservation,
        limits: UnitLimits,
        budget: UnitLimits | None,
        now: float,
        wall: float,
        snapshot: Snapshot | None,
    ) -> tuple[int, list[Reservation] | None]:
        expired = self.ledger._sweep_locked(now)
        if wall >= self._day_end:
            self._roll_locked(wall)
            self._note_locked()
        return self._decide_locked(res, limits, budget, now, snapshot), expired

    def _decide_locked(
        self,
        res: Reservation,
        limits: UnitLimits,
        budget: UnitLimits | None,
        now: float,
        snapshot: Snapshot | None,
    ) -> int:
        ledger = self.ledger
        state = self._state_locked()
        if snapshot is not None and snapshot.epoch != ledger._epoch and state != rules.HALTED_STATE:
            return RETRY
        if res._order_id and res._order_id in ledger._index:
            return DUPLICATE
        stamp = now if now > ledger._last_stamp else ledger._last_stamp  # as insert_locked
        code = rules.ADMIT
        entry = None
        if budget is not None:
            entry = self._budgeted_locked(res._strategy)
            code = self._rule_locked(res, budget, state, entry.scope, entry.window, stamp, None)
        by_budget = code > rules.HALTED  # the trading state is the account's
        if code == rules.ADMIT:
            code = self._rule_locked(
                res, limits, state, ledger._account, self._window, stamp, snapshot
            )
            if code == RETRY:
                return RETRY
        self._counts[code] += 1
        if entry is not None:
            entry.counts[code] += 1
        if code != rules.ADMIT:
            return code + BY_BUDGET if by_budget else code
        if entry is not None:
            res._scope = entry.scope  # spares the link a lookup
        ledger.insert_locked(res, now)
        if limits.rate_count > rules.NO_LIMIT:
            self._window.add(res._reserved_at)
        if entry is not None and budget is not None and budget.rate_count > rules.NO_LIMIT:
            entry.window.add(res._reserved_at)
        return rules.ADMIT

    def _budgeted_locked(self, strategy: str) -> _Budgeted:
        entry = self._budgeted.get(strategy)
        if entry is None:
            scope = self.ledger._scope_locked(strategy)
            entry = self._budgeted[strategy] = _Budgeted(scope)
        return entry

    def _rule_locked(
        self,
        res: Reservation,
        limits: UnitLimits,
        state: int,
        scope: _Scope,
        window: _Window,
        stamp: float,
        snapshot: Snapshot | None,
    ) -> int:
        """``rules.first_failing_rule`` at one scope: on its book's running totals (no walk of
        anything), or on a caller's positions (the account only); ``RETRY`` if those went
        stale. ``stamp`` is the decision's clock reading, as the reservation would get it."""
        symbol = res._symbol
        held_here = scope.symbols.get(symbol)
        reserved = orders_here = 0
        if held_here is not None:
            reserved, orders_here = held_here.units, held_here.orders
        if snapshot is None:
            position = scope.book.get(symbol)
            open_count = scope.open
            symbol_open = position is not None or reserved > 0
            gross = scope.gross()
            held = 0 if position is None else position.units
            net = scope.book_net
        else:
            open_count, symbol_open, gross = self._read_figures_locked(res, state, snapshot)
            if open_count < 0:
                return RETRY
            held, net = snapshot.held, snapshot.net
        before, after = _worst_cases(scope, symbol, held, reserved, res._units, res._side)
        net_before = net_after = 0
        if rules.uses_net(limits, state):
            net_before, net_after = _net(scope, net, res._units, res._side)
        start = rules.NO_WINDOW
        if limits.rate_count > rules.NO_LIMIT:
            start = window.start(limits.rate_count)
        return rules.first_failing_rule(
            limits,
            state,
            open_count,
            symbol_open,
            gross,
            before,
            after,
            net_before,
            net_after,
            res._units,
            scope.orders,
            orders_here,
            start,
            stamp,
        )

    def _read_figures_locked(
        self, res: Reservation, state: int, snapshot: Snapshot
    ) -> tuple[int, bool, int]:
        """The account's open count, whether ``res``'s symbol is open and its gross, with a
        caller's positions read before the lock; -1 as the count if the read went stale.

        A symbol open in the read and not reserved may have closed since, and its slot been
        taken by another entry: an order of unknown side on it is decided as if it had, needing
        a slot beside the others. An order with a side is decided on the read as it is: sides
        rest on a cache that changes only by fills handed over in one step (module notes), so a
        reducing order needs no slot, in ``REDUCING`` too."""
        ledger = self.ledger
        account = ledger._account
        vouched = res._symbol in account.symbols  # reserved
        open_ = snapshot.open
        count = len(open_) + len(account.symbols) - ledger._overlap_locked(open_)
        vouched = vouched or (snapshot.holds and res._side != rules.UNKNOWN_SIDE)
        if not vouched and snapshot.holds:
            count -= 1
        excess = ledger._excess_over_locked(snapshot) if account.sided else 0
        if excess < 0:  # a symbol sided since the read: read again, unless halted (denied)
            if state != rules.HALTED_STATE:
                return -1, False, 0
            excess = 0
        return count, vouched, snapshot.gross + account.reserved - excess

    # ---------------------------------------------------------------- the loss book (locked)

    def _note_locked(self) -> None:
        """Queue a change of the effective state or the latch since the last one noted."""
        state, latch = self._state_locked(), self._latch
        was, was_latch = self._seen
        if state != was or latch is not was_latch:
            self._changes.append((was, state, latch))
            self._seen = (state, latch)

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
BY_BUDGET: Final = 100
"""Added to the outcome code of a decision the strategy's budget denied (see GateCore)."""


def _worst_cases(
    scope: _Scope, symbol: str, position: int, reserved: int, units: int, side: int
) -> tuple[int, int]:
    """The symbol's worst case in ``scope`` before and after an order of ``units`` on
    ``side``, given its signed ``position`` and ``reserved`` units."""
    sides = scope.sided.get(symbol) if scope.sided else None
    if side == rules.UNKNOWN_SIDE and sides is None:
        # Nothing sided on the symbol: its worst case is |position| + reserved, which this
        # order of unknown side raises by all of it (rules.worst_case, summed by hand).
        before = (position if position >= 0 else -position) + reserved
        return before, before + units
    buys, sells = (0, 0) if sides is None else (sides.buys, sides.sells)
    return rules.worst_cases(position, buys, sells, reserved - buys - sells, side, units)


def _net(scope: _Scope, position: int, units: int, side: int) -> tuple[int, int]:
    """``scope``'s net worst case before and after an order of ``units`` on ``side``, given
    the book's net ``position``."""
    buys, sells = scope.buys, scope.sells
    unknown = scope.reserved - buys - sells
    if side == rules.UNKNOWN_SIDE and not buys and not sells:
        before = (position if position >= 0 else -position) + unknown  # as above
        return before, before + units
    return rules.worst_cases(position, buys, sells, unknown, side, units)


class _Window:
    """A scope's most recent admissions' stamps, at most the rate limit's count of them, so
    the oldest kept is the one a full window starts at: O(1) a decision. A count that changes
    keeps the stamps there are (a raised count counts only those kept so far)."""

    __slots__ = ("stamps",)

    def __init__(self) -> None:
        self.stamps: deque[float] = deque(maxlen=1)

    def start(self, count: int) -> float:
        """The stamp of the ``count``-th most recent admission, or ``rules.NO_WINDOW``."""
        stamps = self.stamps
        if stamps.maxlen != count:
            stamps = self.stamps = deque(stamps, maxlen=count)
        return stamps[0] if len(stamps) == count else rules.NO_WINDOW

    def add(self, stamp: float) -> None:
        self.stamps.append(stamp)


class _Budgeted:
    """What a gate keeps for one strategy it decides for: the strategy's figures (the
    ledger's, shared by every gate), its recent admissions and its counts by outcome code."""

    __slots__ = ("counts", "scope", "window")

    def __init__(self, scope: _Scope) -> None:
        self.scope = scope
        self.window = _Window()
        self.counts = [0] * len(_REASON_SLOTS)


class GateCounts:
    """A snapshot of a gate's counts (``GateCore.counts``): ``codes`` by outcome code
    (``[0]``: admitted), ``by_strategy`` the same per strategy, the state and latch, and the
    outstanding reservations in all and per strategy."""

    __slots__ = ("by_strategy", "codes", "latch", "orders", "orders_by", "state")

    def __init__(
        self,
        codes: list[int],
        by_strategy: dict[str, list[int]],
        state: int,
        latch: LatchRecord | None,
        orders: int,
        orders_by: dict[str, int],
    ) -> None:
        self.codes = codes
        self.by_strategy = by_strategy
        self.state = state
        self.latch = latch
        self.orders = orders
        self.orders_by = orders_by
