"""The simulated exchange: each admitted order's answers, delivered to the router after a latency.

``Order`` is one admitted entry as the app tracks it (chosen by a brain, answered by the exchange,
handled by the router); ``Message`` is one answer; ``Exchange`` holds the answers on one heap per
exchange thread and delivers each when its time comes. A lost order gets no message at all.
Internal to the simulation.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from pendingledger import rules
from pendingledger.protocols import ReservationHandle
from pendingledger.trading import Side

__all__ = ["OUTCOMES", "Exchange", "Message", "Order"]

OUTCOMES: Final[tuple[str, ...]] = ("reject", "fill", "partial", "lost")
"""What the exchange does with an order: reject it, fill it in full, fill it in parts, or never
answer (lost: only the TTL ends its reservation)."""


@dataclass(eq=False)
class Order:
    order_id: str
    symbol: str
    notional: int
    outcome: str
    reservation: ReservationHandle
    brain: int
    # Chosen by the brain's rng: answer delays (one per message) and fill parts.
    delays: tuple[float, ...] = ()
    parts: tuple[int, ...] = ()
    duplicate: bool = False
    filled: int = 0
    done: bool = False  # the router has handled the order's last message
    late: bool = False  # an answer arrived after the reservation had expired
    admitted_at: float = 0.0  # lost orders: ledger clock read after try_enter returned
    side: Side = Side.BUY
    strategy: str | None = None  # the strategy it was made for (None: the account's own)

    @property
    def sign(self) -> int:
        """What a fill does to the signed position: +1 for a buy, -1 for a sell."""
        return 1 if self.side is Side.BUY else -1

    @property
    def side_code(self) -> int:
        return rules.BUY if self.side is Side.BUY else rules.SELL


@dataclass(eq=False)
class Message:
    kind: Literal["reject", "fill", "duplicate"]
    order: Order
    qty: int = 0
    last: bool = False


class Exchange:
    """Delivers each order's messages to the router after their delays; one heap per thread."""

    def __init__(self, nthreads: int, deliver: Callable[[Message], None]) -> None:
        self._deliver = deliver
        self._shards = [
            (threading.Condition(), list[tuple[float, int, Message]]()) for _ in range(nthreads)
        ]
        self._seq = itertools.count()
        self._closing = False

    def submit(self, order: Order) -> None:
        messages: list[Message] = []
        if order.outcome == "reject":
            messages.append(Message("reject", order, last=True))
        elif order.outcome in ("fill", "partial"):
            for i, qty in enumerate(order.parts):
                messages.append(Message("fill", order, qty, last=i == len(order.parts) - 1))
        if not messages:
            return  # lost: the exchange never answers
        if order.duplicate:
            messages.append(Message("duplicate", order))
        now = time.monotonic()
        cond, heap = self._shards[order.brain % len(self._shards)]
        with cond:
            due = now
            for message, delay in zip(messages, order.delays, strict=False):
                due += delay
                heapq.heappush(heap, (due, next(self._seq), message))
            cond.notify()

    def close(self) -> None:
        """No more submissions: each thread exits once its heap is delivered."""
        self._closing = True
        for cond, _ in self._shards:
            with cond:
                cond.notify()

    def run(self, shard: int) -> None:
        cond, heap = self._shards[shard]
        while True:
            with cond:
                while True:
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        message = heapq.heappop(heap)[2]
                        break
                    if not heap and self._closing:
                        return
                    cond.wait(min(heap[0][0] - now, 0.05) if heap else 0.05)
            self._deliver(message)
