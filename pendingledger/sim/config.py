"""What shapes a simulated run and what it reports: ``SimConfig``, ``Progress``, ``SimResult``.

Plain frozen values, shared by every backend and by the command line (``pendingledger.cli``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal

from pendingledger.limits import PortfolioLimits

__all__ = [
    "ACCOUNT",
    "CAP_KINDS",
    "DEFAULT_SYMBOLS",
    "LIMIT_KINDS",
    "STRATEGY_CAPS",
    "Progress",
    "SimConfig",
    "SimResult",
    "strategies_config",
]

DEFAULT_SYMBOLS: Final[tuple[str, ...]] = (
    "BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT",
    "LINKUSDT", "DOTUSDT", "LTCUSDT", "ATOMUSDT", "NEARUSDT", "APTUSDT", "ARBUSDT", "OPUSDT",
)  # fmt: skip
"""The symbol universe the brains trade by default; earlier symbols are picked more often."""

LIMIT_KINDS: Final[tuple[str, ...]] = ("positions", "gross", "symbol", "net")
"""The keys of ``SimResult.breaches_by_limit``."""

CAP_KINDS: Final[tuple[str, ...]] = ("order_notional", "open_orders", "symbol_orders", "rate")
"""The keys of ``SimResult.breaches_by_cap``: the order caps (one order's notional, the open
orders in all and on one symbol, the admissions in a sliding window)."""

ACCOUNT: Final = "account"
"""The key of the account's scope in ``SimResult.scopes`` (the strategies' are their names)."""


def _check_range(name: str, pair: tuple[float, float], *, low: float = 0.0) -> None:
    a, b = pair
    if not (math.isfinite(a) and math.isfinite(b) and low <= a <= b):
        raise ValueError(
            f"{name} must be a finite (min, max) with {low} <= min <= max, got {pair!r}"
        )


def _check_int(name: str, value: object, *, low: int, none: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{none}, got {value!r}")


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes one simulated run. Times are seconds; amounts are ints (exact sums).

    Defaults make a demo where every limit binds: most decisions are denied, a few hundred
    per second are admitted, and the broken gate breaches within a second. Brains trade both
    sides: buys and sells from flat (longs and shorts), and orders that reduce the position
    held (sells against a long, buys against a short), all with ``side=`` given.
    """

    seconds: float = 3.0
    """How long the brains race (wall clock); the drain afterwards adds latency and TTL."""
    threads: int = 64
    """Number of strategy threads (brains)."""
    seed: int = 0
    """Brain ``i`` draws from ``random.Random(seed + i)``."""
    max_positions: int | None = 5
    max_gross: int | float | None = 50_000
    max_symbol: int | float | None = 15_000
    max_net: int | float | None = 30_000
    """Bounds the worst case of the whole book's signed sum (``max_net_exposure``)."""
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    notional: tuple[int, int] = (1_000, 8_000)
    """Range of entry notionals, in whole ``lot`` multiples."""
    lot: int = 100
    sell_share: float = 0.5
    """Share of the orders opening or adding to a position that are sells (shorts)."""
    reduce_share: float = 0.3
    """Share of the wishes that reduce the position held on their symbol, when there is one:
    the opposite side, at most the position's size (two at once may still flip it)."""
    outcome_weights: tuple[float, float, float, float] = (0.15, 0.47, 0.35, 0.03)
    """Relative weights of the exchange's answers: (reject, fill in full, fill in parts, lost)."""
    latency: tuple[float, float] = (0.001, 0.010)
    """Exchange answer latency range; partial fills arrive in 2-4 parts spread over it."""
    hold: tuple[float, float] = (0.02, 0.20)
    """How long a position stays open after its first fill before the router closes it."""
    think: tuple[float, float] = (0.0, 0.002)
    """Pause of a brain between two decisions; (0, 0) races flat out."""
    ttl: float = 1.0
    """Ledger TTL in clock seconds; must be well above the latency so answers land before it."""
    exchange_threads: int = 2
    duplicate_rate: float = 0.05
    """Share of answered orders whose last message the exchange sends twice (router must cope)."""
    max_decisions: int | None = None
    """Stop the race early after this many decisions in total."""
    stop_after_breaches: int | None = None
    """Stop the race early once the auditor has counted this many breaches."""
    min_admitted: int = 0
    """Race on past ``seconds`` until this many entries were admitted (but never past five
    times ``seconds``), so a slow or busy machine still sees the full mix of outcomes."""
    broken: bool = False
    """Race ``BrokenGate`` (check-then-act) instead of the backend's real gate."""
    book: Literal["cache", "gate"] = "cache"
    """Who keeps the positions: ``"cache"``, the app's own cache (the brains pass a snapshot
    callable to ``try_enter``; the router updates the cache, then releases), or ``"gate"``, the
    gate's own book (``try_enter`` without positions; the router calls ``confirm_fill`` for a
    full fill, ``set_position`` then ``reduce`` for a part, ``close_position`` to close)."""
    release_first: bool = False
    """Make the router hand off the wrong way round: release the reservation, then update the
    position cache. With it even a correct gate breaches, which shows the auditor checks the
    true exposure, not the gate's view, and why the README insists on cache first."""
    max_order_notional: int | float | None = None
    """The account's cap on one order's notional (``max_order_notional``)."""
    max_open_orders: int | None = None
    """The account's cap on outstanding orders (``max_open_orders``)."""
    max_open_orders_per_symbol: int | None = None
    max_orders_per_interval: tuple[int, float] | None = None
    """The account's ``(count, seconds)``: at most ``count`` admissions in any sliding window
    of ``seconds`` on the ledger's clock."""
    strategies: int = 0
    """0 or 1: the brains trade for the account (no budgets). N >= 2: N strategies
    (``strategy_names()``) share the account, each with a budget (``budgets()``) derived from
    the account's limits; brain ``i`` trades as strategy ``i % N``. Needs ``book="gate"`` (a
    strategy's budget is decided on the gate's own book)."""

    def __post_init__(self) -> None:
        self._check_run()
        self._check_orders()
        _check_range("latency", self.latency)
        _check_range("hold", self.hold)
        _check_range("think", self.think)
        if self.book not in ("cache", "gate"):
            raise ValueError(f"book must be 'cache' or 'gate', got {self.book!r}")
        _check_int("strategies", self.strategies, low=0)
        if self.strategies > 1:
            if self.book != "gate":
                raise ValueError(
                    f"strategies={self.strategies} needs book='gate': a strategy's budget is "
                    f"decided on the gate's own book, got book={self.book!r}"
                )
            if self.strategies > self.threads:
                raise ValueError(
                    f"strategies={self.strategies} needs at least as many threads, got "
                    f"threads={self.threads}"
                )
            if self.release_first:
                raise ValueError("release_first needs the app's cache: not with strategies")
        self.limits()  # PortfolioLimits validates the limits
        self.budgets()

    def _check_run(self) -> None:
        """How long and how wide the run is, and when it stops."""
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds)):
            raise ValueError(f"seconds must be a finite number, got {self.seconds!r}")
        if self.seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds!r}")
        for name in ("threads", "exchange_threads", "lot"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("min_admitted", self.min_admitted, low=0)
        for name in ("max_decisions", "stop_after_breaches"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=1, none=" or None")
        if not (math.isfinite(self.ttl) and self.ttl > 0):
            raise ValueError(f"ttl must be finite and > 0, got {self.ttl!r}")

    def _check_orders(self) -> None:
        """What the brains trade and what the exchange answers."""
        if not self.symbols or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"symbols must be non-empty and distinct, got {self.symbols!r}")
        low, high = self.notional
        if not (isinstance(low, int) and isinstance(high, int) and self.lot <= low <= high):
            raise ValueError(
                f"notional must be ints (min, max) with lot <= min <= max, got {self.notional!r}"
            )
        weights = self.outcome_weights
        if len(weights) != 4 or any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"outcome_weights must be 4 weights >= 0, not all 0, got {weights!r}")
        for name in ("duplicate_rate", "sell_share", "reduce_share"):
            share = getattr(self, name)
            if not (isinstance(share, (int, float)) and 0 <= share <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {share!r}")

    def limits(self) -> PortfolioLimits:
        """The account's limits: what the gate enforces and the auditor checks."""
        return PortfolioLimits(
            max_concurrent_positions=self.max_positions,
            max_gross_exposure=self.max_gross,
            max_symbol_exposure=self.max_symbol,
            max_net_exposure=self.max_net,
            max_order_notional=self.max_order_notional,
            max_open_orders=self.max_open_orders,
            max_open_orders_per_symbol=self.max_open_orders_per_symbol,
            max_orders_per_interval=self.max_orders_per_interval,
        )

    def strategy_names(self) -> tuple[str, ...]:
        """``s1`` to ``sN`` with ``strategies`` N >= 2; none otherwise."""
        n = self.strategies
        return tuple(f"s{i + 1}" for i in range(n)) if n > 1 else ()

    def strategy_of(self, brain: int) -> str | None:
        """The strategy brain number ``brain`` trades as (None: the account's own)."""
        names = self.strategy_names()
        return names[brain % len(names)] if names else None

    def budgets(self) -> dict[str, PortfolioLimits]:
        """Each strategy's budget, derived from the account's limits so that both scopes bind:
        the strategies together may ask for twice what the account allows (each gets a share
        of ``2 / N`` of the positions, gross, net and open orders, and of the rate count), and
        each may hold two thirds of the account's exposure and open orders on one symbol, so
        two strategies on a symbol meet the account's limit there. Every other strategy (the
        1st, 3rd, ...) caps one order's notional at 6/7 of the account's cap; the others have
        only the account's. A limit the account does not set, no strategy sets."""
        names = self.strategy_names()
        if not names:
            return {}
        share = 2 / len(names)
        rate = self.max_orders_per_interval
        budgets: dict[str, PortfolioLimits] = {}
        for i, name in enumerate(names):
            order = None
            if self.max_order_notional is not None and i % 2 == 0:
                order = self._lots(self.max_order_notional * 6 / 7)
            budgets[name] = PortfolioLimits(
                max_concurrent_positions=_part(self.max_positions, share),
                max_gross_exposure=self._lots_of(self.max_gross, share),
                max_symbol_exposure=self._lots_of(self.max_symbol, 2 / 3),
                max_net_exposure=self._lots_of(self.max_net, share),
                max_order_notional=order,
                max_open_orders=_part(self.max_open_orders, share),
                max_open_orders_per_symbol=_part(self.max_open_orders_per_symbol, 2 / 3),
                max_orders_per_interval=None
                if rate is None
                else (max(1, math.ceil(rate[0] * share)), rate[1]),
            )
        return budgets

    def _lots_of(self, limit: int | float | None, share: float) -> int | None:
        return None if limit is None else self._lots(limit * share)

    def _lots(self, amount: float) -> int:
        """``amount`` rounded down to whole lots (at least one)."""
        return max(1, int(amount // self.lot)) * self.lot


def _part(limit: int | None, share: float) -> int | None:
    return None if limit is None else max(1, math.ceil(limit * share))


def strategies_config(strategies: int, **changes: Any) -> SimConfig:
    """A config for ``strategies`` strategies sharing one account in which both scopes bind:
    the gate's own book, the account's order caps set (``STRATEGY_CAPS``: one order 7,000, 24
    open orders, 6 on a symbol, 40 admissions in 0.05 s), and whatever ``changes`` set on top."""
    values: dict[str, Any] = {
        "book": "gate",
        "strategies": strategies,
        **STRATEGY_CAPS,
    }
    values.update(changes)
    return SimConfig(**values)


STRATEGY_CAPS: Final[dict[str, Any]] = {
    "max_order_notional": 7_000,
    "max_open_orders": 24,
    "max_open_orders_per_symbol": 6,
    "max_orders_per_interval": (40, 0.05),
}
"""The account's order caps of ``strategies_config`` (and of ``race --strategies``)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Progress:
    """A cheap, approximate snapshot of a running simulation, for progress displays."""

    elapsed: float
    seconds: float
    decisions: int
    admitted: int
    breaches: int


@dataclass(frozen=True)
class SimResult:
    """The figures of one run. ``ok`` is what a stress test asserts.

    Exposure figures (``max_*_seen``) are the auditor's *true* state: signed open positions
    plus orders that can still fill, as worst cases (``pendingledger.rules.worst_case``),
    including the entry just admitted. ``breaches`` counts admitted decisions that raised a
    figure over its limit, or took an order cap past its limit, at any scope (the account, or
    a strategy's budget); ``breaches_by_limit`` counts per exposure limit and
    ``breaches_by_cap`` per order cap (one admission can breach several), ``scopes`` per
    scope. The exposure figures above are the account's. ``admitted`` and ``decisions``
    include the router's closing orders. Reservation figures: every admitted order's
    reservation must end exactly once, so
    ``ended_released + ended_reduced + ended_expired == admitted`` with
    ``leaked == double_ended == 0`` in a healthy run.

    A run across several processes on a shared store (``processes`` > 1, see
    ``pendingledger.sim.processes``) merges every process's figures; its exposure figures and
    ``breaches`` come from readings of the shared state (each process's check right after each of
    its admissions, and its own auditor), and ``samples``/``sampled_breaches`` count the readings
    the parent process's auditor took while the race ran and how many were over a limit.
    ``store_problems`` counts inconsistencies the store's own audit found in those readings.
    """

    gate: str
    backend: str
    seed: int
    threads: int
    seconds: float
    elapsed: float
    max_positions: int | None
    max_gross: float | None
    max_symbol: float | None
    decisions: int
    admitted: int
    denied: dict[str, int]
    rejected: int
    filled: int
    partially_filled: int
    lost: int
    expired: int
    closes: int
    duplicates: int
    late_answers: int
    max_positions_seen: int
    max_gross_seen: int
    max_symbol_seen: int
    breaches: int
    breaches_by_limit: dict[str, int]
    first_breach: str | None
    ended_released: int
    ended_reduced: int
    ended_expired: int
    leaked: int
    double_ended: int
    ledger_outstanding: int
    ledger_gross: float
    book: str = "cache"
    release_first: bool = False
    interrupted: bool = False
    notes: tuple[str, ...] = field(default=())
    processes: int = 1
    samples: int = 0
    sampled_breaches: int = 0
    store_problems: int = 0
    max_net: float | None = None
    max_net_seen: int = 0
    admitted_buys: int = 0
    admitted_sells: int = 0
    reducing_admitted: int = 0
    """Admitted orders that raised no figure (the auditor's reading), router closes included."""
    longs_opened: int = 0
    """Fills that took a symbol's position from flat or short to long."""
    shorts_opened: int = 0
    """Fills that took a symbol's position from flat or long to short."""
    breaches_by_cap: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAP_KINDS, 0))
    """Admissions that took an order cap over its limit, per cap (``CAP_KINDS``), at any scope."""
    strategies: int = 0
    scopes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per scope (``ACCOUNT``, then each strategy's name), the auditor's figures: ``limits``
    (that scope's, as ``PortfolioLimits`` fields), the peaks (``max_positions_seen``,
    ``max_gross_seen``, ``max_symbol_seen``, ``max_net_seen``, ``max_open_orders_seen``,
    ``max_symbol_orders_seen``, ``max_order_seen``, ``max_window_seen``: most admissions in one
    rate window), ``breaches`` (admissions over a limit of that scope), ``breaches_by_limit``
    (``LIMIT_KINDS`` and ``CAP_KINDS``), and the decisions made under that scope: ``decisions``,
    ``admitted`` and ``denied_here`` (denials whose ``Decision.scope`` is that scope, by
    reason). With no strategies only the account's."""

    @property
    def breaches_by_scope(self) -> dict[str, int]:
        """Admissions over a limit, per scope (``ACCOUNT`` and each strategy)."""
        return {scope: int(figures["breaches"]) for scope, figures in self.scopes.items()}

    @property
    def ok(self) -> bool:
        """No breach, every reservation ended exactly once, nothing left in the store."""
        return (
            self.breaches == 0
            and self.sampled_breaches == 0
            and self.store_problems == 0
            and self.leaked == 0
            and self.double_ended == 0
            and self.ledger_outstanding == 0
            and self.ledger_gross == 0
        )

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON-ready values (``ok`` included)."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        data["ok"] = self.ok
        return data

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
