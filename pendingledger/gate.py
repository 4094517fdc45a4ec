"""The portfolio gate: check-and-reserve against open positions plus outstanding reservations.

``PortfolioGate.try_enter`` decides and, when it admits, reserves in the same critical section of
the ledger lock, so no other thread can be admitted on the strength of the same room.

Where positions are read, and why the decision is still made "under the lock"
-----------------------------------------------------------------------------
Work that needs a function call (reading and validating positions, converting amounts to exact
integers, building the reservation) is done *before* the lock is taken where it can be, because a
call inside the critical section lets CPython switch threads while the lock is held and
contending threads then queue behind it (a lock convoy). The critical section itself is only
comparisons, int arithmetic and dict stores. Three sources of positions:

* the gate's **owned book** (``positions=None``, kept by ``set_position``/``confirm_fill`` under
  the ledger lock) is read under the lock: its figures are kept as running ints, so reading them
  takes no call;
* a **mapping** is read (snapshot, exact sums) before the lock, optimistically, as below; an
  empty dict needs no reading, but the version check still applies to it;
* a **callable** is called once, under the ledger lock, as the contract promises a callable
  (it may read a cache that needs its own lock to snapshot). Keep it to a copy of a dict.

The optimistic read keeps the guarantee of a decision made entirely under the lock:

1. ``try_enter`` reads the ledger's ``_version`` first, then reads the positions.
2. Every change to reservations or the owned book (reserve, release, reduce, expiry, rescale,
   set/close position) bumps ``_version`` under the lock, after the change.
3. The commit, under the lock, proceeds only if ``_version`` is unchanged and nothing is due to
   expire; otherwise it recomputes (when expiry is due, or after a few failed attempts, it
   decides wholly under the lock instead, so a thread cannot starve).

The fill router updates the position cache *before* it releases a reservation (the documented
hand-off). So if a fill's position was missing from the positions we read, its release happened
after our read, hence after our version read, and the commit fails and retries: at commit time
every reservation missing from the ledger has its position in what we read. Reservations made by
other threads in between also bump the version, so the counts used at commit (reserved symbols,
the reserved symbols already open) are exact, not merely conservative. A position closed after our
read is still counted: that over-blocks, the safe direction. ``tests/test_stress.py`` keeps a
broken variant (check and reserve in separate critical sections) to show the stress harness
catches breaches.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from . import _amounts
from .errors import ReentrantLockError
from .ledger import _FILLED, Number, PendingEntryLedger, Reservation, _check_order_id
from .limits import DENIED, Decision, DenyReason, PortfolioLimits

if TYPE_CHECKING:
    from .protocols import Gate

__all__ = ["GateStats", "PortfolioGate", "Positions"]

# Keys are Any, not Hashable: Mapping is invariant in its key type, and dict[str, float] (the
# usual position cache) must type-check as it is.
Positions = Mapping[Any, Number] | Callable[[], Mapping[Any, Number]]
"""Open positions: symbol -> exposure (its absolute value counts; a key present means open),
or a zero-argument callable returning such a mapping."""

_INF: Final = float("inf")
_get_ident: Final = threading.get_ident
_OPTIMISTIC_ATTEMPTS: Final = 4
_NOT_INDEXED: Final = object()  # never a key of the ledger's order index
# How try_enter reads positions (ordered: the first two are gathered under the lock, no call).
_READ_OWNED: Final = 0
_READ_EMPTY: Final = 1
_READ_MAPPING: Final = 2
_READ_SLOW: Final = 3
# The optimistic read (module docstring) relies on the GIL making a plain read of the ledger's
# attributes see whole updates; on a free-threaded build every decision takes the locked path.
_GIL: Final[bool] = getattr(sys, "_is_gil_enabled", lambda: True)()
_KIND_FLOAT: Final = _amounts.KIND_FLOAT
_KIND_INT: Final = _amounts.KIND_INT

# Outcome codes of the critical section. Ints, not DenyReason: hashing an Enum member is a call.
_ADMIT: Final = 0
_HALTED: Final = 1
_MAX_POSITIONS: Final = 2
_MAX_GROSS: Final = 3
_MAX_SYMBOL: Final = 4
_DUPLICATE: Final = 5
_REASONS: Final = (
    None,
    DenyReason.HALTED,
    DenyReason.MAX_CONCURRENT_POSITIONS,
    DenyReason.MAX_GROSS_EXPOSURE,
    DenyReason.MAX_SYMBOL_EXPOSURE,
)

# The shared denied decision of outcome code c is _DENIED_AT[c - 1] (no Enum hashing).
_DENIED_AT: Final[tuple[Decision, ...]] = tuple(DENIED[r] for r in _REASONS if r is not None)

# (limits, den, max positions, gross limit over den, symbol limit over den); a limit not set is
# infinity, so the critical section tests every rule with one comparison
_ScaledLimits = tuple[PortfolioLimits, int, "int | float", "int | float", "int | float"]
# (n, max_pos, n_open, reserved&open, symbol open, open gross, gross limit, symbol open exposure,
#  symbol limit) -- everything the critical section needs, as ints over the ledger's _den
_Inputs = tuple[int, "int | float", int, int, bool, int, "int | float", int, "int | float"]


@dataclass(frozen=True)
class GateStats:
    """Running counts of a gate's decisions (a snapshot)."""

    admitted: int
    denied: Mapping[DenyReason, int]

    @property
    def decisions(self) -> int:
        return self.admitted + sum(self.denied.values())


