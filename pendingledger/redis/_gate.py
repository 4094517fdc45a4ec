"""``RedisGate``: the portfolio gate with its book and reservations in Redis.

Every operation is one ``FCALL`` into the gate's Redis Functions library (``gate.lua``, loaded
once per server and reloaded when missing: ``_library``), so a decision is made and, when
admitted, reserved atomically in the server in one round trip, whatever number of processes and
hosts share the namespace.

Failure policy (the gate fails closed):

* ``try_enter`` never raises for a store problem: connection refused, timeout, a read-only replica,
  a server error all give the shared denied ``Decision`` with ``DenyReason.BACKEND_UNAVAILABLE``
  and a log record on ``logging.getLogger("pendingledger.redis")``. If the request did reach the
  server and only the reply was lost, the reservation it made expires after the TTL: the gate
  over-blocks until then, the safe direction.
* A book the server cannot vouch for (never restored, a key evicted, the fencing mark behind what
  this client saw: see ``gate.lua``) denies every decision with ``BOOK_NOT_RESTORED`` until
  ``restore``; writes to such a book raise ``BookNotRestored`` and write nothing.
* Releases (``release``, ``release_order``, ``Reservation.release()``, ``reduce``,
  ``reduce_order``) return ``False`` and log instead of raising: a lost release only over-blocks
  until the TTL.
* Writes to the book (``set_position``, ``close_position``, ``confirm_fill``, ``restore``,
  ``halt``, ``reduce_only``, ``resume``, ``record_pnl``, ``set_equity``) raise
  ``StoreUnavailable``: a lost position update would make the gate under-count, a lost loss
  keep it trading, so the caller must know (retry, or halt trading). The trading state and the
  loss latch (the day's P&L, the equity's peak, the daily reset) live in the namespace: every
  process decides on the same ones, and they survive ``restore`` (``wipe`` deletes them).

Client retries (redis-py's ``retry``; ``from_url`` sets one immediate retry) resend a call after
a connection error or a timeout, when the first attempt may have run and only its reply been lost.
The retry gets the first attempt's answer instead of running the call again:

* ``try_enter`` sends a random token stored with the reservation it makes: a repeat with the same
  order id and token is answered from it, never reserved twice. (If the first attempt was
  *denied*, the retry decides again, and ``stats()`` counts both decisions.)
* ``confirm_fill``, ``release``, ``release_order``, ``reduce_order``, ``Reservation.release()``,
  ``Reservation.reduce()``, ``set_position``, ``close_position``, ``record_pnl`` and
  ``set_equity`` send a random token per call;
  the server keeps each call's answer under it for a minute of the server's clock, and a repeat
  within that time gets that answer without running again. So a fill that landed is reported as
  landed, a release that ended a reservation returns True, and a position write is never applied
  again over a later one.
* ``restore`` sends a new generation each call and answers a repeat that finds it in the marker.
* ``halt`` and ``reduce_only`` set the operator's state (repeating them changes nothing);
  ``resume`` sends a token too, so a repeat does not start the measuring period again (and
  erase a loss recorded in between); ``wipe`` repeated reports 0 keys; reads simply run again.

Not covered: a retry arriving more than a minute after the call ran (redis-py retries at once),
and calling a method again yourself after it raised or returned False: that is a new call with a
new token. Call ``confirm_fill`` with ``symbol=`` so that such a second call still records the
position.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.typing import EncodableT

from pendingledger import _units, rules
from pendingledger.budgets import check_budgets
from pendingledger.decision import REASONS, Admitted, Decision, Denials, DenyReason, denied
from pendingledger.errors import LedgerError
from pendingledger.events import (
    Decided,
    Ended,
    EndReason,
    Listener,
    Listeners,
    Order,
    StateChanged,
    log_change,
)
from pendingledger.limits import PortfolioLimits
from pendingledger.redis._audit import Snapshot, _pairs, _s
from pendingledger.redis._audit import audit as audit_snapshot
from pendingledger.redis._library import LIBRARY, ServerCode
from pendingledger.stats import GateStats, ScopeStats
from pendingledger.trading import (
    SIDES,
    STATES,
    Latch,
    Side,
    TradingState,
    loss_state_code,
    reset_offset,
    side_code,
)

if TYPE_CHECKING:
    from pendingledger.protocols import Gate

__all__ = [
    "BookNotRestored",
    "OpenOrder",
    "RedisGate",
    "RedisGateStats",
    "RedisReservation",
    "StoreUnavailable",
    "enter",
    "micros",
    "namespace_keys",
    "position_of",
]

logger = logging.getLogger("pendingledger.redis")

Number = _units.Number

SCRIPT: Final = LIBRARY
"""The server code of every gate operation: the Functions library ``gate.lua`` as loaded."""

KEY_NAMES: Final = ("book", "expiry", "forget")
_UNAVAILABLE: Final = denied(DenyReason.BACKEND_UNAVAILABLE)
# The server names a reason by its value; a name it sends that is not a DenyReason is a KeyError,
# which try_enter turns into BACKEND_UNAVAILABLE (fail closed).
DENIALS: Final = {reason.value: denied(reason) for reason in DenyReason}
CODES: Final = {reason.value: REASONS.index(reason) for reason in DenyReason}
_LOG_EVERY: Final = 5.0  # seconds between repeated warnings about the same outage
_perf: Final = time.perf_counter
MAX_TTL: Final = 365 * 86_400.0
"""The longest ``ttl`` (seconds): the server code's clock counts microseconds in doubles, exact
below 2^52 (year 2112), and a reservation's expiry must stay there."""


class StoreUnavailable(LedgerError, ConnectionError):
    """Redis could not confirm a write to the book (the cause is chained as ``__cause__``).

    Raised by the writes whose loss would make the gate under-count (``set_position``,
    ``confirm_fill``, ...). ``try_enter`` never raises it: it denies instead.
    """


class BookNotRestored(StoreUnavailable):
    """The book in Redis cannot be trusted (never restored, a key evicted, or the server went
    back in its history: see the README, "Fencing"): nothing was written. Call ``restore``."""


class OpenOrder(NamedTuple):
    """An order already at the exchange, handed to ``RedisGate.restore`` to be reserved again
    (``side``: ``Side.BUY``, ``Side.SELL``, ``"buy"``, ``"sell"`` or None, as in ``try_enter``;
    ``strategy``: the strategy it belongs to, or None: the account's own)."""

    symbol: str
    notional: Number
    order_id: str | None = None
    side: Side | str | None = None
    strategy: str | None = None


OpenOrderLike = (
    OpenOrder
    | tuple[str, Number]
    | tuple[str, Number, str | None]
    | tuple[str, Number, str | None, Side | str | None]
    | tuple[str, Number, str | None, Side | str | None, str | None]
)
"""What ``restore`` takes for an open order: an ``OpenOrder`` or a tuple of its fields."""


