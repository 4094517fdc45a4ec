"""Reading a caller's positions, before the ledger lock is taken: ``read_positions``.

A caller's mapping (or what a callable returns) is copied and turned into units here, outside
the lock, so none of its code (``__getitem__``, ``items``, a key's ``__hash__``) runs while the
lock is held. The ``Snapshot`` carries the ledger's epoch read before it, which the decision
checks under the lock (``pendingledger._core`` explains why that is as safe as reading under
the lock).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from . import _units
from ._core import Snapshot

__all__: list[str] = []


def read_positions(
    positions: object, symbol: str, epoch: int, sided: tuple[str, ...] | list[str]
) -> Snapshot:
    """``positions`` (a mapping, or a zero-argument callable returning one) as a ``Snapshot`` for
    a decision on ``symbol``; ``sided`` names the symbols with pending buys or sells, read just
    before (their positions are turned into units here, for the decision's worst cases)."""
    if type(positions) is dict:
        book: Mapping[object, object] = positions
    else:
        book = positions if isinstance(positions, Mapping) else _call(positions)
    # A copy first: another thread may change the caller's dict while it is walked.
    open_: dict[object, object] = dict(book)
    gross = 0
    net = 0
    plain = True
    for key, value in open_.items():
        try:
            plain = plain and type(key) is str and key != ""
            units = _units.units("positions", value, True)
        except (TypeError, ValueError):
            raise _bad_entry(key, value) from None
        gross += -units if units < 0 else units
        net += units
    if not plain:  # keys the lock may hash must be exact str
        open_ = {_symbol_key(key): value for key, value in open_.items()}
    keys = cast("dict[str, object]", open_)  # every key is an exact str by now
    value = keys.get(symbol)
    held = 0 if value is None else _units.units("positions", value, True)
    units_of: dict[str, int] | None = None
    if sided:
        units_of = {}
        for name in sided:
            if name in keys:
                units_of[name] = _units.units("positions", keys[name], True)
    return Snapshot(epoch, keys, gross, net, value is not None, held, units_of)


def _symbol_key(key: object) -> str:
    try:
        return _units.check_symbol(key)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"positions keys must be non-empty str symbols, got {key!r}") from None


def _bad_entry(key: object, value: object) -> Exception:
    """The error for one bad entry of a positions mapping, naming it."""
    try:
        _units.check_symbol(key)
    except (TypeError, ValueError) as exc:
        return type(exc)(f"positions keys must be non-empty str symbols, got {key!r}")
    try:
        _units.units(f"positions[{key!r}]", value, True)
    except (TypeError, ValueError) as exc:
        return exc
    return ValueError(f"positions[{key!r}] = {value!r} is not a valid exposure")


def _call(positions: object) -> Mapping[object, object]:
    if not callable(positions):
        raise TypeError(
            "positions must be a mapping of symbol to exposure, or a zero-argument callable "
            f"returning one, got {positions!r}"
        )
    book = positions()
    if not isinstance(book, Mapping):
        raise TypeError(f"positions() must return a mapping of symbol to exposure, got {book!r}")
    return book
