"""A consistent snapshot of one namespace, and an audit that recomputes every total from it.

The gate keeps its totals incrementally (per-symbol reserved amounts, the reserved gross, the
counts of reserved symbols and of reserved symbols that are open) so a decision costs O(1). The
audit recomputes all of them from the raw records and lists every difference, so a leaked or
double-released reservation, or a broken index, shows up as a named problem. With limits given it
also checks that the state is within them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

from pendingledger import _units, rules
from pendingledger.limits import PortfolioLimits

__all__ = [
    "LAYOUT",
    "PACKED",
    "STATE",
    "Figures",
    "OrderRecord",
    "Snapshot",
    "audit",
    "pack_state",
    "unpack_state",
]


def amount_of(units: int) -> Decimal:
    """Units stored in Redis as an exact ``Decimal`` amount (``_units.to_number``)."""
    value = _units.to_number(units, _units.KIND_DECIMAL)
    assert isinstance(value, Decimal)
    return value


def _s(value: object) -> str:
    """A reply item as text (redis-py returns bytes unless decode_responses is set)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    items = [_s(v) for v in flat]
    return dict(zip(items[0::2], items[1::2], strict=True))


@dataclass(frozen=True)
class OrderRecord:
    """One outstanding reservation as stored: amounts in units (``10**-9``), times in server µs."""

    order_id: str
    symbol: str
    units: int
    token: str
    reserved_at_us: int
    expires_at_us: int | None
    side: int = rules.UNKNOWN_SIDE
    """The side code (``rules.BUY``, ``rules.SELL``, ``rules.UNKNOWN_SIDE``)."""


_LOSS: Final = ("reset_off_us", "day_end", "pnl_w", "pnl_f", "eq_set", "eq_w", "eq_f", "peak_w",
                "peak_f", "loss_kinds", "l_state", "l_reason", "l_limit_w", "l_limit_f",
                "l_value_w", "l_value_f", "l_kinds", "l_at", "l_until")  # fmt: skip
_DENIALS: Final = ("d_book_not_restored", "d_halted", "d_reducing_only",
                   "d_max_concurrent_positions", "d_max_gross_exposure", "d_max_symbol_exposure",
                   "d_max_net_exposure")  # fmt: skip
_NEW_TOTALS: Final = ("wc_gross_w", "wc_gross_f", "net_pos_w", "net_pos_f", "buys_w", "buys_f",
                      "sells_w", "sells_f")  # fmt: skip

STATE: Final = ("gen", "epoch", "hw", "npos", "pos_gross_w", "pos_gross_f", "res_gross_w",
                "res_gross_f", "res_syms", "res_open", "nres", "kinds", "next_due", "forget_due",
                "admitted", "released", "filled", "expired", "restored", "corrupt",
                "restored_at", "op", "testing", "clock_us", "clock_frozen_us", *_DENIALS,
                *_NEW_TOTALS, *_LOSS, "tag")  # fmt: skip
"""The book's state as ``snapshot`` sends it, in this order: numbers, then the fencing tag (a
string). ``op`` is the operator's trading state code; amounts in two limbs (``w * 10**9 + f``;
signed ones, ``net_pos``, ``pnl``, ``eq``, ``peak`` and ``l_value``, with ``w`` the floor)."""

PACKED: Final = {
    "state": ("layout", "gen", "epoch", "restored_at", "op", "testing", "clock_us",
              "clock_frozen_us", "expired", "restored", "corrupt", *_DENIALS, *_LOSS),
    "live": ("hw", "npos", "pos_gross_w", "pos_gross_f", "res_gross_w", "res_gross_f",
             "res_syms", "res_open", "nres", "kinds", "next_due", "forget_due", "admitted",
             "released", "filled", *_NEW_TOTALS, "tag"),
}  # fmt: skip
"""The two book fields the state is packed in, little-endian doubles with these names but the
fencing tag, 16 characters (gate.lua's STATE_NAMES and LIVE_FORMAT); ``layout`` is gate.lua's
LAYOUT."""

LAYOUT: Final = 3
_FORMATS: Final = {"state": f"<{len(PACKED['state'])}d", "live": f"<{len(PACKED['live']) - 1}d16s"}


def unpack_state(field: str, raw: bytes) -> dict[str, int | str]:
    """The book's packed ``field`` (``state`` or ``live``), as read by a client without
    ``decode_responses``: numbers as int, the tag as str."""
    values = struct.unpack(_FORMATS[field], raw)
    return {
        name: v.decode() if isinstance(v, bytes) else int(v)
        for name, v in zip(PACKED[field], values, strict=True)
    }


def pack_state(field: str, values: dict[str, int | str]) -> bytes:
    """``values`` (all of ``field``'s names) packed as the book's ``field``, for tests that
    corrupt a book on purpose."""
    items = (values[name] for name in PACKED[field])
    return struct.pack(_FORMATS[field], *(v.encode() if isinstance(v, str) else v for v in items))


