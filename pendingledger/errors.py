"""The exceptions pendingledger raises.

Each one subclasses the builtin a caller would already catch for that situation, so code written
against the standard library keeps working: a lock that times out is a ``TimeoutError``, a
re-entrant acquisition is a ``RuntimeError``. Bad arguments are plain ``ValueError`` and
``TypeError`` and are not listed here.
"""

from __future__ import annotations

__all__ = ["LedgerError", "LockTimeout", "ReentrantLockError", "StaleViewError"]


class LedgerError(Exception):
    """Base class of every error the ledger itself raises."""


class LockTimeout(LedgerError, TimeoutError):
    """The ledger lock was not acquired within the timeout given to ``lock()``.

    Nothing was read or changed: the caller may retry or treat the entry as denied.
    """


class ReentrantLockError(LedgerError, RuntimeError):
    """The thread that already holds the ledger lock tried to take it again.

    ``threading.Lock`` would deadlock here; the ledger raises at once instead.
    """


class StaleViewError(LedgerError):
    """A ``PendingMap`` (or one of its methods) was used after its ``with`` block ended.

    The view reads and writes the ledger without taking the lock; outside its block that
    would be a data race, so every use is refused.
    """