@dataclass(frozen=True, kw_only=True)
class RedisGateStats(GateStats):
    """Counts for the whole namespace (every process sharing it), read in one server call.

    ``admitted`` and ``denied`` as in ``GateStats``; ``denied[BACKEND_UNAVAILABLE]`` is this gate
    object's own count (the store cannot count the decisions it never saw). ``gross_notional``
    is what is reserved, in the kind of amounts reserved (``_units.to_number``). ``released``,
    ``filled`` and ``expired`` count how reservations ended; ``restored`` those made by
    ``restore``; ``corrupt`` bookkeeping errors the server code found (always 0 unless the keys
    were edited by hand).
    """

    outstanding: int
    gross_notional: Number
    released: int
    filled: int
    expired: int
    restored: int
    corrupt: int


def _unencodable(exc: UnicodeError) -> ValueError:
    """The ``ValueError`` for a symbol or order id the client cannot encode (a lone surrogate,
    say): raised while the command was packed, before anything was sent, so bad input, not an
    outage."""
    return ValueError(f"symbols and order ids must be encodable by the Redis client: {exc}")


def namespace_keys(namespace: object) -> tuple[str, ...]:
    """The keys of ``namespace`` (checked: a non-empty str without braces), in server order."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {namespace!r}")
    if not namespace or "{" in namespace or "}" in namespace:
        raise ValueError(f"namespace must be a non-empty str without braces, got {namespace!r}")
    return tuple(f"pendingledger:{{{namespace}}}:{name}" for name in KEY_NAMES)


def micros(seconds: float) -> int:
    """Whole microseconds for ``seconds``, rounded up (TTLs, and the test clock's steps: the
    same rounding, so advancing the test clock by ``ttl`` always reaches a TTL's end)."""
    return math.ceil(seconds * 1_000_000)


def _token() -> str:
    return os.urandom(8).hex()


def _seconds(name: str, value: object, *, zero: bool = False) -> float:
    """A finite number of seconds (> 0, or >= 0 with ``zero``), checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound} seconds, got {value!r}")
    return float(value)


def _position_value(name: str, exposure: object) -> tuple[int, str]:
    """A position as stored: its magnitude in units, and a code of its sign and the letter of
    its kind (``_units.kind_of``)."""
    units = _units.units(name, exposure, True)
    return abs(units), f"{'-' if units < 0 else '+'}{chr(97 + _units.kind_of(exposure))}"


def check_strategy(name: str, strategy: object) -> str:
    """A strategy argument as the server code takes it: '' for None (the account's own), else
    the name as an exact, non-empty ``str`` (``_units.check_strategy``, as in process)."""
    try:
        return _units.check_strategy(strategy)
    except (TypeError, ValueError) as exc:
        if name == "strategy":
            raise
        raise type(exc)(f"{name}: {exc}") from None


def scope_config(unit: rules.UnitLimits, ttl_us: int) -> str:
    """A scope's limits as the server code takes them (gate.lua, ``config``): "ttl_us|max_pos|
    max_gross|max_sym|max_net|max_order|max_open_orders|max_open_orders_per_symbol|rate_count|
    rate_us", a limit '' when none; the rate window in whole microseconds, rounded up."""
    parts = [unit.max_positions, unit.max_gross, unit.max_symbol, unit.max_net, unit.max_order,
             unit.max_open_orders, unit.max_symbol_orders, unit.rate_count]  # fmt: skip
    encoded = ["" if value == rules.NO_LIMIT else str(value) for value in parts]
    rate_us = "" if unit.rate_count == rules.NO_LIMIT else str(micros(unit.rate_seconds))
    return "|".join([str(ttl_us), *encoded, rate_us])


class _Scopes:
    """What a decision reads, once: the account's limits and the budgets, encoded. Replaced
    whole (under the gate's own lock) when either changes, so a decision uses one pair."""

    __slots__ = ("budgets", "config", "configs", "limits", "loss_config", "units")

    def __init__(self, limits: PortfolioLimits, config: str, loss_config: str,
                 budgets: Mapping[str, rules.UnitLimits], ttl_us: int) -> None:  # fmt: skip
        self.limits = limits
        self.config = config
        self.loss_config = loss_config
        self.units = budgets
        self.budgets: Mapping[str, PortfolioLimits] = MappingProxyType(
            {name: unit.source for name, unit in budgets.items()}
        )
        self.configs = {name: scope_config(unit, ttl_us) for name, unit in budgets.items()}


def _reset_offset_us(daily_reset: object) -> int:
    """``daily_reset`` (``trading.reset_offset``'s checks) in whole microseconds after midnight
    UTC, as the server code's clock counts."""
    return round(reset_offset(daily_reset) * 1_000_000)


def _latch_of(reply: Sequence[Any]) -> Latch | None:
    """The server code's latch reply (see ``trading`` in gate.lua), or None when empty."""
    if not reply:
        return None
    state, reason, limit, value, kinds, at, until = reply
    return Latch(
        state=STATES[int(state)],
        reason=rules.LATCH_REASONS[int(reason)],
        limit=_units.to_number(int(_s(limit)), int(kinds)),
        value=_units.to_number(int(_s(value)), int(kinds)),
        at=int(_s(at)) / 1_000_000,
        until=int(_s(until)) / 1_000_000,
    )


def position_of(units: str, code: str) -> Number:
    """A stored position (``p:`` units and ``k:`` code) in the kind of amount it was set with."""
    n = int(units)
    return _units.to_number(-n if code.startswith("-") else n, ord(code[1]) - 97)


def _socket_timeout(client: Any) -> object:
    """The client's socket timeout, or None when it has none."""
    if isinstance(client, RedisCluster):
        kwargs = client.nodes_manager.connection_kwargs
    else:
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    return kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None


class _LogThrottle:
    """Warn about the first store failure, then at most every few seconds, then on recovery."""

    __slots__ = ("_failing", "_last", "_suppressed")

    def __init__(self) -> None:
        self._failing = False
        self._last = -math.inf
        self._suppressed = 0

    def failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if self._failing and now - self._last < _LOG_EVERY:
            self._suppressed += 1
            logger.debug("%s: %s: %s", what, type(exc).__name__, exc)
            return
        more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
        self._failing = True
        self._last = now
        self._suppressed = 0
        logger.warning(
            "%s failed closed: Redis could not confirm it: %s: %s%s",
            what,
            type(exc).__name__,
            exc,
            more,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )

    def ok(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("Redis answers again (%d failure(s) not logged)", self._suppressed)
            self._suppressed = 0


class RedisGate:
    """Portfolio limits enforced across processes and hosts, with the book in one Redis.

    ``client`` is a ``redis.Redis`` or a ``redis.cluster.RedisCluster``: give it a socket timeout
    (``from_url`` does; a client without one gets a warning) so a hung server denies quickly
    instead of blocking a trading thread. ``ttl`` (seconds) is how long a reservation lives if
    nothing ends it, measured by the server's clock (``TIME``, read inside the server code; never
    the client's). Tests move that clock for one namespace with ``pendingledger.redis.testing``
    instead of sleeping. ``namespace`` names one book: every process that shares limits uses the
    same one. All its keys are ``pendingledger:{<namespace>}:<name>``: the ``{namespace}`` hash
    tag puts them in one Redis Cluster slot.

    Decisions match ``PortfolioGate`` (same ``Decision``, ``DenyReason``, rule order and limit
    semantics: ``rules.first_failing_rule``, which the conformance suite holds the server code
    to); amounts count in units of ``10**-9`` exactly as in process (``pendingledger._units``),
    and symbols and order ids are non-empty ``str``. A new or wiped namespace denies with
    ``BOOK_NOT_RESTORED`` until ``restore()`` is called, and so does a book the server can no
    longer vouch for: a key evicted, or the server behind the fencing mark this client saw (it
    lost writes: a failover, a fail-back, a restart from an old snapshot).

    ``min_replicas`` (default 0): an admission is answered only once that many replicas have it
    (``WAIT``, pipelined in the same round trip, for at most ``replica_timeout`` seconds); if
    fewer confirm, its reservation is released and the decision denied with
    ``BACKEND_UNAVAILABLE``. Needs a ``redis.Redis`` client (a cluster client cannot pipeline
    ``WAIT`` to the namespace's node).
    """

    __slots__ = (
        "_book_log",
        "_client",
        "_code",
        "_denials",
        "_keys",
        "_listeners",
        "_log",
        "_min_replicas",
        "_namespace",
        "_on_loss",
        "_reset_us",
        "_scopes",
        "_scopes_lock",
        "_seen",
        "_seen_lock",
        "_ttl",
        "_ttl_us",
        "_unavailable",
        "_unavailable_by",
        "_unavailable_lock",
        "_wait_ms",
    )

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        limits: PortfolioLimits,
        *,
        ttl: float,
        namespace: str,
        min_replicas: int = 0,
        replica_timeout: float = 0.1,
        on_loss: TradingState = TradingState.REDUCING,
        daily_reset: datetime.time = datetime.time(0, 0),
        budgets: Mapping[str, PortfolioLimits] | None = None,
    ) -> None:
        self._on_loss = loss_state_code(on_loss)
        self._reset_us = _reset_offset_us(daily_reset)
        self._ttl = _seconds("ttl", ttl)
        if self._ttl > MAX_TTL:
            raise ValueError(f"ttl must be at most {MAX_TTL:g} seconds (a year), got {ttl!r}")
        keys = namespace_keys(namespace)
        if isinstance(min_replicas, bool) or not isinstance(min_replicas, int):
            raise TypeError(f"min_replicas must be an int, got {min_replicas!r}")
        if min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {min_replicas!r}")
        wait = _seconds("replica_timeout", replica_timeout)
        if min_replicas and isinstance(client, RedisCluster):
            raise ValueError("min_replicas needs a redis.Redis client, got a RedisCluster")
        # Never 0: a zero TTL would expire a reservation in the step that makes it; WAIT 0 is
        # "wait forever".
        self._ttl_us = max(1, micros(self._ttl))
        self._wait_ms = max(1, math.ceil(wait * 1000))
        self._min_replicas = min_replicas
        self._client = client
        self._namespace = namespace
        self._keys = keys
        self._scopes_lock = threading.Lock()
        self._scopes = self._encode(limits, check_budgets(budgets))
        self._denials = Denials()
        self._code = ServerCode(client, keys)
        self._log = _LogThrottle()
        self._unavailable = 0
        self._unavailable_by: dict[str, int] = {}  # of those, by strategy
        self._unavailable_lock = threading.Lock()
        self._listeners = Listeners()
        self._book_log = _Every()
        self._seen = rules.ACTIVE  # the trading state this gate last saw (ACTIVE until one)
        self._seen_lock = threading.Lock()
        if _socket_timeout(client) is None:
            warnings.warn(
                f"RedisGate(namespace={namespace!r}): the client has no socket_timeout, so a "
                "hung server blocks try_enter instead of denying; set one "
                "(RedisGate.from_url(..., timeout=) does)",
                RuntimeWarning,
                stacklevel=2,
            )

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: PortfolioLimits,
        *,
        ttl: float,
        namespace: str,
        timeout: float = 0.5,
        retries: int = 1,
        cluster: bool = False,
        min_replicas: int = 0,
        replica_timeout: float = 0.1,
        on_loss: TradingState = TradingState.REDUCING,
        daily_reset: datetime.time = datetime.time(0, 0),
        budgets: Mapping[str, PortfolioLimits] | None = None,
        **client_kwargs: Any,
    ) -> RedisGate:
        """A gate on a new client for ``url`` with settings that fail closed quickly.

        ``timeout`` (seconds) bounds each command and each connect; ``retries`` immediate
        retries follow a connection error or timeout (what a retry answers: see the module
        docstring). ``cluster=True`` makes a ``RedisCluster`` client, which tries one node once
        per call (no retries across the cluster: a stopped node denies within ``timeout``).
        """
        seconds = _seconds("timeout", timeout)
        client: redis.Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(
                url,
                socket_timeout=seconds,
                socket_connect_timeout=seconds,
                retry=Retry(NoBackoff(), 0),  # redis-py >= 6: the cluster's retries too
                **client_kwargs,
            )
        else:
            client = redis.Redis.from_url(
                url,
                socket_timeout=seconds,
                socket_connect_timeout=seconds,
                retry=Retry(NoBackoff(), retries),
                **client_kwargs,
            )
        return cls(
            client,
            limits,
            ttl=ttl,
            namespace=namespace,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            on_loss=on_loss,
            daily_reset=daily_reset,
            budgets=budgets,
        )

    def _encode(self, limits: object, budgets: Mapping[str, rules.UnitLimits]) -> _Scopes:
        """``limits`` and ``budgets`` as a decision reads them: the scopes' config arguments
        (``scope_config``) and the loss calls' "max_daily_loss|max_drawdown|kinds|on_loss|
        reset_us", limits in units (``rules.unit_limits``), '' for a limit not set; kinds
        those the loss limits were given in."""
        unit = rules.unit_limits(limits)
        loss = [
            "" if value == rules.NO_LIMIT else str(value)
            for value in (unit.max_daily_loss, unit.max_drawdown)
        ]
        loss_config = "|".join([*loss, *map(str, (unit.loss_kinds, self._on_loss, self._reset_us))])
        return _Scopes(unit.source, scope_config(unit, self._ttl_us), loss_config, budgets,
                       self._ttl_us)  # fmt: skip

    @property
    def _config(self) -> str:
        return self._scopes.config

    @property
    def _loss_config(self) -> str:
        return self._scopes.loss_config

    # ------------------------------------------------------------------ properties

    @property
    def client(self) -> redis.Redis | RedisCluster:
        return self._client

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def keys(self) -> tuple[str, ...]:
        """The namespace's keys, all under the hash tag ``{namespace}``."""
        return self._keys

    @property
    def server(self) -> ServerCode:
        """The calls into the server library (for ``pendingledger.redis.testing`` and
        diagnostics): its ``mark`` is the highest fencing mark this gate object has seen."""
        return self._code

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def min_replicas(self) -> int:
        return self._min_replicas

    @property
    def limits(self) -> PortfolioLimits:
        """The account's limits this gate object applies (per process: they travel with each
        decision). Assign a new ``PortfolioLimits`` at any time; each decision uses one
        consistent pair of limits and budgets."""
        return self._scopes.limits

    @limits.setter
    def limits(self, limits: PortfolioLimits) -> None:
        with self._scopes_lock:  # a budgets assignment at the same time is not lost
            self._scopes = self._encode(limits, self._scopes.units)

    @property
    def budgets(self) -> Mapping[str, PortfolioLimits]:
        """The strategies' budgets (strategy name -> its ``PortfolioLimits``), read-only.
        Assign a new mapping (or None: none) at any time, as ``limits``; a budget may not set
        loss limits (they are the account's). Bad budgets raise and change nothing."""
        return self._scopes.budgets

    @budgets.setter
    def budgets(self, budgets: Mapping[str, PortfolioLimits] | None) -> None:
        checked = check_budgets(budgets)
        with self._scopes_lock:
            self._scopes = self._encode(self._scopes.limits, checked)

    # ------------------------------------------------------------------ decisions

    def try_enter(
        self,
        symbol: str,
        notional: Number,
        positions: None = None,
        *,
        order_id: str | None = None,
        side: Side | str | None = None,
        strategy: str | None = None,
    ) -> Decision:
        """Check the limits against the book and reservations in Redis and, if they pass,
        reserve ``notional`` on ``symbol`` under ``side`` (``Side.BUY``, ``Side.SELL``, "buy",
        "sell", or None: not known): one atomic server call, one round trip.

        With ``strategy`` (a key of ``budgets``; any other raises ``ValueError`` and sends
        nothing) the same call checks that strategy's budget over its own positions and
        reservations, then the account's limits over everything; a denial's ``scope`` says
        whose limit it was (the strategy's name, or None). The reservation is the strategy's.

        ``positions`` must be left out: the position book lives in Redis (``set_position``,
        ``confirm_fill``). Bad arguments raise ``ValueError``/``TypeError`` before anything is
        sent (symbols and order ids: non-empty ``str``, as in process); so does an ``order_id``
        that already has an outstanding reservation. Without ``order_id`` the gate names the
        order (a random hex id). A store that cannot confirm the decision gives
        ``DenyReason.BACKEND_UNAVAILABLE`` (logged), never an exception and never an admission.
        """
        if positions is not None:
            raise TypeError(
                "RedisGate keeps the position book in Redis: call try_enter without positions "
                f"and keep the book with set_position()/confirm_fill(), got positions={positions!r}"
            )
        listening = bool(self._listeners.active)
        start = _perf() if listening and self._listeners.timing else -1.0
        decision = enter(self, symbol, notional, order_id, "", side, strategy)
        assert decision is not None  # None only answers the test mode 'check'
        if not decision.admitted:
            self._log_denial(decision, symbol, notional)
        if listening:
            side_of = None if side is None else SIDES[side_code(side)]
            seconds = None if start < 0 else _perf() - start
            event = Decided(decision, Order(symbol, notional, side_of, strategy), seconds)
            self._listeners.emit(event)
        return decision

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: Listener, *, timed: bool = False) -> None:
        """Call ``listener`` with the events this gate sees, as ``PortfolioGate.subscribe``
        does, in the calling thread after the server's answer: every decision it makes; the
        ends it makes by order id or handle (``release_order``, ``reduce_order``,
        ``confirm_fill``, a handle's ``release``/``reduce``); and each change of the trading
        state its own calls see, with the latch then in force (``previous``: the state it saw
        last, ``ACTIVE`` before its first reading).

        What it cannot see is not told: reservations that expire (the server drops them
        during any process's call), ``release(symbol)`` (the server answers a count, not the
        orders), and another process's decisions, ends and state changes until one of this
        gate's calls reads the state they left."""
        self._listeners.add(listener, timed)

    def unsubscribe(self, listener: Listener) -> bool:
        """Undo one ``subscribe(listener)``; whether there was one to undo."""
        return self._listeners.remove(listener)

    def _log_denial(self, decision: Decision, symbol: str, notional: Number) -> None:
        if decision.reason is DenyReason.BOOK_NOT_RESTORED:
            if self._book_log.due():
                logger.warning(
                    "try_enter(%r) denied with book_not_restored: namespace %r admits nothing "
                    "until its book is restored (RedisGate.restore)",
                    symbol,
                    self._namespace,
                )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("denied %s %r on %r", decision.reason, notional, symbol)

    def _ended(self, order_id: str, how: EndReason, res: RedisReservation | None) -> None:
        if self._listeners.active:
            self._listeners.emit(Ended(order_id, how, res))

    def _saw_state(self, code: int, latch_reply: Sequence[Any] | None = None) -> None:
        """Note the trading state a reply carried; tell a change (reading the latch for it)."""
        with self._seen_lock:
            was, self._seen = self._seen, code
        if was == code:
            return
        if latch_reply is None:
            try:
                latch_reply = self._trading()[2]
            except StoreUnavailable:
                latch_reply = []
        latch = _latch_of(latch_reply)
        event = StateChanged(STATES[code], STATES[was], latch)
        log_change(event, f"namespace {self._namespace!r}")
        self._listeners.emit(event)

    def _admitted(self, name: str, oid: str, notional: Number, units: int, token: str,
                  side: int, strategy: str, reply: Sequence[Any]) -> Decision:  # fmt: skip
        res = RedisReservation._new(
            self, name, oid, notional, units, token=token, side=side,
            reserved_us=int(_s(reply[1])), expires_us=int(float(_s(reply[2]))),
            strategy=strategy,
        )  # fmt: skip
        return Admitted(res)

    def _denied(self, reply: Sequence[Any]) -> Decision:
        """The denial the server code answered: its reason and scope (a strategy's name, or
        '' for the account's)."""
        reason = _s(reply[1])
        scope = _s(reply[2]) if len(reply) > 2 else ""
        if not scope:
            return DENIALS[reason]
        return self._denials.of(CODES[reason], scope)

    def _unavailable_decision(self, what: str, exc: Exception, strategy: str = "") -> Decision:
        """The shared ``BACKEND_UNAVAILABLE`` decision for a call the store did not confirm
        (counted and logged); a symbol or order id the client cannot encode raises instead."""
        if isinstance(exc, UnicodeError):
            raise _unencodable(exc) from exc
        with self._unavailable_lock:
            self._unavailable += 1
            if strategy:
                self._unavailable_by[strategy] = self._unavailable_by.get(strategy, 0) + 1
        self._log.failed(what, exc)
        return _UNAVAILABLE

    def _replicated(self, args: Sequence[EncodableT]) -> list[Any]:
        """``enter`` and ``WAIT`` in one round trip; an admission fewer replicas confirmed is
        released again and raises (the caller denies)."""
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            self._code.queue(pipe, "enter", *args)
            pipe.execute_command("WAIT", self._min_replicas, self._wait_ms)
            reply, acks = pipe.execute(raise_on_error=False)
            if isinstance(reply, redis.ResponseError):
                if attempt == 0 and "function not found" in str(reply).lower():
                    self._code.load()
                    continue
                raise reply
            break
        answer = self._code.answer(reply)
        if _s(answer[0]) == "A" and (isinstance(acks, Exception) or acks < self._min_replicas):
            # args: symbol, units, order_id, token, config, kind, mode, side, strategy, ...
            self._release_call(
                "release_order", "release_order", args[2], args[3], args[0], "1", args[8]
            )
            raise redis.ConnectionError(
                f"{acks!r} replica(s) confirmed the admission within {self._wait_ms} ms, "
                f"{self._min_replicas} required: released"
            )
        return answer

    # ------------------------------------------------------------------ releases

    def release(self, symbol: str) -> bool:
        """Drop every reservation on ``symbol``. True if any was dropped; False (logged) if the
        store cannot be reached: the reservations then expire after the TTL."""
        name = _units.check_symbol(symbol)
        reply = self._release_call("release", "release_symbol", name)
        return reply is not None and int(reply[0]) > 0

    def release_order(self, order_id: str) -> bool:
        """Drop the reservation of ``order_id``. True if it was outstanding (see ``release``)."""
        oid = _units.check_order_id(order_id)
        reply = self._release_call("release_order", "release_order", oid, "", "", "", "")
        done = reply is not None and int(reply[0]) == 1
        if done:
            self._ended(oid, EndReason.RELEASED, None)
        return done

    def reduce_order(self, order_id: str, amount: Number) -> bool:
        """Shrink the reservation of ``order_id`` by ``amount`` (a partial fill: finite, > 0),
        as ``Reservation.reduce`` does; at zero it ends as filled. True if it was outstanding;
        False if not, or (logged) if the store cannot be reached."""
        oid = _units.check_order_id(order_id)
        down, up = _units.reduction_units("amount", amount)
        reply = self._release_call("reduce_order", "reduce", oid, "", down, up, "", "")
        if reply is not None and _s(reply[0]) == "E":
            self._ended(oid, EndReason.REDUCED, None)
        return reply is not None and _s(reply[0]) != "G"

    def _release_call(self, what: str, op: str, *args: EncodableT) -> list[Any] | None:
        """A call that ends or shrinks reservations: its answer, or None (logged) if the store
        did not confirm it or the book is not restored."""
        try:
            reply = self._code.call(op, _token(), *args)
        except Exception as exc:
            if isinstance(exc, UnicodeError):
                raise _unencodable(exc) from exc
            self._log.failed(f"{what}({args[0]!r})", exc)
            return None
        self._log.ok()
        if _s(reply[0]) == "D":
            logger.warning("%s(%r): not done: the book is not restored", what, args[0])
            return None
        return reply

    # ------------------------------------------------------------------ the position book

    def set_position(self, symbol: str, exposure: Number, *, strategy: str | None = None) -> None:
        """Record ``strategy``'s part of ``symbol``'s position (signed: long > 0, short < 0;
        None: the account's own part; a part set is open, even at exposure 0, until
        ``close_position``). The account's position is the sum of the parts (what the exchange
        account holds). ``strategy`` need not have a budget. Raises ``StoreUnavailable`` if the
        store cannot confirm it, ``BookNotRestored`` (nothing written) if the book is not in
        place."""
        name = _units.check_symbol(symbol)
        units, code = _position_value("exposure", exposure)
        strat = check_strategy("strategy", strategy)
        self._write("set_position", ("set_position", _token(), name, units, code, strat))

    def close_position(self, symbol: str, *, strategy: str | None = None) -> bool:
        """Remove ``strategy``'s part (None: the account's own) of ``symbol``'s position. True if
        it was open. The account's symbol stays open while any part is."""
        name = _units.check_symbol(symbol)
        strat = check_strategy("strategy", strategy)
        reply = self._write("close_position", ("close_position", _token(), name, strat))
        return _s(reply[0]) == "1"

    def confirm_fill(
        self,
        order_id: str,
        position_exposure: Number,
        *,
        symbol: str | None = None,
        filled: Number | None = None,
        strategy: str | None = None,
    ) -> bool:
        """The fill of ``order_id`` landed: set its symbol's position to ``position_exposure``
        (the whole position after the fill: the part of the reservation's strategy, see
        ``set_position``) and end the reservation, in one atomic step; with
        ``filled`` (a partial fill: finite, > 0) reduce it by that amount instead, as
        ``reduce_order`` does (it ends as filled when nothing stays).

        Returns True if a reservation was outstanding. If it had already ended (expired,
        released), the position is still recorded when ``symbol`` is given, and False is
        returned; without ``symbol`` nothing is written (the gate cannot tell which symbol to
        book), False is returned and a warning logged: pass ``symbol`` so a late fill is never
        lost. A ``symbol`` different from the reservation's raises ``ValueError`` and writes
        nothing, and so does a ``strategy`` given (not None) that is not the reservation's;
        with no reservation outstanding, ``strategy``'s part is set (None: the account's own).
        """
        oid = _units.check_order_id(order_id)
        sym = "" if symbol is None else _units.check_symbol(symbol)
        units, code = _position_value("position_exposure", position_exposure)
        down, up = ("", "") if filled is None else _units.reduction_units("filled", filled)
        strat = check_strategy("strategy", strategy)
        reply = self._write(
            "confirm_fill", ("fill", _token(), oid, units, code, sym, down, up, strat)
        )
        status = _s(reply[0])
        if status == "F":
            self._ended(oid, EndReason.FILLED, None)
        if status in ("F", "R"):
            return True
        if status == "P":
            return False
        if status == "M":
            raise ValueError(
                f"order {oid!r} is reserved on {_s(reply[1])!r}, not on symbol={sym!r}"
            )
        if status == "T":
            actual = _s(reply[1]) or None
            raise ValueError(
                f"order {oid!r} is reserved under strategy {actual!r}, not strategy={strategy!r}"
            )
        logger.warning(
            "confirm_fill(%r): no outstanding reservation (released or expired) and no symbol "
            "given, so the position was NOT recorded; pass symbol= to record late fills",
            oid,
        )
        return False

    def _write(self, what: str, args: Sequence[EncodableT]) -> list[Any]:
        op, *rest = args
        try:
            reply = self._code.call(str(op), *rest)
        except redis.ResponseError as exc:
            if "amount overflow" in str(exc):
                raise ValueError(f"{what}: {exc}") from exc
            self._log.failed(what, exc)
            raise StoreUnavailable(f"{what} not recorded: {exc}") from exc
        except redis.RedisError as exc:
            self._log.failed(what, exc)
            raise StoreUnavailable(f"{what} not recorded: {exc}") from exc
        except UnicodeError as exc:
            raise _unencodable(exc) from exc
        self._log.ok()
        if reply and _s(reply[0]) == "D":
            raise BookNotRestored(
                f"{what} not recorded: the book in namespace {self._namespace!r} is not "
                "restored (never restored, a key evicted, or the server lost writes): "
                "call restore()"
            )
        return reply

    def restore(
        self,
        positions: Mapping[str, Number],
        open_orders: Iterable[OpenOrderLike] = (),
        *,
        only_if_missing: bool = False,
        strategies: Mapping[str, Mapping[str, Number]] | None = None,
    ) -> list[RedisReservation] | None:
        """Replace the namespace's book and reservations and write its generation marker.

        Call it at start-up with the positions and open orders from the exchange (an empty book
        for a fresh deployment: ``restore({})``), and whenever decisions are denied with
        ``BOOK_NOT_RESTORED``. Every open order is reserved again, unchecked (it is already at
        the exchange), with a fresh TTL, under its side if it has one (``OpenOrder.side``, or a
        tuple's fourth item). The trading state, the loss latch and its day, and the stats are
        kept. With
        ``only_if_missing`` nothing is written if the book is in place (several processes may
        start together: the first restores, the others return None). Returns the reservations
        made for ``open_orders``. Raises ``StoreUnavailable`` if the store cannot confirm it.

        ``positions`` are the account's own parts; ``strategies`` maps a strategy's name to its
        parts (symbol -> exposure), and an open order's ``strategy`` is the strategy it belongs
        to. The scopes' counts and order-rate windows are kept, as the stats are.
        """
        if not isinstance(positions, Mapping):
            raise TypeError(f"positions must be a mapping of symbol to exposure, got {positions!r}")
        if strategies is None:
            strategies = {}
        if not isinstance(strategies, Mapping):
            raise TypeError(
                f"strategies must be a mapping of strategy name to positions, got {strategies!r}"
            )
        generation = uuid.uuid4().int >> 75 or 1  # 53 bits: exact in the server code's doubles
        args: list[EncodableT] = ["restore", "1" if only_if_missing else "0", generation,
                                  self._ttl_us, len(positions)]  # fmt: skip
        for symbol, exposure in positions.items():
            name = _units.check_symbol(symbol)
            args += [name, *_position_value(f"positions[{symbol!r}]", exposure)]
        parts: list[EncodableT] = []
        for strategy, book in strategies.items():
            if strategy is None:
                raise TypeError("strategies: a key must be a strategy's name, got None")
            strat = check_strategy(f"strategies key {strategy!r}", strategy)
            if not isinstance(book, Mapping):
                raise TypeError(f"strategies[{strategy!r}] must be a mapping, got {book!r}")
            for symbol, exposure in book.items():
                name = _units.check_symbol(symbol)
                where = f"strategies[{strategy!r}][{symbol!r}]"
                parts += [strat, name, *_position_value(where, exposure)]
        args += [len(parts) // 4, *parts]
        pending = _open_orders(open_orders)
        for order_id, symbol, notional, units, token, side, strat in pending:
            args += [order_id, symbol, units, token, _units.kind_of(notional), str(side), strat]
        reply = self._write("restore", args)
        if _s(reply[0]) == "S":
            return None
        now = int(_s(reply[1]))
        expires = now + self._ttl_us
        return [
            RedisReservation._new(
                self,
                symbol,
                oid,
                notional,
                units,
                token=token,
                side=side,
                reserved_us=now,
                expires_us=expires,
                strategy=strat,
            )
            for oid, symbol, notional, units, token, side, strat in pending
        ]

    def positions(self, *, strategy: str | None = None) -> dict[str, Number]:
        """The position book in Redis: symbol -> exposure. None: the account's positions (the
        sums of the parts: what the exchange holds; a symbol with one part open gives that
        part's value as set, else the sum in the union of the parts' kinds of amount); a
        strategy's name: its parts. Exact to ``10**-9``, magnitudes rounded up when set."""
        strat = check_strategy("strategy", strategy)
        try:
            reply = self._code.call("positions", strat)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"position book not readable: {exc}") from exc
        book = _pairs(reply[1])
        key = f"{len(strat.encode())}:{strat}" if strat else ":"
        p, k = ("P" + key, "K" + key) if strat else ("p:", "k:")
        return {
            name[len(p) :]: position_of(v, book.get(k + name[len(p) :], "+a"))
            for name, v in book.items()
            if name.startswith(p)
        }

    def wipe(self) -> int:
        """Delete every key of the namespace (book, reservations, marker, halt flag, stats), as
        at the end of a test or a simulation run. Decisions are then denied with
        ``BOOK_NOT_RESTORED`` until ``restore``. Returns the number of keys deleted."""
        try:
            return int(self._client.delete(*self._keys))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"wipe not done: {exc}") from exc

    def book_restored(self) -> bool:
        """True if the namespace's book is in place (decisions are not ``BOOK_NOT_RESTORED``).
        A book found untrustworthy (a key evicted, the server behind this client's fencing mark)
        has its marker withdrawn by this call, as by a decision."""
        try:
            reply = self._code.call("marker")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"marker not readable: {exc}") from exc
        return _s(reply[0]) == "1"

    # ------------------------------------------------------------------ trading state, latch

    def halt(self) -> None:
        """Deny every entry in the namespace (all processes) with ``HALTED`` until ``resume()``.
        Works on any namespace, restored or not."""
        self._control("halt", rules.HALTED_STATE)

    def reduce_only(self) -> None:
        """Admit only orders that raise no figure (``REDUCING_ONLY`` for the others), in the
        whole namespace, until ``resume()``. Works on any namespace, restored or not."""
        self._control("reduce_only", rules.REDUCING)

    def resume(self) -> None:
        """Back to ``ACTIVE``: clears the loss latch too and starts a new measuring period (the
        day's P&L 0, the peak the last equity set)."""
        self._control("resume", rules.ACTIVE)

    def _control(self, what: str, state: int) -> None:
        self._write(what, ("control", "state", state, _token()))
        try:
            reply = self._trading()
        except StoreUnavailable:
            return  # done; the change is told when a later call sees it
        self._saw_state(int(reply[0]), reply[2])

    def record_pnl(self, amount: Number) -> None:
        """Add ``amount`` (finite, signed: a loss is negative) to the day's realized P&L in the
        namespace, and latch into ``on_loss`` if it reaches ``-limits.max_daily_loss``: one
        server call, after which no decision in any process is admitted on the old state.
        Works on any namespace, restored or not. Raises ``StoreUnavailable`` if the store cannot
        confirm it (a retry after a lost reply is answered, never counted twice)."""
        units = _units.units("amount", amount, False)
        self._loss_call("record_pnl", units, amount)

    def set_equity(self, equity: Number) -> None:
        """Record the account's ``equity`` (finite, signed) and latch into ``on_loss`` if it
        falls ``limits.max_drawdown`` below its peak since the last reset (or ``resume()``)."""
        units = _units.units("equity", equity, False)
        self._loss_call("set_equity", units, equity)

    def _loss_call(self, op: str, units: int, amount: Number) -> None:
        reply = self._write(op, (op, _token(), units, _units.kind_of(amount), self._loss_config))
        self._saw_state(int(reply[0]))

    def _trading(self) -> list[Any]:
        try:
            return self._code.call("trading")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"trading state not readable: {exc}") from exc

    @property
    def state(self) -> TradingState:
        """The namespace's trading state: the operator's or the loss latch's, the stricter."""
        reply = self._trading()
        self._saw_state(int(reply[0]), reply[2])
        return STATES[int(reply[0])]

    @property
    def halted(self) -> bool:
        return self.state is TradingState.HALTED

    @property
    def latch(self) -> Latch | None:
        """The loss latch in force in the namespace (None if none, or past its daily reset)."""
        return _latch_of(self._trading()[2])

    # ------------------------------------------------------------------ inspection

    def snapshot(self) -> Snapshot:
        """Everything in the namespace, read atomically (one server call)."""
        try:
            return Snapshot.from_reply(self._code.call("snapshot"))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"snapshot not readable: {exc}") from exc

    def audit(
        self,
        limits: PortfolioLimits | None = None,
        budgets: Mapping[str, PortfolioLimits] | None = None,
    ) -> list[str]:
        """Recompute every total, the account's and each strategy's, from the raw records and
        list the differences (and, with ``limits``, every limit of the account the current
        state exceeds; with ``budgets``, every strategy's). Empty means consistent."""
        return audit_snapshot(self.snapshot(), limits, budgets)

    def sweep(self) -> int:
        """Drop expired reservations now (every operation does this anyway); return how many."""
        return int(self._write("sweep", ("sweep",))[0])

    def stats(self) -> RedisGateStats:
        """Namespace-wide counts, read atomically after dropping expired reservations (one
        server call that returns the counters only, not the book)."""
        budgets = self._scopes.budgets
        reply = self._write("stats", ("stats",))
        st = {k: int(v) for k, v in _pairs(reply[0]).items()}
        denied = dict.fromkeys(DenyReason, 0)
        for reason in DenyReason:
            denied[reason] = st.get(f"denied:{reason.value}", 0)
        denied[DenyReason.BACKEND_UNAVAILABLE] += self._unavailable
        with self._unavailable_lock:
            unavailable = dict(self._unavailable_by)
        admitted = st.get("admitted", 0)
        return RedisGateStats(
            admitted=admitted,
            denied=MappingProxyType(denied),
            scopes=_scope_stats(reply[7], budgets, admitted, denied, int(reply[1]), unavailable),
            state=STATES[int(reply[4])],
            latch=_latch_of(reply[6]),
            outstanding=int(reply[1]),
            gross_notional=_units.to_number(int(_s(reply[2])), int(reply[3])),
            released=st.get("released", 0),
            filled=st.get("filled", 0),
            expired=st.get("expired", 0),
            restored=st.get("restored", 0),
            corrupt=st.get("corrupt", 0),
        )

    def __repr__(self) -> str:
        return (
            f"RedisGate(namespace={self._namespace!r}, ttl={self._ttl!r}, limits={self.limits!r})"
        )