_TOTALS: Final = ("npos", "pos_gross", "res_gross", "res_syms", "res_open", "nres", "wc_gross",
                 "net_pos", "buys", "sells")  # fmt: skip
_COUNTS: Final = ("admitted", "released", "filled", "expired", "restored", "corrupt")


@dataclass(frozen=True)
class Snapshot:
    """Everything in one namespace at one instant (taken by one server call). ``now_us`` is
    that instant on the server code's clock: the server's ``TIME`` plus the namespace's test
    clock. ``meta`` is the unpacked ``state`` (gate.lua); ``positions`` are signed
    units; ``totals`` the sums and counts ``state`` keeps; ``stats`` its counts and the denials;
    ``sentinels_missing`` names each zset whose sentinel is gone (evicted)."""

    now_us: int
    meta: Mapping[str, str]
    positions: Mapping[str, int]
    totals: Mapping[str, int]
    symbol_reserved: Mapping[str, int]
    orders: Mapping[str, OrderRecord]
    expiry: Mapping[str, int]
    stats: Mapping[str, int] = field(default_factory=dict)
    sentinels_missing: tuple[str, ...] = ()
    symbol_buys: Mapping[str, int] = field(default_factory=dict)
    symbol_sells: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> Snapshot:
        *numbers, tag = reply[1]
        state = {name: int(v) for name, v in zip(STATE[:-1], numbers, strict=True)}
        book = _pairs(reply[2])
        expiry_z, forget_z = _zset(reply[3]), _zset(reply[4])
        missing = tuple(name for name, z in (("expiry", expiry_z), ("forget", forget_z))
                        if "" not in z)  # fmt: skip
        meta = {name: str(value) for name, value in state.items() if value}
        meta["tag"] = _s(tag)
        for total in ("pos_gross", "res_gross", "wc_gross", "net_pos", "buys", "sells"):
            meta[total] = str(state[f"{total}_w"] * 10**9 + state[f"{total}_f"])
        totals = {name: int(meta.get(name) or 0) for name in _TOTALS}
        stats = {name: int(meta.get(name) or 0) for name in _COUNTS}
        stats |= {f"denied:{k[2:]}": v for k, v in state.items() if k.startswith("d_")}
        positions = {
            k[2:]: -int(v) if book.get(f"k:{k[2:]}", "+").startswith("-") else int(v)
            for k, v in book.items()
            if k.startswith("p:")
        }
        reserved = {k[2:]: int(v) for k, v in book.items() if k.startswith("r:") and int(v)}
        buys = {k[2:]: int(v) for k, v in book.items() if k.startswith("b:") and int(v)}
        sells = {k[2:]: int(v) for k, v in book.items() if k.startswith("s:") and int(v)}
        expiry = {k[2:]: v for k, v in expiry_z.items() if k}
        orders: dict[str, OrderRecord] = {}
        for name, rec in book.items():
            if name.startswith("o:") and not rec.startswith("~"):  # ~: a tombstone
                units, token, at, _, side, symbol = rec.split("|", 5)
                oid = name[2:]
                orders[oid] = OrderRecord(oid, symbol, int(units), token, int(at), expiry.get(oid),
                                          int(side))  # fmt: skip
        return cls(int(_s(reply[0])), meta, positions, totals, reserved, orders, expiry, stats,
                   missing, buys, sells)  # fmt: skip

    @property
    def reserved_gross_units(self) -> int:
        return self.totals.get("res_gross", 0)

    @property
    def position_gross_units(self) -> int:
        return self.totals.get("pos_gross", 0)

    def gross(self) -> Decimal:
        """The sum of the symbols' worst cases (open exposure plus reserved notional when no
        side is given), as an exact Decimal, as the gate keeps it."""
        return amount_of(self.totals.get("wc_gross", 0))

    def figures(self) -> Figures:
        """The figures the limits bound, recomputed from the records (not the kept totals)."""
        return _figures(self)

    def busy_symbols(self) -> set[str]:
        """Symbols that hold a concurrency slot: open or reserved."""
        return set(self.positions) | set(self.symbol_reserved)


def _zset(flat: Sequence[Any]) -> dict[str, int]:
    items = [_s(v) for v in flat]
    return {k: _score(v) for k, v in zip(items[0::2], items[1::2], strict=True)}


def _score(value: str) -> int:
    return -1 if value == "-inf" else int(float(value))


def audit(snap: Snapshot, limits: PortfolioLimits | None = None) -> list[str]:
    """Every inconsistency in ``snap`` (and every limit it exceeds, when ``limits`` is given)."""
    problems = _order_problems(snap)
    problems += _total_problems(snap)
    if snap.meta.get("gen") and snap.sentinels_missing:
        problems.append(f"restored, but the sentinels of {snap.sentinels_missing} are missing")
    if snap.stats.get("corrupt", 0):
        problems.append(f"the server code counted {snap.stats['corrupt']} bookkeeping error(s)")
    if limits is not None:
        problems += breaches(snap, limits)
    return problems


