"""A consistent snapshot of one namespace, and an audit that recomputes every total from it.

The gate keeps its totals incrementally (per-symbol reserved amounts, the reserved gross, the
counts of reserved symbols and of reserved symbols that are open) so a decision costs O(1). The
audit recomputes all of them from the raw records and lists every difference, so a leaked or
double-released reservation, or a broken index, shows up as a named problem. With limits given it
also checks that the state is within them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
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
    strategy: str | None = None
    """The strategy the reservation belongs to (None: the account's own)."""


_LOSS: Final = ("reset_off_us", "day_end", "pnl_w", "pnl_f", "eq_set", "eq_w", "eq_f", "peak_w",
                "peak_f", "loss_kinds", "l_state", "l_reason", "l_limit_w", "l_limit_f",
                "l_value_w", "l_value_f", "l_kinds", "l_at", "l_until")  # fmt: skip
_DENIALS: Final = ("d_book_not_restored", "d_halted", "d_reducing_only",
                   "d_max_concurrent_positions", "d_max_gross_exposure", "d_max_symbol_exposure",
                   "d_max_net_exposure", "d_max_order_notional", "d_max_open_orders",
                   "d_max_open_orders_per_symbol", "d_max_orders_per_interval")  # fmt: skip
_NEW_TOTALS: Final = ("wc_gross_w", "wc_gross_f", "net_pos_w", "net_pos_f", "buys_w", "buys_f",
                      "sells_w", "sells_f")  # fmt: skip

STATE: Final = ("gen", "epoch", "hw", "npos", "pos_gross_w", "pos_gross_f", "res_gross_w",
                "res_gross_f", "res_syms", "res_open", "nres", "kinds", "next_due", "forget_due",
                "admitted", "released", "filled", "expired", "restored", "corrupt",
                "restored_at", "op", "testing", "clock_us", "clock_frozen_us", *_DENIALS,
                *_NEW_TOTALS, "seq", "lo", *_LOSS, "tag")  # fmt: skip
"""The book's state as ``snapshot`` sends it, in this order: numbers, then the fencing tag (a
string). ``op`` is the operator's trading state code; amounts in two limbs (``w * 10**9 + f``;
signed ones, ``net_pos``, ``pnl``, ``eq``, ``peak`` and ``l_value``, with ``w`` the floor)."""

PACKED: Final = {
    "state": ("layout", "gen", "epoch", "restored_at", "op", "testing", "clock_us",
              "clock_frozen_us", "expired", "restored", "corrupt", *_DENIALS, *_LOSS),
    "live": ("hw", "npos", "pos_gross_w", "pos_gross_f", "res_gross_w", "res_gross_f",
             "res_syms", "res_open", "nres", "kinds", "next_due", "forget_due", "admitted",
             "released", "filled", *_NEW_TOTALS, "seq", "lo", "tag"),
}  # fmt: skip
"""The two book fields the state is packed in, little-endian doubles with these names but the
fencing tag, 16 characters (gate.lua's STATE_NAMES and LIVE_FORMAT); ``layout`` is gate.lua's
LAYOUT."""

LAYOUT: Final = 4
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

SCOPE: Final = ("npos", "pos_gross_w", "pos_gross_f", "res_gross_w", "res_gross_f", "res_syms",
                "res_open", "nres", "wc_gross_w", "wc_gross_f", "net_pos_w", "net_pos_f", "buys_w",
                "buys_f", "sells_w", "sells_f", "admitted", "seq", "lo",
                *(f"denied:{name[2:]}" for name in _DENIALS))  # fmt: skip
"""A strategy's L<sk> field as ``snapshot`` sends it (gate.lua's L_NAMES): its totals over its
own positions and reservations, its admissions, its rate window, its decisions' denials."""

_SCOPED: Final = "PKRBSN"  # a strategy's fields of a symbol: P<sk><symbol>, ... (gate.lua)


def _scoped(name: str) -> tuple[str, str, str] | None:
    """A strategy's field name as (letter, strategy, symbol), or None for another field. The
    scope key is '<byte length>:<name>', so the split is by bytes."""
    if len(name) < 3 or name[0] not in _SCOPED or not name[1].isdigit():
        return None
    raw = name[1:].encode()
    colon = raw.find(b":")
    if colon < 0 or not raw[:colon].isdigit():
        return None
    n = int(raw[:colon])
    if n == 0:
        return (name[0], "", raw[colon + 1 :].decode()) if name[0] in "PK" else None
    end = colon + 1 + n
    return name[0], raw[colon + 1 : end].decode(), raw[end:].decode()


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
    symbol_orders: Mapping[str, int] = field(default_factory=dict)
    """The account's outstanding orders per symbol as kept (n:<symbol>, nonzero ones)."""
    parts: Mapping[str | None, Mapping[str, int]] = field(default_factory=dict)
    """The parts of the positions (signed units): each strategy's, and under None the
    account's own; ``positions`` are their sums."""
    part_counts: Mapping[str, int] = field(default_factory=dict)
    """The number of open parts of each open symbol, as the account's k: code keeps it."""
    scopes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Each strategy's kept totals and counts (``SCOPE``'s names)."""
    scoped: Mapping[str, Mapping[str, Mapping[str, int]]] = field(default_factory=dict)
    """Each strategy's kept fields of its symbols: letter (R, B, S, N) -> symbol -> value."""

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
                units, token, at, _, side, n, rest = rec.split("|", 6)
                raw = rest.encode()
                strategy, symbol = raw[: int(n)].decode(), raw[int(n) :].decode()
                oid = name[2:]
                orders[oid] = OrderRecord(oid, symbol, int(units), token, int(at), expiry.get(oid),
                                          int(side), strategy or None)  # fmt: skip
        counts = {k[2:]: int(v) for k, v in book.items() if k.startswith("n:") and int(v)}
        parts: dict[str | None, dict[str, int]] = {}
        scoped: dict[str, dict[str, dict[str, int]]] = {}
        for name, value in book.items():
            found = _scoped(name)
            if found is None:
                continue
            letter, strategy, symbol = found
            if letter == "P":
                code = book.get(f"K{name[1:]}", "+")
                signed = -int(value) if code.startswith("-") else int(value)
                parts.setdefault(strategy or None, {})[symbol] = signed
            elif letter != "K" and int(value):
                scoped.setdefault(strategy, {}).setdefault(letter, {})[symbol] = int(value)
        part_counts = {
            k[2:]: int(v[2:]) if len(v) > 2 else 1 for k, v in book.items() if k.startswith("k:")
        }
        scopes: dict[str, dict[str, int]] = {}
        for entry in reply[5] if len(reply) > 5 else ():
            sk = _s(entry[0])
            values = {n: int(v) for n, v in zip(SCOPE, entry[1:], strict=True)}
            scopes[sk[sk.index(":") + 1 :]] = values
        return cls(int(_s(reply[0])), meta, positions, totals, reserved, orders, expiry, stats,
                   missing, buys, sells, counts, parts, part_counts, scopes,
                   scoped)  # fmt: skip

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

    def figures(self, strategy: str | None = None) -> Figures:
        """The figures the limits bound, recomputed from the records (not the kept totals):
        the account's over everything, or with ``strategy`` that strategy's over its own parts
        and reservations."""
        if strategy is None:
            return _figures(self.positions, self.orders.values())
        own = [rec for rec in self.orders.values() if rec.strategy == strategy]
        return _figures(self.parts.get(strategy, {}), own)

    def busy_symbols(self, strategy: str | None = None) -> set[str]:
        """Symbols that hold a concurrency slot (of ``strategy``'s, with one): open or
        reserved."""
        if strategy is None:
            return set(self.positions) | set(self.symbol_reserved)
        reserved = {rec.symbol for rec in self.orders.values() if rec.strategy == strategy}
        return set(self.parts.get(strategy, {})) | reserved

    def strategies(self) -> set[str]:
        """Every strategy the namespace holds anything of: totals, parts or reservations."""
        names = set(self.scopes) | {s for s in self.parts if s is not None}
        return names | {rec.strategy for rec in self.orders.values() if rec.strategy}


