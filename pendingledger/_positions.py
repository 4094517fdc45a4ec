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


def read_positions(positions: object, symbol: str, epoch: int) -> Snapshot:
    """``positions`` (a mapping, or a zero-argument callable returning one) as a ``Snapshot`` for
    a decision on ``symbol``."""
    if type(positions) is dict:
        book: Mapping[object, object] = positions
    else:
        book = positions if isinstance(positions, Mapping) else _call(positions)
    # A copy first: another thread may change the caller's dict while it is walked. Its values
    # become signed units in place (same keys: the copy does not grow while it is walked).
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
        open_[key] = units
        gross += -units if units < 0 else units
        net += units
    if not plain:  # keys the lock may hash must be exact str
        open_ = {_symbol_key(key): value for key, value in open_.items()}
    keys = cast("dict[str, int]", open_)  # exact str keys and int units by now
    held = keys.get(symbol)
    return Snapshot(epoch, keys, gross, net, held is not None, 0 if held is None else held)


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
