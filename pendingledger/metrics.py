"""Prometheus metrics for a gate (the ``prometheus`` extra: ``pip install '.[prometheus]'``).

``instrument(gate, "main")`` exports, on ``prometheus_client``'s default registry (or the one
given), with the label ``gate="main"``:

* ``pendingledger_decisions_total{outcome, reason, scope}``: admitted and denied decisions by
  reason, per scope (``scope``: the strategy the order was for, ``""`` for the account's own),
  read from ``gate.stats()`` at each scrape, so they are the gate's own counts, kept under its
  lock (a ``RedisGate``'s: the whole namespace's);
* ``pendingledger_outstanding_reservations`` and ``pendingledger_reserved_notional``: what is
  reserved now (the ledger's, or the Redis namespace's);
* ``pendingledger_trading_state{pendingledger_trading_state}`` (a state set: 1 for the state in
  force) and ``pendingledger_latched``;
* ``pendingledger_decision_seconds``: a histogram of ``try_enter``'s latency in this process, fed
  by an event listener (``pendingledger.events.Decided.seconds``);
* ``pendingledger_up``: 0 when the last scrape could not read the gate (a Redis outage), with a
  warning logged; the other figures are then left out, never made up.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from .decision import DenyReason
from .events import Decided, Event, Listener
from .gate import PortfolioGate
from .protocols import Gate
from .stats import GateStats
from .trading import TradingState

__all__ = ["BUCKETS", "Instrumented", "ObservedGate", "instrument"]

logger = logging.getLogger("pendingledger")

BUCKETS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0,
)  # fmt: skip
"""Decision latency buckets, in seconds: from an uncontended in-process decision (about a
microsecond compiled) to a Redis round trip under load."""


class ObservedGate(Gate, Protocol):
    """A ``Gate`` that tells listeners its events, as both backends' gates do."""

    def subscribe(self, listener: Listener, *, timed: bool = False) -> None: ...

    def unsubscribe(self, listener: Listener) -> bool: ...


def instrument(
    gate: ObservedGate,
    name: str,
    *,
    registry: CollectorRegistry = REGISTRY,
    latency: bool = True,
) -> Instrumented:
    """Export ``gate``'s metrics on ``registry`` under ``gate=name`` until ``close()``.

    ``gate`` is a ``PortfolioGate`` or a ``RedisGate`` (anything with ``stats()`` and
    ``subscribe``). ``ValueError`` if ``name`` already names a gate on ``registry``.

    Everything but the latency histogram is read at scrape time and costs a decision nothing.
    The histogram is a listener, and ``prometheus_client``'s ``observe`` (a lock and a walk of
    the buckets, in Python) is not cheap: on the compiled core it made the own book's decisions
    2.1 to 2.5 times slower (benchmarks, ``listeners`` section; a bare listener: 1.05 to 1.14).
    ``latency=False`` leaves it out."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not all(callable(getattr(gate, m, None)) for m in ("stats", "subscribe", "unsubscribe")):
        raise TypeError(f"gate must be a PortfolioGate or a RedisGate, got {gate!r}")
    if not isinstance(latency, bool):
        raise TypeError(f"latency must be a bool, got {latency!r}")
    collector = _collector_of(registry)
    entry = collector.add(gate, name, latency)
    if entry.latency is not None:
        gate.subscribe(entry.observe, timed=True)
    return Instrumented(collector, entry)


class Instrumented:
    """One gate's metrics on one registry; ``close()`` stops exporting them."""

    __slots__ = ("_collector", "_entry")

    def __init__(self, collector: _GateCollector, entry: _Entry) -> None:
        self._collector = collector
        self._entry = entry

    @property
    def name(self) -> str:
        return self._entry.name

    def close(self) -> None:
        """Unsubscribe and drop the gate's series (idempotent)."""
        if self._collector.remove(self._entry.name) and self._entry.latency is not None:
            self._entry.gate.unsubscribe(self._entry.observe)


@dataclass(eq=False)
class _Entry:
    gate: ObservedGate
    name: str
    latency: Histogram | None  # the gate's child of the histogram, if it is timed

    def observe(self, event: Event) -> None:
        if isinstance(event, Decided) and event.seconds is not None and self.latency:
            self.latency.observe(event.seconds)


