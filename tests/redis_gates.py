"""The Redis gates the Redis test files make: one namespace each, restored, on a test clock.

Import it after ``pytest.importorskip("redis")``: it imports the Redis backend.
"""

from __future__ import annotations

import uuid
from typing import Any

from pendingledger.limits import Decision, PortfolioLimits
from pendingledger.redis import RedisGate, RedisReservation
from pendingledger.redis.testing import freeze_server_clock


def new_gate(
    client: Any,
    limits: PortfolioLimits | None = None,
    *,
    ttl: float = 60.0,
    frozen: bool = True,
    **options: Any,
) -> RedisGate:
    """A gate on a fresh namespace, restored empty; its server clock frozen unless
    ``frozen=False`` (then it is the server's ``TIME``). ``options`` go to ``RedisGate``."""
    gate = RedisGate(
        client, limits or PortfolioLimits(), ttl=ttl, namespace=uuid.uuid4().hex[:12], **options
    )
    if frozen:
        freeze_server_clock(gate)
    gate.restore({})
    return gate


def res(decision: Decision) -> RedisReservation:
    """The reservation of an admitted decision (fails the test on a denial)."""
    assert decision, decision
    reservation: object = decision.reservation
    assert isinstance(reservation, RedisReservation)
    return reservation
