"""pendingledger.redis: the portfolio gate shared by processes and hosts through one Redis.

Install with the ``redis`` extra from a checkout, ``pip install '.[redis]'`` (the ``redis`` client,
version 6 or later; the package is on no index yet). The core package never imports this
module. ``RedisGate`` makes the same decisions as ``PortfolioGate``, each in one atomic call of
its server code (a Redis Functions library), with the position book and the reservations in
Redis; with strategy budgets (``RedisGate(..., budgets=)``, ``try_enter(..., strategy=)``) that
one call checks the strategy's budget over its own figures and the account's limits over
everything.
Tests move the server's clock of a namespace with ``pendingledger.redis.testing`` (not imported
here: it is for tests only). Amounts count as in process, in units of ``10**-9``
(``pendingledger._units``; ``SCALE``, ``SCALE_DIGITS`` and ``MAX_AMOUNT`` are re-exported here).
"""

from pendingledger._units import MAX_AMOUNT, SCALE, SCALE_DIGITS

from ._audit import OrderRecord, Snapshot, audit
from ._gate import (
    SCRIPT,
    BookNotRestored,
    OpenOrder,
    RedisGate,
    RedisGateStats,
    RedisReservation,
    StoreUnavailable,
)

__all__ = [
    "MAX_AMOUNT",
    "SCALE",
    "SCALE_DIGITS",
    "SCRIPT",
    "BookNotRestored",
    "OpenOrder",
    "OrderRecord",
    "RedisGate",
    "RedisGateStats",
    "RedisReservation",
    "Snapshot",
    "StoreUnavailable",
    "audit",
]