class _GateCollector(Collector):
    """Every instrumented gate of one registry: a registry takes each metric name once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._latency = Histogram(
            "pendingledger_decision_seconds",
            "try_enter latency in this process, lock waits and position reads included",
            ["gate"],
            buckets=BUCKETS,
            registry=None,
        )

    def add(self, gate: ObservedGate, name: str, timed: bool) -> _Entry:
        with self._lock:
            if name in self._entries:
                raise ValueError(f"a gate named {name!r} is instrumented on this registry already")
            child = self._latency.labels(gate=name) if timed else None
            entry = self._entries[name] = _Entry(gate, name, child)
            return entry

    def remove(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        if entry.latency is not None:
            self._latency.remove(name)
        return True

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            entries = list(self._entries.values())
        up = GaugeMetricFamily(
            "pendingledger_up", "1 if the last scrape read the gate", labels=["gate"]
        )
        families = _Families()
        for entry in entries:
            try:
                families.add(entry)
            except Exception as exc:
                logger.warning(
                    "metrics: gate %r not read: %s: %s", entry.name, type(exc).__name__, exc
                )
                up.add_metric([entry.name], 0)
            else:
                up.add_metric([entry.name], 1)
        yield up
        yield from families.all()
        yield from self._latency.collect()


class _Families:
    """The families of one scrape, filled gate by gate."""

    def __init__(self) -> None:
        self.decisions = CounterMetricFamily(
            "pendingledger_decisions",
            "try_enter decisions by outcome, reason and scope (the strategy; '' the account's)",
            labels=["gate", "outcome", "reason", "scope"],
        )
        self.outstanding = GaugeMetricFamily(
            "pendingledger_outstanding_reservations", "reservations outstanding", labels=["gate"]
        )
        self.notional = GaugeMetricFamily(
            "pendingledger_reserved_notional", "notional reserved, outstanding", labels=["gate"]
        )
        self.state = StateSetMetricFamily(
            "pendingledger_trading_state", "the trading state in force", labels=["gate"]
        )
        self.latched = GaugeMetricFamily(
            "pendingledger_latched", "1 while the loss latch holds", labels=["gate"]
        )

    def add(self, entry: _Entry) -> None:
        gate, name = entry.gate, entry.name
        stats = gate.stats()
        outstanding, notional = _reserved(gate, stats)
        for scope, part in stats.scopes.items():
            label = scope or ""
            self.decisions.add_metric([name, "admitted", "", label], part.admitted)
            for reason in DenyReason:
                self.decisions.add_metric(
                    [name, "denied", reason.value, label], part.denied[reason]
                )
        self.outstanding.add_metric([name], outstanding)
        self.notional.add_metric([name], notional)
        self.state.add_metric([name], {s.value: s is stats.state for s in TradingState})
        self.latched.add_metric([name], 0 if stats.latch is None else 1)

    def all(self) -> Iterator[Metric]:
        yield from (self.decisions, self.outstanding, self.notional, self.state, self.latched)


def _reserved(gate: Gate, stats: GateStats) -> tuple[int, float]:
    """What is reserved: an in-process gate's ledger has it; the Redis gate's stats carry it
    (and a gate that is neither is a Redis one: the redis client is then installed)."""
    if isinstance(gate, PortfolioGate):
        ledger = gate.ledger.stats()
        return ledger.outstanding, float(ledger.gross_notional)
    from .redis import RedisGateStats  # noqa: PLC0415 (the redis extra: imported only here)

    if not isinstance(stats, RedisGateStats):
        raise TypeError(f"{gate!r}.stats() gave {stats!r}, with nothing reserved to read")
    return stats.outstanding, float(stats.gross_notional)


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _GateCollector] = (
    weakref.WeakKeyDictionary()
)
_COLLECTORS_LOCK = threading.Lock()


def _collector_of(registry: CollectorRegistry) -> _GateCollector:
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = _COLLECTORS[registry] = _GateCollector()
            registry.register(collector)
        return collector
