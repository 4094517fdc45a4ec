"""Prometheus metrics, scraped from a real ``prometheus_client`` HTTP server on loopback."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from pendingledger import DenyReason, PortfolioGate, PortfolioLimits
from pendingledger.events import Listener
from pendingledger.metrics import instrument
from pendingledger.stats import GateStats

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def scrape(registry: CollectorRegistry) -> Iterator[Any]:
    """``scrape()`` GETs /metrics from a server on a free loopback port: every sample, by name
    and labels."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = server.server_port

    def get() -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    yield get
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_the_scrape_shows_decisions_reservations_state_and_latency(
    gate: PortfolioGate, registry: CollectorRegistry, scrape: Any
) -> None:
    gate.budgets = {"mm": PortfolioLimits(max_order_notional=5)}
    instrument(gate, "main", registry=registry)
    assert gate.try_enter("AAA", 10)
    assert gate.try_enter("BBB", 2.5, strategy="mm")
    assert gate.try_enter("CCC", 6, strategy="mm").reason is DenyReason.MAX_ORDER_NOTIONAL
    gate.halt()
    assert gate.try_enter("DDD", 1).reason is DenyReason.HALTED

    samples = scrape()
    g = {"gate": "main"}
    decisions = "pendingledger_decisions_total"
    assert at(samples, decisions, outcome="admitted", reason="", scope="", **g) == 1
    assert at(samples, decisions, outcome="admitted", reason="", scope="mm", **g) == 1
    assert at(samples, decisions, outcome="denied", reason="halted", scope="", **g) == 1
    assert (
        at(samples, decisions, outcome="denied", reason="max_order_notional", scope="mm", **g) == 1
    )
    assert at(samples, decisions, outcome="denied", reason="max_gross_exposure", scope="", **g) == 0
    assert at(samples, "pendingledger_outstanding_reservations", **g) == 2
    assert at(samples, "pendingledger_reserved_notional", **g) == 12.5
    state = "pendingledger_trading_state"
    assert at(samples, state, pendingledger_trading_state="halted", **g) == 1
    assert at(samples, state, pendingledger_trading_state="active", **g) == 0
    assert at(samples, "pendingledger_latched", **g) == 0
    assert at(samples, "pendingledger_decision_seconds_count", **g) == 4
    assert at(samples, "pendingledger_decision_seconds_bucket", le="+Inf", **g) == 4
    assert at(samples, "pendingledger_up", **g) == 1


def test_two_gates_on_one_registry_and_close(
    ledger: Any, registry: CollectorRegistry, scrape: Any
) -> None:
    first = PortfolioGate(ledger, PortfolioLimits())
    second = PortfolioGate(ledger, PortfolioLimits())
    instrument(first, "first", registry=registry)
    handle = instrument(second, "second", registry=registry)
    with pytest.raises(ValueError, match="'second' is instrumented"):
        instrument(first, "second", registry=registry)
    second.try_enter("AAA", 1)
    samples = scrape()
    assert at(samples, "pendingledger_decision_seconds_count", gate="second") == 1
    assert at(samples, "pendingledger_decision_seconds_count", gate="first") == 0

    handle.close()
    handle.close()
    second.try_enter("BBB", 1)
    samples = scrape()
    assert not [key for key in samples if ("gate", "second") in key[1]]
    assert at(samples, "pendingledger_up", gate="first") == 1


def test_without_latency_nothing_listens_and_the_rest_is_scraped(
    gate: PortfolioGate, registry: CollectorRegistry, scrape: Any
) -> None:
    heard: list[object] = []
    handle = instrument(gate, "bare", registry=registry, latency=False)
    gate.subscribe(heard.append, timed=False)
    decision = gate.try_enter("AAA", 1)
    assert decision.admitted
    assert heard[0].seconds is None  # type: ignore[attr-defined]  # no timed listener
    samples = scrape()
    assert at(samples, "pendingledger_outstanding_reservations", gate="bare") == 1
    assert not [key for key in samples if key[0].startswith("pendingledger_decision_seconds")]
    handle.close()
    with pytest.raises(TypeError, match="latency must be a bool"):
        instrument(gate, "x", registry=registry, latency=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "error"), [("", ValueError), (7, ValueError)])
def test_a_bad_name_is_refused(gate: PortfolioGate, name: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="name must be a non-empty str"):
        instrument(gate, name, registry=CollectorRegistry())  # type: ignore[arg-type]


def test_a_gate_that_cannot_be_read_scrapes_as_down_and_warns(
    gate: PortfolioGate,
    registry: CollectorRegistry,
    scrape: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unreachable:
        """A gate whose store is down: its stats raise (as a RedisGate's do in an outage)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(gate, name)

        def stats(self) -> GateStats:
            raise ConnectionError("store down")

        def subscribe(self, listener: Listener, *, timed: bool = False) -> None:
            gate.subscribe(listener, timed=timed)

        def unsubscribe(self, listener: Listener) -> bool:
            return gate.unsubscribe(listener)

    instrument(Unreachable(), "down", registry=registry)
    caplog.set_level(logging.WARNING, "pendingledger")
    samples = scrape()
    assert at(samples, "pendingledger_up", gate="down") == 0
    assert not [key for key in samples if key[0] == "pendingledger_decisions_total"]
    assert any("store down" in r.getMessage() for r in caplog.records)


@pytest.mark.redis
def test_a_redis_gate_scrapes_its_namespace(
    client: Any, registry: CollectorRegistry, scrape: Any
) -> None:
    pytest.importorskip("redis")
    from redis_gates import new_gate

    gate = new_gate(client, PortfolioLimits(max_concurrent_positions=1))
    instrument(gate, "shared", registry=registry)
    assert gate.try_enter("AAA", 3)
    assert not gate.try_enter("BBB", 1)
    samples = scrape()
    g = {"gate": "shared"}
    assert (
        at(samples, "pendingledger_decisions_total", outcome="admitted", reason="", scope="", **g)
        == 1
    )
    assert (
        at(samples, "pendingledger_decisions_total", outcome="denied",
           reason="max_concurrent_positions", scope="", **g) == 1
    )  # fmt: skip
    assert at(samples, "pendingledger_outstanding_reservations", **g) == 1
    assert at(samples, "pendingledger_reserved_notional", **g) == 3
    assert at(samples, "pendingledger_decision_seconds_count", **g) == 2