def _zset(flat: Sequence[Any]) -> dict[str, int]:
    items = [_s(v) for v in flat]
    return {k: _score(v) for k, v in zip(items[0::2], items[1::2], strict=True)}


def _score(value: str) -> int:
    return -1 if value == "-inf" else int(float(value))


def audit(
    snap: Snapshot,
    limits: PortfolioLimits | None = None,
    budgets: Mapping[str, PortfolioLimits] | None = None,
) -> list[str]:
    """Every inconsistency in ``snap`` (and every limit it exceeds, when ``limits`` is given:
    the account's; with ``budgets``, each strategy's over its own figures too)."""
    problems = _order_problems(snap)
    problems += _total_problems(snap)
    problems += _scope_problems(snap)
    if snap.meta.get("gen") and snap.sentinels_missing:
        problems.append(f"restored, but the sentinels of {snap.sentinels_missing} are missing")
    if snap.stats.get("corrupt", 0):
        problems.append(f"the server code counted {snap.stats['corrupt']} bookkeeping error(s)")
    if limits is not None:
        problems += breaches(snap, limits)
    for name, budget in (budgets or {}).items():
        problems += [f"strategy {name!r}: {p}" for p in breaches(snap, budget, name)]
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


def _recomputed(positions: Mapping[str, int], orders: list[OrderRecord]) -> dict[str, int]:
    """A scope's totals (``_TOTALS``) recomputed from its positions and its reservations."""
    fig = _figures(positions, orders)
    per_sym = {s: sum(sides) for s, sides in fig.pending.items()}
    return {
        "npos": len(positions),
        "pos_gross": sum(abs(v) for v in positions.values()),
        "res_gross": sum(per_sym.values()),
        "res_syms": len(per_sym),
        "res_open": sum(1 for s in per_sym if s in positions),
        "nres": len(orders),
        "wc_gross": fig.gross,
        "net_pos": sum(positions.values()),
        "buys": sum(sides[1] for sides in fig.pending.values()),
        "sells": sum(sides[2] for sides in fig.pending.values()),
    }


