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

__all__ = ["PACKED", "STATE", "OrderRecord", "Snapshot", "audit", "pack_state", "unpack_state"]


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


STATE: Final = ("gen", "epoch", "hw", "npos", "pos_gross_w", "pos_gross_f", "res_gross_w",
                "res_gross_f", "res_syms", "res_open", "nres", "kinds", "next_due", "forget_due",
                "admitted", "released", "filled", "expired", "restored", "corrupt",
                "restored_at", "halted", "testing", "clock_us", "clock_frozen_us",
                "d_book_not_restored", "d_halted", "d_max_concurrent_positions",
                "d_max_gross_exposure", "d_max_symbol_exposure", "tag")  # fmt: skip
"""The book's state as ``snapshot`` sends it, in this order: 30 numbers, then the fencing tag (a
string)."""

PACKED: Final = {
    "state": ("layout", "gen", "epoch", "restored_at", "halted", "testing", "clock_us",
              "clock_frozen_us", "expired", "restored", "corrupt", "d_book_not_restored",
              "d_halted", "d_max_concurrent_positions", "d_max_gross_exposure",
              "d_max_symbol_exposure"),
    "live": ("hw", "npos", "pos_gross_w", "pos_gross_f", "res_gross_w", "res_gross_f",
             "res_syms", "res_open", "nres", "kinds", "next_due", "forget_due", "admitted",
             "released", "filled", "tag"),
}  # fmt: skip
"""The two book fields the state is packed in, little-endian doubles with these names but the
fencing tag, 16 characters (gate.lua's STATE_FORMAT and LIVE_FORMAT); ``layout`` is gate.lua's
LAYOUT."""

_FORMATS: Final = {"state": "<16d", "live": "<15d16s"}


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


_TOTALS: Final = ("npos", "pos_gross", "res_gross", "res_syms", "res_open", "nres")
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
        for total in ("pos_gross", "res_gross"):
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
        expiry = {k[2:]: v for k, v in expiry_z.items() if k}
        orders: dict[str, OrderRecord] = {}
        for name, rec in book.items():
            if name.startswith("o:") and not rec.startswith("~"):  # ~: a tombstone
                units, token, at, _, symbol = rec.split("|", 4)
                oid = name[2:]
                orders[oid] = OrderRecord(oid, symbol, int(units), token, int(at), expiry.get(oid))
        return cls(int(_s(reply[0])), meta, positions, totals, reserved, orders, expiry, stats,
                   missing)  # fmt: skip

    @property
    def reserved_gross_units(self) -> int:
        return self.totals.get("res_gross", 0)

    @property
    def position_gross_units(self) -> int:
        return self.totals.get("pos_gross", 0)

    def gross(self) -> Decimal:
        """Open exposure plus reserved notional, as an exact Decimal."""
        return amount_of(self.position_gross_units + self.reserved_gross_units)

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
    per_sym: dict[str, int] = {}
    for rec in snap.orders.values():
        per_sym[rec.symbol] = per_sym.get(rec.symbol, 0) + rec.units
    problems: list[str] = []
    if per_sym != dict(snap.symbol_reserved):
        problems.append(f"per-symbol reserved {dict(snap.symbol_reserved)} != recomputed {per_sym}")
    recomputed = {
        "npos": len(snap.positions),
        "pos_gross": sum(abs(v) for v in snap.positions.values()),
        "res_gross": sum(per_sym.values()),
        "res_syms": len(per_sym),
        "res_open": sum(1 for s in per_sym if s in snap.positions),
        "nres": len(snap.orders),
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
    exposure: dict[str, int] = {s: abs(v) for s, v in snap.positions.items()}
    for rec in snap.orders.values():
        exposure[rec.symbol] = exposure.get(rec.symbol, 0) + rec.units
    gross = sum(exposure.values())
    if unit.max_gross != rules.NO_LIMIT and gross > unit.max_gross:
        found.append(f"gross {gross} units > max_gross_exposure {unit.max_gross} units")
    if unit.max_symbol != rules.NO_LIMIT:
        found += [
            f"{symbol}: {units} units > max_symbol_exposure {unit.max_symbol} units"
            for symbol, units in sorted(exposure.items())
            if units > unit.max_symbol
        ]
    return found
