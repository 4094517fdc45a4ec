"""What every simulated race must leave behind, whatever it raced (tests/test_stress.py,
test_race_sides.py, test_race_strategies.py)."""

from __future__ import annotations

from pendingledger.sim import MemoryBackend, SimResult


def assert_books_balance(result: SimResult, backend: MemoryBackend) -> None:
    """Every reservation ended exactly once, and the ledger agrees with the router's books."""
    assert result.leaked == 0, result
    assert result.double_ended == 0, result
    assert result.ended_released + result.ended_reduced + result.ended_expired == result.admitted
    assert result.ledger_outstanding == 0
    assert result.ledger_gross == 0
    stats = backend.ledger.stats()
    assert stats.outstanding == 0
    assert stats.gross_notional == 0
    assert stats.reserved == result.admitted
    assert stats.expired == result.ended_expired
    assert stats.released == result.ended_released + result.ended_reduced
    assert stats.reserved == stats.released + stats.expired + stats.outstanding
    # Every lost order was ended by its TTL, and nothing else expired except answered orders
    # whose answer came too late (always 0 with the ManualClock the simulation drives).
    assert result.expired == result.lost + result.late_answers
