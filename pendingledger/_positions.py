"""Reading a caller's positions, before the ledger lock is taken: ``read_positions``.

A caller's mapping (or what a callable returns) is copied and turned into units here, outside
the lock, so none of its code (``__getitem__``, ``items``, a key's ``__hash__``) runs while the
lock is held. The ``Snapshot`` carries the ledger's epoch read before it, which the decision
checks under the lock (``pendingledger._core`` explains why that is as safe as reading under
the lock).
"""

from __future__ import annotations

from collections.abc import Mapping

from . import _units
from ._core import Snapshot

__all__: list[str] = []


def read_positions(positions: object, epoch: int) -> Snapshot:
    """``positions`` (a mapping, or a zero-argument callable returning one) as a ``Snapshot``."""
    book = positions if isinstance(positions, Mapping) else _call(positions)
    exposures: dict[str, int] = {}
    gross = 0
    for key, value in list(book.items()):
        try:
            units = _units.units("positions", value, True)
            symbol = _units.check_symbol(key)
        except (TypeError, ValueError):
            symbol = _units.check_symbol(key)
            units = _units.units(f"positions[{key!r}]", value, True)
        exposures[symbol] = units
        gross += -units if units < 0 else units
    return Snapshot(epoch, exposures, gross)


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