# The reasons the server code counts per scope, in its order (gate.lua, REASON_NAMES).
_SCOPE_REASONS: Final = (
    DenyReason.BOOK_NOT_RESTORED, DenyReason.HALTED, DenyReason.REDUCING_ONLY,
    DenyReason.MAX_CONCURRENT_POSITIONS, DenyReason.MAX_GROSS_EXPOSURE,
    DenyReason.MAX_SYMBOL_EXPOSURE, DenyReason.MAX_NET_EXPOSURE, DenyReason.MAX_ORDER_NOTIONAL,
    DenyReason.MAX_OPEN_ORDERS, DenyReason.MAX_OPEN_ORDERS_PER_SYMBOL,
    DenyReason.MAX_ORDERS_PER_INTERVAL,
)  # fmt: skip


def _scope_stats(
    flat: Sequence[Any],
    budgets: Mapping[str, PortfolioLimits],
    admitted: int,
    denied: Mapping[DenyReason, int],
    outstanding: int,
    unavailable: Mapping[str, int],
) -> Mapping[str | None, ScopeStats]:
    """``GateStats.scopes`` from the server's per-strategy counts: every strategy with counts
    or a budget, and under None the rest (the decisions made with no strategy: the top-level
    counts less the strategies'; this gate object's ``BACKEND_UNAVAILABLE`` count too, which
    the server never saw, but a strategy's are its: ``unavailable``)."""
    size = 3 + len(_SCOPE_REASONS)
    scopes: dict[str | None, ScopeStats] = {}
    rest_admitted, rest_outstanding = admitted, outstanding
    rest = dict(denied)
    found: dict[str, tuple[int, dict[DenyReason, int], int]] = {}
    for i in range(0, len(flat), size):
        counts = [int(v) for v in flat[i + 1 : i + size]]
        by_reason = dict.fromkeys(DenyReason, 0)
        by_reason.update(zip(_SCOPE_REASONS, counts[1:-1], strict=True))
        found[_s(flat[i])] = (counts[0], by_reason, counts[-1])
    for name in [*budgets, *unavailable]:
        if name not in found:
            found[name] = (0, dict.fromkeys(DenyReason, 0), 0)
    for name, (n_admitted, by_reason, n_outstanding) in found.items():
        by_reason[DenyReason.BACKEND_UNAVAILABLE] += unavailable.get(name, 0)
        for reason, n in by_reason.items():
            rest[reason] -= n
        rest_admitted -= n_admitted
        rest_outstanding -= n_outstanding
        scopes[name] = ScopeStats(n_admitted, MappingProxyType(by_reason), n_outstanding)
    scopes[None] = ScopeStats(rest_admitted, MappingProxyType(rest), rest_outstanding)
    return MappingProxyType(scopes)