def _order_problems(snap: Snapshot) -> list[str]:
    """Each order record against the expiry index."""
    problems: list[str] = []
    for rec in snap.orders.values():
        if rec.units <= 0:
            problems.append(f"order {rec.order_id!r} holds {rec.units} units")
        if rec.expires_at_us is None:
            problems.append(f"order {rec.order_id!r} has no expiry entry")
    problems += [
        f"expiry entry {order_id!r} has no order"
        for order_id in snap.expiry
        if order_id not in snap.orders
    ]
    return problems


def _total_problems(snap: Snapshot) -> list[str]:
    """Every incremental total against the same total recomputed from the records."""
    fig = _figures(snap)
    per_sym = {s: sum(sides) for s, sides in fig.pending.items()}
    problems: list[str] = []
    if per_sym != dict(snap.symbol_reserved):
        problems.append(f"per-symbol reserved {dict(snap.symbol_reserved)} != recomputed {per_sym}")
    for name, kept_sides, code in (("buys", snap.symbol_buys, 1), ("sells", snap.symbol_sells, 2)):
        side_sums = {s: sides[code] for s, sides in fig.pending.items() if sides[code]}
        if side_sums != dict(kept_sides):
            problems.append(f"per-symbol {name} {dict(kept_sides)} != recomputed {side_sums}")
    recomputed = {
        "npos": len(snap.positions),
        "pos_gross": sum(abs(v) for v in snap.positions.values()),
        "res_gross": sum(per_sym.values()),
        "res_syms": len(per_sym),
        "res_open": sum(1 for s in per_sym if s in snap.positions),
        "nres": len(snap.orders),
        "wc_gross": fig.gross,
        "net_pos": sum(snap.positions.values()),
        "buys": sum(sides[1] for sides in fig.pending.values()),
        "sells": sum(sides[2] for sides in fig.pending.values()),
    }
    if not snap.meta.get("gen"):
        return problems  # an unrestored namespace keeps no totals
    for name, value in recomputed.items():
        kept = snap.totals.get(name, 0)
        if kept != value:
            problems.append(f"{name} {kept} != recomputed {value}")
    return problems


def breaches(snap: Snapshot, limits: PortfolioLimits) -> list[str]:
    """Every limit the state in ``snap`` exceeds (positions plus reservations)."""
    unit = rules.unit_limits(limits)
    found: list[str] = []
    if unit.max_positions != rules.NO_LIMIT:
        busy = snap.busy_symbols()
        if len(busy) > unit.max_positions:
            found.append(
                f"{len(busy)} symbols open or reserved > max_concurrent_positions "
                f"{unit.max_positions}: {sorted(busy)}"
            )
    fig = _figures(snap)
    exposure, gross = fig.symbols, fig.gross
    if unit.max_gross != rules.NO_LIMIT and gross > unit.max_gross:
        found.append(f"gross {gross} units > max_gross_exposure {unit.max_gross} units")
    if unit.max_symbol != rules.NO_LIMIT:
        found += [
            f"{symbol}: {units} units > max_symbol_exposure {unit.max_symbol} units"
            for symbol, units in sorted(exposure.items())
            if units > unit.max_symbol
        ]
    if unit.max_net != rules.NO_LIMIT and fig.net > unit.max_net:
        found.append(f"net {fig.net} units > max_net_exposure {unit.max_net} units")
    return found


@dataclass(frozen=True)
class Figures:
    """What the limits bound, in units: ``symbols`` each symbol's worst case
    (``rules.worst_case``), ``gross`` their sum, ``net`` the worst case over the sums;
    ``pending`` each reserved symbol's pending units by side code (unknown, buy, sell)."""

    symbols: Mapping[str, int]
    gross: int
    net: int
    pending: Mapping[str, tuple[int, int, int]]


def _figures(snap: Snapshot) -> Figures:
    pending: dict[str, list[int]] = {}
    for rec in snap.orders.values():
        pending.setdefault(rec.symbol, [0, 0, 0])[rec.side] += rec.units
    symbols: dict[str, int] = {}
    totals = [0, 0, 0]
    for symbol in set(snap.positions) | set(pending):
        u, b, s = pending.get(symbol, (0, 0, 0))
        symbols[symbol] = rules.worst_case(snap.positions.get(symbol, 0), b, s, u)
        totals = [totals[0] + u, totals[1] + b, totals[2] + s]
    u, b, s = totals
    net = rules.worst_case(sum(snap.positions.values()), b, s, u)
    sides = {k: (v[0], v[1], v[2]) for k, v in pending.items()}
    return Figures(symbols, sum(symbols.values()), net, sides)