def _per_symbol(orders: list[OrderRecord]) -> dict[str, dict[str, int]]:
    """Per symbol, as kept: reserved (R), buys (B), sells (S), order counts (N)."""
    kept: dict[str, dict[str, int]] = {"R": {}, "B": {}, "S": {}, "N": {}}
    for rec in orders:
        kept["R"][rec.symbol] = kept["R"].get(rec.symbol, 0) + rec.units
        kept["N"][rec.symbol] = kept["N"].get(rec.symbol, 0) + 1
        if rec.side in (rules.BUY, rules.SELL):
            letter = "B" if rec.side == rules.BUY else "S"
            kept[letter][rec.symbol] = kept[letter].get(rec.symbol, 0) + rec.units
    return kept


def _total_problems(snap: Snapshot) -> list[str]:
    """Every incremental total of the account against the same total recomputed from the
    records, and the positions against the sums of their parts."""
    orders = list(snap.orders.values())
    per_symbol = _per_symbol(orders)
    problems: list[str] = []
    for name, letter, kept_map in (("reserved", "R", snap.symbol_reserved),
                                   ("buys", "B", snap.symbol_buys),
                                   ("sells", "S", snap.symbol_sells),
                                   ("orders", "N", snap.symbol_orders)):  # fmt: skip
        if per_symbol[letter] != dict(kept_map):
            problems.append(
                f"per-symbol {name} {dict(kept_map)} != recomputed {per_symbol[letter]}"
            )
    if not snap.meta.get("gen"):
        return problems  # an unrestored namespace keeps no totals
    sums: dict[str, int] = {}
    counts: dict[str, int] = {}
    for part in snap.parts.values():
        for symbol, units in part.items():
            sums[symbol] = sums.get(symbol, 0) + units
            counts[symbol] = counts.get(symbol, 0) + 1
    if sums != dict(snap.positions):
        problems.append(f"positions {dict(snap.positions)} != the sums of their parts {sums}")
    if counts != dict(snap.part_counts):
        problems.append(f"open parts {dict(snap.part_counts)} != counted {counts}")
    for name, value in _recomputed(snap.positions, orders).items():
        kept = snap.totals.get(name, 0)
        if kept != value:
            problems.append(f"{name} {kept} != recomputed {value}")
    return problems