if TYPE_CHECKING:  # mypy proves RedisGate offers the whole backend-neutral surface.

    def _conforms(gate: RedisGate) -> Gate:
        return gate


class _Every:
    """A warning at most every ``_LOG_EVERY`` seconds: one per denied order would flood the
    log while a book waits for ``restore()``."""

    __slots__ = ("_last", "_lock")

    def __init__(self) -> None:
        self._last = -math.inf
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last < _LOG_EVERY:
                return False
            self._last = now
            return True


def enter(
    gate: RedisGate,
    symbol: str,
    notional: Number,
    order_id: str | None,
    mode: str,
    side: object = None,
    strategy: object = None,
) -> Decision | None:
    """``gate.try_enter`` (``mode`` ''), or one half of the test suite's broken gate
    (``pendingledger.redis.testing.check_then_reserve``): 'check' decides and reserves nothing
    (None when it passes), 'force' reserves unchecked."""
    name = _units.check_symbol(symbol)
    units = _units.notional_units("notional", notional)
    code = side_code(side)
    oid = uuid.uuid4().hex if order_id is None else _units.check_order_id(order_id)
    scopes = gate._scopes  # one read: the decision's limits and budgets are one pair
    strat = check_strategy("strategy", strategy)
    budget = scopes.configs.get(strat, "") if strat else ""
    if strat and not budget:
        raise ValueError(
            f"strategy {strategy!r} has no budget (gate.budgets has {sorted(scopes.budgets)!r}): "
            "a strategy is decided under its budget, never without"
        )
    token = _token()
    args = (name, units, oid, token, scopes.config, _units.kind_of(notional), mode, str(code),
            strat, budget)  # fmt: skip
    try:
        reply = gate._replicated(args) if gate._min_replicas else gate._code.call("enter", *args)
        status = _s(reply[0])
        if status == "A":
            decision = gate._admitted(name, oid, notional, units, token, code, strat, reply)
        elif status == "D":
            decision = gate._denied(reply)
        elif status == "C":
            return None
        elif status != "X":
            raise ValueError(f"unexpected reply from the server code: {reply!r}")
    except redis.ResponseError as exc:
        if mode and "test operations are off" in str(exc):
            raise
        return gate._unavailable_decision(f"try_enter({name!r}, order_id={oid!r})", exc, strat)
    except Exception as exc:
        return gate._unavailable_decision(f"try_enter({name!r}, order_id={oid!r})", exc, strat)
    if status == "X":
        raise ValueError(f"order_id {oid!r} already has an outstanding reservation")
    gate._log.ok()
    return decision


