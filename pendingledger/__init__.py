"""pendingledger: race-free portfolio risk limits for threaded trading bots.

A gate that checks limits against a position cache is blind to the orders it admitted whose fills
have not arrived yet, so two threads can both pass a limit. ``PortfolioGate.try_enter`` makes the
check a check-and-reserve under one lock: it sees open positions plus outstanding reservations,
and reserves the entry it admits in the same critical section.
"""

import logging as _logging
from importlib.machinery import EXTENSION_SUFFIXES as _EXTENSION_SUFFIXES

from . import _core
from .decision import Admitted, Decision, Denied, DenyReason
from .errors import LedgerError, LockTimeout, ReentrantLockError, StaleViewError
from .events import Decided, Ended, EndReason, Event, Listener, StateChanged
from .gate import PortfolioGate, Positions
from .ledger import PendingEntryLedger, PendingMap, Reservation, ReservationState
from .limits import PortfolioLimits
from .protocols import Gate, ReservationHandle
from .stats import GateStats, LedgerStats, ScopeStats
from .trading import Latch, Side, TradingState

__all__ = [
    "COMPILED",
    "Admitted",
    "Decided",
    "Decision",
    "Denied",
    "DenyReason",
    "EndReason",
    "Ended",
    "Event",
    "Gate",
    "GateStats",
    "Latch",
    "LedgerError",
    "LedgerStats",
    "Listener",
    "LockTimeout",
    "PendingEntryLedger",
    "PendingMap",
    "PortfolioGate",
    "PortfolioLimits",
    "Positions",
    "ReentrantLockError",
    "Reservation",
    "ReservationHandle",
    "ReservationState",
    "ScopeStats",
    "Side",
    "StaleViewError",
    "StateChanged",
    "TradingState",
]

__version__ = "0.1.0"
"""The one place the version is written: the build reads it from here (pyproject.toml)."""

# The library's log lines go where the application sends them; unconfigured, nowhere (not to
# stderr through logging's last resort, where they would garble a terminal's output).
_logging.getLogger("pendingledger").addHandler(_logging.NullHandler())

COMPILED: bool = (_core.__file__ or "").endswith(tuple(_EXTENSION_SUFFIXES))
"""Whether the core imported is the mypyc-compiled build (False: the pure-Python one)."""