class PortfolioGate:
    """Portfolio limits enforced with check-and-reserve on a ``PendingEntryLedger``.

    A decision sees the open positions plus every outstanding reservation, and the entry it admits
    is reserved before any other thread can decide. Rules, first failure wins:

    1. ``HALTED`` while ``halt()`` is in force.
    2. ``MAX_CONCURRENT_POSITIONS``: the symbol is neither open nor reserved and open positions
       plus reserved symbols that are not open already reach the limit.
    3. ``MAX_GROSS_EXPOSURE``: ``sum(|exposure|) + reserved gross + notional > limit``.
    4. ``MAX_SYMBOL_EXPOSURE``: the symbol's ``|exposure| + its reserved + notional > limit``.

    Thread-safe; one gate per ledger is the usual set-up (several gates on one ledger share its
    reservations, each with its own limits and counters).
    """

    __slots__ = ("_admitted", "_denied", "_halted", "_ledger", "_limits", "_scaled")

    def __init__(self, ledger: PendingEntryLedger, limits: PortfolioLimits) -> None:
        if not isinstance(ledger, PendingEntryLedger):
            raise TypeError(f"ledger must be a PendingEntryLedger, got {ledger!r}")
        self._ledger = ledger
        self._limits = _check_limits(limits)
        self._scaled: _ScaledLimits | None = None
        self._halted = False
        self._admitted = 0
        self._denied = [0] * len(_REASONS)  # indexed by outcome code; [0] unused

    @property
    def ledger(self) -> PendingEntryLedger:
        return self._ledger

    @property
    def limits(self) -> PortfolioLimits:
        """The limits in force. Assign a new ``PortfolioLimits`` at any time: each decision reads
        the attribute once, so it uses either the old set or the new one, never a mixture."""
        return self._limits

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None:
        self._limits = _check_limits(limits)

    @property
    def halted(self) -> bool:
        return self._halted

    def halt(self) -> None:
        """Deny every entry with ``DenyReason.HALTED`` until ``resume()``.

        Outstanding reservations stay and end as usual.
        """
        self._halted = True

    def resume(self) -> None:
        self._halted = False

    def stats(self) -> GateStats:
        """Counts of admitted and denied decisions (every ``DenyReason`` is a key).

        Works inside a ``lock()`` block of the same thread too (the counts are read in place).
        """
        ledger = self._ledger
        if ledger._owner == _get_ident():
            admitted, counts = self._admitted, list(self._denied)
        else:
            with ledger._lock:
                admitted = self._admitted
                counts = self._denied[:]
        denied = dict.fromkeys(DenyReason, 0)
        for code, reason in enumerate(_REASONS):
            if reason is not None:
                denied[reason] = counts[code]
        return GateStats(admitted=admitted, denied=MappingProxyType(denied))

    # ------------------------------------------------------------------ the owned position book

    def set_position(self, symbol: Hashable, exposure: Number) -> None:
        """Open ``symbol`` in the gate's own position book, or update its exposure.

        Used by ``try_enter(..., positions=None)``. The absolute value counts; 0 is an open
        position with no exposure (it still holds a concurrency slot). Updated under the ledger
        lock, so a decision sees the book and the reservations in one state.
        """
        _amounts.check_symbol(symbol)
        num, q = _amounts.exact_ratio("exposure", exposure)
        with self._ledger._guard():
            self._ledger._set_position_locked(symbol, num, q, exposure)

    def close_position(self, symbol: Hashable) -> bool:
        """Remove ``symbol`` from the owned book; True if it was open."""
        _amounts.check_symbol(symbol)
        with self._ledger._guard():
            return self._ledger._close_position_locked(symbol)

    def confirm_fill(
        self, order_id: Hashable, position_exposure: Number, *, symbol: Hashable | None = None
    ) -> bool:
        """Record a fill: set its symbol's position to ``position_exposure`` and end the order's
        reservation, in one step under the lock (the safe hand-off, with no gap at all).

        Returns True if the reservation was outstanding (it ends as FILLED). If it already ended
        (expired, released), the position is still recorded when ``symbol`` is given, so a late
        fill is never lost; without ``symbol`` nothing changes and False is returned.
        """
        _amounts.check_order_id(order_id)
        if symbol is not None:
            _amounts.check_symbol(symbol)
        num, q = _amounts.exact_ratio("position_exposure", position_exposure)
        ledger = self._ledger
        with ledger._guard():
            res = ledger._outstanding(order_id)
            if res is None:
                if symbol is not None:
                    ledger._set_position_locked(symbol, num, q, position_exposure)
                return False
            if symbol is not None and symbol != res._symbol:
                raise ValueError(
                    f"order_id {order_id!r} is reserved on {res._symbol!r}, not symbol={symbol!r}"
                )
            ledger._set_position_locked(res._symbol, num, q, position_exposure)
            ledger._end_locked(res, _FILLED)
            ledger._n_released += 1
            return True

    def positions(self) -> dict[Hashable, Number]:
        """A snapshot of the owned book: symbol -> exposure as it was set."""
        with self._ledger._read_guard():
            return {symbol: position[1] for symbol, position in self._ledger._book.items()}

    def release(self, symbol: Hashable) -> bool:
        """``ledger.release(symbol)``: drop every reservation on ``symbol``."""
        return self._ledger.release(symbol)

    def release_order(self, order_id: Hashable) -> bool:
        """``ledger.release_order(order_id)``: drop that order's reservation."""
        return self._ledger.release_order(order_id)

    # ------------------------------------------------------------------ the decision

    def try_enter(
        self,
        symbol: Hashable,
        notional: Number,
        positions: Positions | None = None,
        *,
        order_id: Hashable | None = None,
    ) -> Decision:
        """Check the limits and, if they pass, reserve ``notional`` on ``symbol``, atomically.

        ``positions`` is one of: ``None`` (the default) for the gate's own book, kept with
        ``set_position``/``close_position``/``confirm_fill``; a mapping of each open symbol to its
        exposure; or a zero-argument callable returning such a mapping, called once under the
        ledger lock. The returned ``Decision`` is truthy when admitted and then carries the
        ``Reservation``: release it on an exchange reject; release it (or its symbol), or
        ``confirm_fill`` it, once the fill is in the positions; otherwise it expires after the
        ledger's TTL.

        Bad arguments raise ``ValueError``/``TypeError`` and change nothing; so does an
        ``order_id`` that already has an outstanding reservation, and so does a NaN exposure in
        ``positions`` (fail closed). An exception from a ``positions`` callable propagates with
        nothing reserved.
        """
        # Validate everything before the lock; nothing after the commit may raise.
        if type(symbol) is not str or not symbol:
            _amounts.check_symbol(symbol)
        if type(notional) is float and 0.0 < notional < _INF:
            num, q = notional.as_integer_ratio()
            kind = _KIND_FLOAT
        elif type(notional) is int and notional > 0:
            num, q, kind = notional, 1, _KIND_INT
        else:
            num, q, kind = _amounts.positive_ratio("notional", notional)
        if order_id is not None and type(order_id) is not str:
            _check_order_id(order_id)  # None: the id is generated when asked for
        # What the duplicate test looks up: a generated id is never indexed, so it looks up a
        # private object no key can equal (not None, which a caller's odd __eq__ might match).
        id_key = _NOT_INDEXED if order_id is None else order_id
        ledger = self._ledger
        owner = ledger._owner
        if owner is not None and owner == _get_ident():
            raise ReentrantLockError("try_enter called while this thread holds the ledger lock")
        now = ledger._clock()
        if type(now) is not float or not -_INF < now < _INF:  # comparisons only: no call
            now = ledger._check_clock(now)
        res = object.__new__(Reservation)  # inlined _new_reservation(): one call fewer
        res._ledger = ledger
        res._symbol = symbol
        res._order_id = order_id
        res._initial = notional
        res._state = 0
        lock = ledger._locked
        syms = ledger._syms
        orders = ledger._orders
        book = ledger._book
        expired: list[Reservation] | None = None
        inputs: _Inputs | None = None
        version = 0
        # How this decision reads positions (module docstring): the owned book under the lock;
        # an empty dict before the lock, checked by the version; any other mapping before the
        # lock, checked by the version; a callable, or a mapping on a free-threaded build, under
        # the lock with calls (the slow path, which is also the fallback for the rest).
        if positions is None:
            read = _READ_OWNED
        elif _GIL and (type(positions) is dict or not callable(positions)):
            read = _READ_MAPPING
        else:
            read = _READ_SLOW
        attempts = 0
        try:
            while True:
                limits = self._limits
                if _READ_OWNED < read < _READ_SLOW:  # an empty dict, or another mapping
                    version = ledger._version  # before the positions: see the module docstring
                    if type(positions) is dict and not positions:
                        read = _READ_EMPTY
                    else:
                        read = _READ_MAPPING
                        inputs = self._gather(positions, symbol, limits, num, q, grow=False)
                        if inputs is None:
                            read = _READ_SLOW
                ok = False
                # The branches below are ordered so that a common decision (admitted, a caller's
                # order id, the first reservation on its symbol, the owned book) only ever falls
                # through them: on CPython 3.10 a *taken* conditional jump is a point where the
                # thread may be switched out, here with the lock held (a lock convoy; later
                # CPythons switch only at calls and backward jumps). Hence `if x: pass / else:`
                # and nested rules instead of an elif chain. benchmarks/takenjumps.py (run with
                # 3.10) lists the jumps still taken; benchmarks/lockcheck.py every candidate.
                with lock:
                    if read != _READ_SLOW:
                        if read <= _READ_EMPTY:
                            # Nothing to gather but the ledger's own figures: read them here,
                            # where they cannot change, with no call. Anything unusual (limits
                            # to scale, the denominator to widen, expiry due) retries at once on
                            # the slow path.
                            scaled = self._scaled
                            den = ledger._den
                            if (
                                scaled is not None
                                and scaled[0] is limits
                                and scaled[1] == den
                                and not den % q
                                and now < ledger._next_expiry
                            ):
                                n = num * (den // q)
                                max_pos, g_lim, s_lim = scaled[2], scaled[3], scaled[4]
                                if read == _READ_OWNED:
                                    ok = True
                                    n_open = ledger._nbook
                                    inter = ledger._open_reserved
                                    pos_gross = ledger._book_gross
                                    if symbol not in book:
                                        sym_open = False
                                        sym_pos = 0
                                    else:
                                        sym_open = True
                                        sym_pos = book[symbol][0]
                                elif ledger._version == version:
                                    ok = True
                                    n_open = inter = pos_gross = sym_pos = 0
                                    sym_open = False
                            else:
                                read = _READ_SLOW
                        elif ledger._version == version and now < ledger._next_expiry:
                            ok = True
                            (
                                n,
                                max_pos,
                                n_open,
                                inter,
                                sym_open,
                                pos_gross,
                                g_lim,
                                sym_pos,
                                s_lim,
                            ) = inputs  # type: ignore[misc]
                        elif now >= ledger._next_expiry:
                            read = _READ_SLOW  # the sweep makes calls: decide under the lock
                    else:
                        ledger._owner = _get_ident()
                        try:
                            if now >= ledger._next_expiry:
                                expired = ledger._sweep_locked(now)
                            inputs = self._gather(positions, symbol, limits, num, q, grow=True)
                        finally:
                            ledger._owner = None
                        ok = True
                        # The same unpack as on the mapping path, on purpose: one shared unpack
                        # after both would need a test that the owned path jumps over, a taken
                        # branch under the lock on CPython 3.10.
                        (
                            n,
                            max_pos,
                            n_open,
                            inter,
                            sym_open,
                            pos_gross,
                            g_lim,
                            sym_pos,
                            s_lim,
                        ) = inputs  # type: ignore[misc]
                    if ok:
                        # ---- the critical section proper: no calls from here on ----
                        if symbol not in syms:
                            entry = None
                            sym_res = 0
                        else:
                            entry = syms[symbol]
                            sym_res = entry[1]
                        # The rules in order, first failure wins; a limit that is not set is
                        # infinity, so every test is one comparison.
                        if id_key not in orders:
                            if not self._halted:
                                if (
                                    entry is not None
                                    or sym_open
                                    or n_open + ledger._nsyms - inter < max_pos
                                ):
                                    if pos_gross + ledger._gross + n <= g_lim:
                                        if sym_pos + sym_res + n <= s_lim:
                                            outcome = _ADMIT
                                        else:
                                            outcome = _MAX_SYMBOL
                                    else:
                                        outcome = _MAX_GROSS
                                else:
                                    outcome = _MAX_POSITIONS
                            else:
                                outcome = _HALTED
                        else:
                            outcome = _DUPLICATE
                        if outcome == _ADMIT:
                            # Inlined PendingEntryLedger._insert_locked(res).
                            seq = ledger._seq
                            ledger._seq = seq + 1
                            res._n = n
                            res._seq = seq
                            # Never stamp earlier than the last reservation: deadlines must stay
                            # in seq order for the sweep (the clock was read before the lock).
                            stamp = ledger._last_stamp
                            if now > stamp:  # max() would be a call under the lock
                                stamp = ledger._last_stamp = now
                            res._reserved_at = stamp
                            # _next_expiry needs no update (ledger.py's notes).
                            ledger._queue[seq] = res
                            if order_id is not None:  # a caller's id (the usual case)
                                orders[order_id] = res
                            if entry is None:
                                res._sym_prev = res._sym_next = None
                                syms[symbol] = [1, n, res]
                                ledger._nsyms += 1
                                ledger._open_reserved += symbol in book  # a bool: no branch
                            else:
                                first = entry[2]
                                res._sym_prev = None
                                res._sym_next = first
                                first._sym_prev = res
                                entry[2] = res
                                entry[0] += 1
                                entry[1] = sym_res + n
                            ledger._gross += n
                            ledger._kinds |= kind
                            ledger._version += 1
                            self._admitted += 1
                        elif outcome != _DUPLICATE:
                            self._denied[outcome] += 1
                        # ---- end of the critical section proper ----
                if ok:
                    break
                if read != _READ_SLOW:
                    # Another thread changed the ledger since the version was read: read again,
                    # and after a few tries decide under the lock so nobody starves.
                    attempts += 1
                    if attempts >= _OPTIMISTIC_ATTEMPTS:
                        read = _READ_SLOW
        finally:
            if expired:
                ledger._fire_expired(expired)
        if outcome == _ADMIT:
            decision = object.__new__(Decision)
            decision._reason = None
            decision._reservation = res
            return decision
        if outcome == _DUPLICATE:
            raise ValueError(f"order_id {order_id!r} already has an outstanding reservation")
        return _DENIED_AT[outcome - 1]

    def _gather(
        self,
        positions: Positions | None,
        symbol: Hashable,
        limits: PortfolioLimits,
        num: int,
        q: int,
        *,
        grow: bool,
    ) -> _Inputs | None:
        """Everything the critical section needs, as ints over the ledger's denominator.

        With ``grow`` (lock held) the denominator is widened as needed; without it, None means
        it would have to be, and the caller retries under the lock.
        """
        ledger = self._ledger
        if positions is None:
            return self._gather_owned(symbol, limits, num, q, grow=grow)
        if type(positions) is dict:
            book: Mapping[Any, Number] = positions
        else:
            book = positions() if callable(positions) else positions
            if type(book) is not dict and not isinstance(book, Mapping):
                raise TypeError(
                    "positions must be a mapping of symbol to exposure (or return one), "
                    f"got {book!r}"
                )
        # A snapshot: the caller's dict may be changed by another thread while we read it.
        snapshot = dict(book) if book else {}
        if snapshot:
            g_num, g_den = _amounts.abs_sum(snapshot.items(), "positions")
        else:
            g_num, g_den = 0, 1
        sym_open = symbol in snapshot
        if sym_open:
            s_num, s_den = _amounts.abs_sum(((symbol, snapshot[symbol]),), "positions")
        else:
            s_num, s_den = 0, 1
        if grow:
            ledger._ensure_den_locked(math.lcm(q, g_den, s_den, *_limit_denominators(limits)))
        den = ledger._den
        scaled = self._scaled
        if scaled is None or scaled[0] is not limits or scaled[1] != den:
            scaled = self._scaled_limits(limits, den)
        if scaled is None or den % q or den % g_den or den % s_den:
            return None  # the ledger's denominator must grow first: under the lock
        max_pos = scaled[2]
        # Reserved symbols that are open (read without the lock: the version check covers it).
        inter = 0
        if max_pos != _INF and snapshot:
            # One lookup per open symbol in the live dict: safe while other threads change it
            # (iterating it is not: a Python-level __hash__ lets a resize happen mid-walk).
            inter = sum(map(ledger._syms.__contains__, snapshot))
        return (
            num * (den // q),
            max_pos,
            len(snapshot),
            inter,
            sym_open,
            g_num * (den // g_den),
            scaled[3],
            s_num * (den // s_den),
            scaled[4],
        )

    def _gather_owned(
        self, symbol: Hashable, limits: PortfolioLimits, num: int, q: int, *, grow: bool
    ) -> _Inputs | None:
        """``_gather`` for the owned book: its figures are kept over ``_den`` by the ledger."""
        ledger = self._ledger
        if grow:
            ledger._ensure_den_locked(math.lcm(q, *_limit_denominators(limits)))
        den = ledger._den
        scaled = self._scaled_limits(limits, den)
        n = _amounts.scale_to((num, q), den)
        if scaled is None or n is None:
            return None
        position = ledger._book.get(symbol)
        return (
            n,
            scaled[2],
            ledger._nbook,
            ledger._open_reserved,
            position is not None,
            ledger._book_gross,
            scaled[3],
            0 if position is None else position[0],
            scaled[4],
        )

    def _scaled_limits(self, limits: PortfolioLimits, den: int) -> _ScaledLimits | None:
        scaled = self._scaled
        if scaled is None or scaled[0] is not limits or scaled[1] != den:
            scaled = _scale_limits(limits, den)
            if scaled is not None:
                self._scaled = scaled
        return scaled


def _check_limits(limits: object) -> PortfolioLimits:
    if not isinstance(limits, PortfolioLimits):
        raise TypeError(f"limits must be a PortfolioLimits, got {limits!r}")
    return limits


def _limit_denominators(limits: PortfolioLimits) -> tuple[int, int]:
    g = _amounts.limit_ratio("max_gross_exposure", limits.max_gross_exposure)
    s = _amounts.limit_ratio("max_symbol_exposure", limits.max_symbol_exposure)
    return (1 if g is None else g[1], 1 if s is None else s[1])


def _scale_limits(limits: PortfolioLimits, den: int) -> _ScaledLimits | None:
    """The limits over ``den``, a limit not set as infinity (an int compares with it, no call);
    None if ``den`` is not a multiple of a limit's denominator."""
    scaled: list[int | float] = []
    for name in ("max_gross_exposure", "max_symbol_exposure"):
        ratio = _amounts.limit_ratio(name, getattr(limits, name))
        if ratio is None:
            scaled.append(_INF)
            continue
        value = _amounts.scale_to(ratio, den)
        if value is None:
            return None
        scaled.append(value)
    max_pos = limits.max_concurrent_positions
    return (limits, den, _INF if max_pos is None else max_pos, scaled[0], scaled[1])


if TYPE_CHECKING:  # mypy proves PortfolioGate offers the whole backend-neutral surface.

    def _conforms(gate: PortfolioGate) -> Gate:
        return gate