def _open_orders(
    open_orders: Iterable[OpenOrderLike],
) -> list[tuple[str, str, Number, int, str, int, str]]:
    """``restore``'s open orders, checked: ``(order_id, symbol, notional, units, token, side
    code, strategy or '')`` each."""
    pending: list[tuple[str, str, Number, int, str, int, str]] = []
    seen: set[str] = set()
    for index, item in enumerate(open_orders):
        order = OpenOrder(*item)
        try:
            symbol = _units.check_symbol(order.symbol)
            units = _units.notional_units("notional", order.notional)
            oid = order.order_id
            order_id = uuid.uuid4().hex if oid is None else _units.check_order_id(oid)
            side = side_code(order.side)
            strat = check_strategy("strategy", order.strategy)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"open_orders[{index}]: {exc}") from None
        if order_id in seen:
            raise ValueError(f"order_id {order_id!r} appears twice in open_orders")
        seen.add(order_id)
        pending.append((order_id, symbol, order.notional, units, _token(), side, strat))
    return pending


class RedisReservation:
    """The handle of one reservation in Redis (``Decision.reservation`` of a ``RedisGate``).

    Same public surface as the core ``Reservation``: ``symbol``, ``order_id``, ``notional`` (what
    is still reserved, as far as this handle has reduced it, in the kind of amount it was made
    with; once ended it keeps what it held), ``initial_notional``, ``reserved_at`` and
    ``expires_at`` (the server's clock, Unix seconds), ``active`` (asks the server), ``release()``
    and ``reduce(amount)``. A handle acts only on its own reservation: after it has ended, a new
    reservation reusing the order id is not touched.
    """

    __slots__ = (
        "_ended",
        "_expires_us",
        "_gate",
        "_initial",
        "_initial_units",
        "_lock",
        "_order_id",
        "_reserved_us",
        "_side",
        "_strategy",
        "_symbol",
        "_token",
        "_units",
    )

    _gate: RedisGate
    _symbol: str
    _order_id: str
    _initial: Number
    _initial_units: int
    _units: int
    _token: str
    _reserved_us: int
    _side: int
    _expires_us: int
    _strategy: str
    _ended: bool
    _lock: threading.Lock

    def __init__(self) -> None:
        raise TypeError("reservations are made by RedisGate.try_enter() or RedisGate.restore()")

    @classmethod
    def _new(
        cls,
        gate: RedisGate,
        symbol: str,
        order_id: str,
        initial: Number,
        units: int,
        *,
        token: str,
        side: int,
        reserved_us: int,
        expires_us: int,
        strategy: str = "",
    ) -> RedisReservation:
        self = object.__new__(cls)
        self._side = side
        self._strategy = strategy
        self._gate = gate
        self._symbol = symbol
        self._order_id = order_id
        self._initial = initial
        self._initial_units = units
        self._units = units
        self._token = token
        self._reserved_us = reserved_us
        self._expires_us = expires_us
        self._ended = False
        self._lock = threading.Lock()
        return self

    @property
    def symbol(self) -> str:
        return self._symbol

    @property
    def order_id(self) -> str:
        return self._order_id

    @property
    def side(self) -> Side | None:
        """The order's side as ``try_enter`` (or ``restore``) was given it; None: not given."""
        return SIDES[self._side]

    @property
    def strategy(self) -> str | None:
        """The strategy the reservation belongs to, or None: the account's own."""
        return self._strategy or None

    @property
    def token(self) -> str:
        """The random token stored with this reservation (tells it apart from a reuse of its id)."""
        return self._token

    @property
    def initial_notional(self) -> Number:
        return self._initial

    @property
    def notional(self) -> Number:
        """What is still reserved after this handle's ``reduce`` calls, in the kind of amount it
        was made with (``initial_notional`` itself until the first reduction)."""
        if self._units == self._initial_units:
            return self._initial
        return _units.to_number(self._units, _units.kind_of(self._initial))

    @property
    def reserved_at(self) -> float:
        """The server's clock (Unix seconds) when the reservation was made: its ``TIME``, plus
        the namespace's test clock if a test moved it (``pendingledger.redis.testing``)."""
        return self._reserved_us / 1_000_000

    @property
    def expires_at(self) -> float:
        """``reserved_at + ttl`` on the server's clock: from then on it is expired."""
        return self._expires_us / 1_000_000

    @property
    def active(self) -> bool:
        """Asks the server whether this reservation is still outstanding (not expired, released
        or filled). If the server cannot answer: what this handle knows (not ended by it)."""
        if self._ended:
            return False
        gate = self._gate
        try:
            reply = gate._code.call("status", self._order_id, self._token)
        except Exception as exc:
            gate._log.failed(f"Reservation({self._order_id!r}).active", exc)
            return True
        return _s(reply[0]) == "A"

    def release(self) -> bool:
        """End the reservation now (e.g. the exchange rejected the order). True if it was
        outstanding; False if it had ended, or (logged) if the store cannot be reached."""
        if self._ended:
            return False
        reply = self._gate._release_call(
            "Reservation.release", "release_order", self._order_id, self._token, self._symbol,
            "", self._strategy,
        )  # fmt: skip
        done = reply is not None and int(reply[0]) == 1
        if done:
            self._ended = True
            self._gate._ended(self._order_id, EndReason.RELEASED, self)
        return done

    def reduce(self, amount: Number) -> bool:
        """Shrink the remaining notional by ``amount`` (a partial fill); at zero (or below) the
        reservation ends as filled. True if it was outstanding. ``amount`` must be a finite
        number > 0.

        Counted as in process (``pendingledger._units.after_fill``, which the server code
        applies to what is reserved there): a fill of the whole notional ends the reservation;
        a smaller one, rounded down, is taken off the units reserved, so what stays is never
        less than what is still unfilled. Returns False (logged) if the store cannot be reached.
        """
        down, up = _units.reduction_units("amount", amount)
        with self._lock:
            if self._ended:
                return False
            reply = self._gate._release_call(
                f"Reservation({self._order_id!r}).reduce", "reduce", self._order_id,
                self._token, down, up, self._symbol, self._strategy,
            )  # fmt: skip
            if reply is None:
                return False
            status = _s(reply[0])
            if status in ("G", "E"):
                self._ended = True  # it keeps the amount it held when it ended
                if status == "E":
                    self._gate._ended(self._order_id, EndReason.REDUCED, self)
                return status == "E"
            self._units = int(_s(reply[1]))
            return True

    def __repr__(self) -> str:
        return (
            f"RedisReservation(symbol={self._symbol!r}, order_id={self._order_id!r}, "
            f"initial_notional={self._initial!r}, namespace={self._gate._namespace!r})"
        )