def _scope_problems(snap: Snapshot) -> list[str]:
    """Every strategy's kept totals and fields against the same recomputed from its parts and
    its reservations."""
    problems: list[str] = []
    if not snap.meta.get("gen"):
        return problems
    for name in sorted(snap.strategies()):
        orders = [rec for rec in snap.orders.values() if rec.strategy == name]
        kept_fields = snap.scoped.get(name, {})
        for letter, recomputed in _per_symbol(orders).items():
            if recomputed != dict(kept_fields.get(letter, {})):
                problems.append(
                    f"strategy {name!r}: per-symbol {letter} {dict(kept_fields.get(letter, {}))} "
                    f"!= recomputed {recomputed}"
                )
        values = snap.scopes.get(name)
        if values is None:
            problems.append(f"strategy {name!r} holds parts or reservations but no totals")
            continue
        kept = {
            "npos": values["npos"], "res_syms": values["res_syms"],
            "res_open": values["res_open"], "nres": values["nres"],
        }  # fmt: skip
        for total in ("pos_gross", "res_gross", "wc_gross", "net_pos", "buys", "sells"):
            kept[total] = values[f"{total}_w"] * 10**9 + values[f"{total}_f"]
        for total, value in _recomputed(snap.parts.get(name, {}), orders).items():
            if kept[total] != value:
                problems.append(f"strategy {name!r}: {total} {kept[total]} != recomputed {value}")
    return problems


def breaches(snap: Snapshot, limits: PortfolioLimits, strategy: str | None = None) -> list[str]:
    """Every limit the state in ``snap`` exceeds (positions plus reservations): the account's,
    or with ``strategy`` that strategy's figures. (The order caps bound the flow of orders, not
    a state: they are not checked here, but for the outstanding counts.)"""
    unit = rules.unit_limits(limits)
    found: list[str] = []
    if unit.max_positions != rules.NO_LIMIT:
        busy = snap.busy_symbols(strategy)
        if len(busy) > unit.max_positions:
            found.append(
                f"{len(busy)} symbols open or reserved > max_concurrent_positions "
                f"{unit.max_positions}: {sorted(busy)}"
            )
    fig = snap.figures(strategy)
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
    orders = [rec for rec in snap.orders.values() if strategy is None or rec.strategy == strategy]
    if unit.max_open_orders != rules.NO_LIMIT and len(orders) > unit.max_open_orders:
        found.append(f"{len(orders)} open orders > max_open_orders {unit.max_open_orders}")
    if unit.max_symbol_orders != rules.NO_LIMIT:
        per = _per_symbol(orders)["N"]
        found += [
            f"{symbol}: {n} open orders > max_open_orders_per_symbol {unit.max_symbol_orders}"
            for symbol, n in sorted(per.items())
            if n > unit.max_symbol_orders
        ]
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


def _figures(positions: Mapping[str, int], orders: Iterable[OrderRecord]) -> Figures:
    pending: dict[str, list[int]] = {}
    for rec in orders:
        pending.setdefault(rec.symbol, [0, 0, 0])[rec.side] += rec.units
    symbols: dict[str, int] = {}
    totals = [0, 0, 0]
    for symbol in set(positions) | set(pending):
        u, b, s = pending.get(symbol, (0, 0, 0))
        symbols[symbol] = rules.worst_case(positions.get(symbol, 0), b, s, u)
        totals = [totals[0] + u, totals[1] + b, totals[2] + s]
    u, b, s = totals
    net = rules.worst_case(sum(positions.values()), b, s, u)
    sides = {k: (v[0], v[1], v[2]) for k, v in pending.items()}
    return Figures(symbols, sum(symbols.values()), net, sides)
