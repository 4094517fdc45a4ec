"""The portfolio gate: check-and-reserve against open positions plus outstanding reservations.

``PortfolioGate.try_enter`` decides and, when it admits, reserves in the same critical section of
the ledger lock, so no other thread can be admitted on the strength of the same room.

How the decision stays correct while reading positions outside the lock
-------------------------------------------------------------------------
Work that needs a function call (reading and validating ``positions``, converting amounts to
exact integers, building the reservation) is done *before* the lock is taken, because a call
inside the critical section lets CPython switch threads while the lock is held and contending
threads then queue behind it (a lock convoy). The critical section itself is only comparisons,
int arithmetic and dict stores. To keep the guarantee of a decision made entirely under the lock:

1. ``try_enter`` reads the ledger's ``_version`` first, then reads ``positions``.
2. Every change to the reservations (reserve, release, reduce, expiry, rescale) bumps ``_version``
   under the lock.
3. The commit, under the lock, proceeds only if ``_version`` is unchanged and nothing is due to
   expire; otherwise it recomputes (after a few failed attempts it falls back to doing the whole
   decision under the lock, calling ``positions`` there, so a thread cannot starve).

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
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from . import _amounts
from .errors import ReentrantLockError
from .ledger import (
    Number,
    PendingEntryLedger,
    Reservation,
    _GeneratedOrderId,
    _new_reservation,
)
from .limits import DENIED, Decision, DenyReason, PortfolioLimits

__all__ = ["GateStats", "PortfolioGate", "Positions"]

Positions = Mapping[Hashable, Number] | Callable[[], Mapping[Hashable, Number]]
"""Open positions: symbol -> exposure (its absolute value counts; a key present means open),
or a zero-argument callable returning such a mapping."""

_INF: Final = float("inf")
_get_ident: Final = threading.get_ident
_OPTIMISTIC_ATTEMPTS: Final = 4

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

# (limits, den, max positions, gross limit over den, symbol limit over den)
_ScaledLimits = tuple[PortfolioLimits, int, "int | None", "int | None", "int | None"]
# (n, max_pos, n_open, reserved&open, symbol open, open gross, gross limit, symbol open exposure,
#  symbol limit) -- everything the critical section needs, as ints over the ledger's _den
_Inputs = tuple[int, "int | None", int, int, bool, int, "int | None", int, "int | None"]


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
        """Counts of admitted and denied decisions (every ``DenyReason`` is a key)."""
        with self._ledger._lock:
            admitted = self._admitted
            counts = list(self._denied)
        denied = dict.fromkeys(DenyReason, 0)
        for code, reason in enumerate(_REASONS):
            if reason is not None:
                denied[reason] = counts[code]
        return GateStats(admitted=admitted, denied=MappingProxyType(denied))

    def try_enter(
        self,
        symbol: Hashable,
        notional: Number,
        positions: Positions,
        *,
        order_id: Hashable | None = None,
    ) -> Decision:
        """Check the limits and, if they pass, reserve ``notional`` on ``symbol``, atomically.

        ``positions`` maps each open symbol to its exposure, or is a zero-argument callable
        returning that mapping (read after the ledger's version, see the module docstring; it may
        be called again if the commit has to retry, and on the last resort under the lock). The
        returned ``Decision`` is truthy when admitted and then carries the ``Reservation``: release
        it on an exchange reject; release it (or its symbol) once the fill is in the position
        cache; otherwise it expires after the ledger's TTL.

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
            kind = _amounts.KIND_FLOAT
        elif type(notional) is int and notional > 0:
            num, q, kind = notional, 1, _amounts.KIND_INT
        else:
            num, q, kind = _amounts.positive_ratio("notional", notional)
        if order_id is None:
            order_id = _GeneratedOrderId()
        else:
            _amounts.check_order_id(order_id)
        if positions is None:
            raise TypeError("positions must be a mapping of open positions or a callable, got None")

        ledger = self._ledger
        owner = ledger._owner
        if owner is not None and owner == _get_ident():
            raise ReentrantLockError("try_enter called while this thread holds the ledger lock")
        now = ledger._clock()
        res = _new_reservation(ledger, symbol, order_id, notional, kind, 0)
        lock = ledger._lock
        syms = ledger._syms
        ttl = ledger._ttl
        expired: list[Reservation] | None = None
        pessimistic = False
        attempts = 0
        version = -1
        inputs: _Inputs | None = None
        try:
            while True:
                limits = self._limits
                if not pessimistic:
                    version = ledger._version
                    inputs = self._gather(positions, symbol, limits, num, q, grow=False)
                    pessimistic = inputs is None
                with lock:
                    if pessimistic:
                        ledger._owner = _get_ident()
                        try:
                            if now >= ledger._next_expiry:
                                expired = ledger._sweep_locked(now)
                            inputs = self._gather(positions, symbol, limits, num, q, grow=True)
                        finally:
                            ledger._owner = None
                        ok = True
                    else:
                        ok = ledger._version == version and now < ledger._next_expiry
                    if ok:
                        # ---- the critical section proper: no calls below this line ----
                        n, max_pos, n_open, inter, sym_open, pos_gross, g_lim, sym_pos, s_lim = (
                            inputs  # type: ignore[misc]
                        )
                        if symbol in syms:
                            entry = syms[symbol]
                            sym_res = entry[1]
                        else:
                            entry = None
                            sym_res = 0
                        if order_id in ledger._orders:
                            outcome = _DUPLICATE
                        elif self._halted:
                            outcome = _HALTED
                        elif (
                            max_pos is not None
                            and entry is None
                            and not sym_open
                            and n_open + ledger._nsyms - inter >= max_pos
                        ):
                            outcome = _MAX_POSITIONS
                        elif g_lim is not None and pos_gross + ledger._gross + n > g_lim:
                            outcome = _MAX_GROSS
                        elif s_lim is not None and sym_pos + sym_res + n > s_lim:
                            outcome = _MAX_SYMBOL
                        else:
                            outcome = _ADMIT
                            # Inlined PendingEntryLedger._stamp_locked + _insert_locked.
                            seq = ledger._seq
                            ledger._seq = seq + 1
                            stamp = ledger._last_now
                            if now > stamp:  # max() would be a call under the lock
                                stamp = now
                                ledger._last_now = now
                            res._n = n
                            res._seq = seq
                            res._reserved_at = stamp
                            res._deadline = stamp + ttl
                            ledger._orders[order_id] = res
                            ledger._queue[seq] = res
                            if entry is None:
                                syms[symbol] = [1, n, {order_id: res}]
                                ledger._nsyms += 1
                            else:
                                entry[0] += 1
                                entry[1] = sym_res + n
                                entry[2][order_id] = res
                            ledger._gross += n
                            ledger._kinds += kind
                            if not ledger._count:
                                ledger._head = seq
                                ledger._next_expiry = stamp + ttl
                            ledger._count += 1
                            ledger._n_reserved += 1
                            ledger._version += 1
                            self._admitted += 1
                        if outcome and outcome != _DUPLICATE:
                            self._denied[outcome] += 1
                        # ---- end of the critical section proper ----
                if ok:
                    break
                attempts += 1
                pessimistic = attempts >= _OPTIMISTIC_ATTEMPTS
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
        reason = _REASONS[outcome]
        assert reason is not None
        return DENIED[reason]

    def _gather(
        self,
        positions: Positions,
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
        book = positions() if callable(positions) else positions
        if type(book) is not dict and not isinstance(book, Mapping):
            raise TypeError(
                f"positions must be a mapping of symbol to exposure (or return one), got {book!r}"
            )
        if book:
            snapshot = dict(book)
            gross = _amounts.abs_sum(snapshot.items(), "positions")
            sym_open = symbol in snapshot
            if sym_open:
                sp, sq = _amounts.exact_ratio(f"positions[{symbol!r}]", snapshot[symbol])
                sym = (abs(sp), sq)
            else:
                sym = (0, 1)
        else:
            snapshot = {}
            gross = sym = (0, 1)
            sym_open = False
        if grow:
            ledger._ensure_den_locked(math.lcm(q, gross[1], sym[1], *_limit_denominators(limits)))
        den = ledger._den
        scaled = self._scaled
        if scaled is None or scaled[0] is not limits or scaled[1] != den:
            scaled = _scale_limits(limits, den)
            if scaled is None:
                return None
            self._scaled = scaled
        _, _, max_pos, g_lim, s_lim = scaled
        n = _amounts.scale_to((num, q), den)
        pos_gross = _amounts.scale_to(gross, den)
        sym_pos = _amounts.scale_to(sym, den)
        if n is None or pos_gross is None or sym_pos is None:
            return None
        inter = 0
        if max_pos is not None and snapshot:
            syms = ledger._syms
            inter = sum(1 for s in snapshot if s in syms)
        return (n, max_pos, len(snapshot), inter, sym_open, pos_gross, g_lim, sym_pos, s_lim)


def _check_limits(limits: object) -> PortfolioLimits:
    if not isinstance(limits, PortfolioLimits):
        raise TypeError(f"limits must be a PortfolioLimits, got {limits!r}")
    return limits


def _limit_denominators(limits: PortfolioLimits) -> tuple[int, int]:
    g = _amounts.limit_ratio("max_gross_exposure", limits.max_gross_exposure)
    s = _amounts.limit_ratio("max_symbol_exposure", limits.max_symbol_exposure)
    return (1 if g is None else g[1], 1 if s is None else s[1])


def _scale_limits(limits: PortfolioLimits, den: int) -> _ScaledLimits | None:
    scaled: list[int | None] = []
    for name in ("max_gross_exposure", "max_symbol_exposure"):
        ratio = _amounts.limit_ratio(name, getattr(limits, name))
        if ratio is None:
            scaled.append(None)
            continue
        value = _amounts.scale_to(ratio, den)
        if value is None:
            return None
        scaled.append(value)
    return (limits, den, limits.max_concurrent_positions, scaled[0], scaled[1])
