"""pendingledger: race-free portfolio risk limits for threaded trading bots."""

from .errors import LedgerError, LockTimeout, ReentrantLockError, StaleViewError
from .limits import Decision, DenyReason, PortfolioLimits

__all__ = [
    "Decision",
    "DenyReason",
    "LedgerError",
    "LockTimeout",
    "PortfolioLimits",
    "ReentrantLockError",
    "StaleViewError",
]
