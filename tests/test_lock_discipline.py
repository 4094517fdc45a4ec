"""No caller code and (compiled) no Python bytecode runs while the ledger lock is held.

Why it matters: CPython switches threads and runs signal handlers only between bytecodes. If
Python code runs under the lock, the holder can be switched out holding it and every other
thread queues behind it (a lock convoy), and a ``KeyboardInterrupt`` can land mid-update. If
*caller* code runs under it, the caller can also block, re-enter or raise there.

Two harnesses, both single-threaded, so ``ledger.locked()`` being True can only mean this thread
holds the lock:

* every object a caller hands the library (clock, ``on_expire``, a positions mapping with Python
  methods, a positions callable, ``str``-subclass symbols and order ids with a Python
  ``__hash__``/``__eq__``, a ``numbers.Real`` amount) records ``ledger.locked()`` each time any
  of its Python methods runs: never True, on both builds;
* a tracer (``sys.settrace`` and ``threading.settrace``) records every Python call and line event
  during the operations and whether the lock was held: compiled, never; interpreted, the core
  itself is Python bytecode under the lock, and the same harness must see it (so it can fail).

``lock()`` blocks are left out on purpose: the caller's block runs under the lock by design.
The garbage collector is disabled while tracing: a collection can start on any allocation and
run any object's finalizer, which is not code the ledger calls.
"""

from __future__ import annotations

import gc
import math
import numbers
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from types import FrameType
from typing import Any, cast

import pytest

import pendingledger
from pendingledger import (
    Admitted,
    Decision,
    PendingEntryLedger,
    PortfolioGate,
    PortfolioLimits,
    Reservation,
    ReservationState,
)
from pendingledger._units import Number
from pendingledger.testing import ManualClock

LIMITS = PortfolioLimits(
    max_concurrent_positions=50,
    max_gross_exposure=10_000,
    max_daily_loss=1_000,
    max_open_orders=100,
    max_orders_per_interval=(1_000, 60.0),
)
# A strategy's budget with every order cap, so each of their paths runs in every_operation.
BUDGET = PortfolioLimits(
    max_gross_exposure=5_000,
    max_order_notional=500,
    max_open_orders=10,
    max_open_orders_per_symbol=5,
    max_orders_per_interval=(100, 60.0),
)


@dataclass
class Witness:
    """Who ran, and whether the ledger lock was held at that moment."""

    ledgers: list[PendingEntryLedger] = field(default_factory=list)
    runs: list[tuple[str, bool]] = field(default_factory=list)
    doing: str = ""  # the operation under way, for the report

    def saw(self, who: str) -> None:
        held = any(ledger.locked() for ledger in self.ledgers)
        self.runs.append((f"{who} in {self.doing}" if held and self.doing else who, held))

    def under_lock(self) -> list[str]:
        return sorted({who for who, held in self.runs if held})

    def ran(self) -> set[str]:
        return {who.split(".")[0] for who, _ in self.runs}


# ---------------------------------------------------------------------------- caller objects


class Clock:
    """A clock written in Python (a ``ManualClock`` underneath) that reports each reading."""

    def __init__(self, witness: Witness) -> None:
        self.witness = witness
        self.manual = ManualClock()

    def __call__(self) -> float:
        self.witness.saw("clock")
        return self.manual()


class WallClock(Clock):
    """The gate's wall clock, written in Python, reporting each reading."""

    def __call__(self) -> float:
        self.witness.saw("wall_clock")
        return self.manual()


class Book(Mapping[str, Any]):
    """A caller's positions mapping whose every method is Python code that reports itself."""

    def __init__(self, witness: Witness, data: dict[str, Any]) -> None:
        self.witness = witness
        self.data = data

    def __getitem__(self, key: str) -> Any:
        self.witness.saw("positions.__getitem__")
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        self.witness.saw("positions.__iter__")
        return iter(list(self.data))

    def __len__(self) -> int:
        self.witness.saw("positions.__len__")
        return len(self.data)

    def items(self) -> Any:
        self.witness.saw("positions.items")
        return list(self.data.items())

    def __contains__(self, key: object) -> bool:
        self.witness.saw("positions.__contains__")
        return key in self.data


class Name(str):
    """A ``str`` subclass (a venue-qualified symbol, say) with Python ``__hash__``/``__eq__``."""

    witness: Witness | None = None

    def __hash__(self) -> int:
        if Name.witness is not None:
            Name.witness.saw("str-subclass.__hash__")
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        if Name.witness is not None:
            Name.witness.saw("str-subclass.__eq__")
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other


def real(witness: Witness, value: float) -> Number:
    """An ``Amount``, typed as the amounts the API declares (a ``numbers.Real`` is accepted too)."""
    return cast(Number, Amount(witness, value))


class Amount(numbers.Real):
    """A ``numbers.Real`` that is not a float: every method, attribute reads included, reports
    itself (a numeric proxy, the way a units or money type may be written)."""

    def __init__(self, witness: Witness, value: float) -> None:
        object.__setattr__(self, "_w", witness)
        object.__setattr__(self, "_v", value)

    def __getattribute__(self, name: str) -> Any:
        witness = object.__getattribute__(self, "_w")
        witness.saw(f"Real.__getattribute__({name})")
        return object.__getattribute__(self, name)

    def _value(self) -> float:
        return float(object.__getattribute__(self, "_v"))

    def _saw(self, what: str) -> float:
        object.__getattribute__(self, "_w").saw(f"Real.{what}")
        return self._value()

    def __float__(self) -> float:
        return self._saw("__float__")

    def __repr__(self) -> str:
        return f"Amount({self._saw('__repr__')})"

    def __hash__(self) -> int:  # type: ignore[override]  # numbers.Complex says None
        return hash(self._saw("__hash__"))

    def __eq__(self, other: object) -> bool:
        return bool(self._saw("__eq__") == other)

    def __lt__(self, other: Any) -> bool:
        return bool(self._saw("__lt__") < other)

    def __le__(self, other: Any) -> bool:
        return bool(self._saw("__le__") <= other)

    def __abs__(self) -> float:
        return abs(self._saw("__abs__"))

    def __neg__(self) -> float:
        return -self._saw("__neg__")

    def __pos__(self) -> float:
        return self._saw("__pos__")

    def __trunc__(self) -> int:
        return math.trunc(self._saw("__trunc__"))

    def __floor__(self) -> int:
        return math.floor(self._saw("__floor__"))

    def __ceil__(self) -> int:
        return math.ceil(self._saw("__ceil__"))

    def __round__(self, ndigits: int | None = None) -> Any:
        return round(self._saw("__round__"), ndigits)

    def __add__(self, other: Any) -> float:
        return float(self._saw("__add__") + other)

    def __radd__(self, other: Any) -> float:
        return float(other + self._saw("__radd__"))

    def __mul__(self, other: Any) -> float:
        return float(self._saw("__mul__") * other)

    def __rmul__(self, other: Any) -> float:
        return float(other * self._saw("__rmul__"))

    def __truediv__(self, other: Any) -> float:
        return float(self._saw("__truediv__") / other)

    def __rtruediv__(self, other: Any) -> float:
        return float(other / self._saw("__rtruediv__"))

    def __floordiv__(self, other: Any) -> int:
        return int(self._saw("__floordiv__") // other)

    def __rfloordiv__(self, other: Any) -> int:
        return int(other // self._saw("__rfloordiv__"))

    def __mod__(self, other: Any) -> float:
        return float(self._saw("__mod__") % other)

    def __rmod__(self, other: Any) -> float:
        return float(other % self._saw("__rmod__"))

    def __pow__(self, other: Any) -> float:
        return float(self._saw("__pow__") ** other)

    def __rpow__(self, other: Any) -> float:
        return float(other ** self._saw("__rpow__"))


@dataclass
class Setup:
    """A ledger whose clock and ``on_expire`` are caller code, and a gate on it."""

    witness: Witness
    clock: Clock
    ledger: PendingEntryLedger
    gate: PortfolioGate
    expired: list[Reservation]


def make_setup(witness: Witness) -> Setup:
    clock = Clock(witness)
    expired: list[Reservation] = []

    def on_expire(res: Reservation) -> None:
        witness.saw("on_expire")
        expired.append(res)

    ledger = PendingEntryLedger(10.0, clock=clock, on_expire=on_expire)
    witness.ledgers.append(ledger)
    budgets = {Name("alpha"): BUDGET}  # a str subclass as the name: copied before use
    gate = PortfolioGate(ledger, LIMITS, budgets=budgets, wall_clock=WallClock(witness))
    return Setup(witness, clock, ledger, gate, expired)


def every_operation(s: Setup) -> None:
    """Each gate and ledger operation once or more, fed caller objects wherever it takes one
    (no ``lock()`` block: the caller's block runs under the lock by design)."""
    w, gate, ledger = s.witness, s.gate, s.ledger

    def do(what: str, action: Callable[[], object]) -> object:
        w.doing = what
        return action()

    book = Book(w, {"AAA": 100, Name("BBB"): Decimal("-20"), "CCC": real(w, 3.5)})
    made = [
        do("try_enter(mapping)", lambda: gate.try_enter(
            Name("AAA"), real(w, 10.25), book, order_id=Name("o-1"))),
        do("try_enter(callable)", lambda: gate.try_enter(
            "DDD", 5, lambda: Book(w, {"AAA": 1}), timeout=1.0)),
        do("try_enter(own book)", lambda: gate.try_enter(
            Name("EEE"), real(w, 2), order_id="o-3", timeout=0.0)),
        do("try_enter(generated id)", lambda: gate.try_enter("GEN", 1)),
    ]  # fmt: skip
    assert all(isinstance(d, Decision) and d.reservation is not None for d in made)
    res = made[0].reservation  # type: ignore[attr-defined]
    assert do("Reservation.reduce(Real)", lambda: res.reduce(real(w, 0.25)))
    assert do("Reservation.reduce(int)", lambda: res.reduce(1))
    assert do("Reservation.active", lambda: res.active)
    assert do("Reservation.release", res.release)
    do("set_position", lambda: gate.set_position(Name("FFF"), real(w, -7)))
    alpha = Name("alpha")
    budgeted = do(
        "try_enter(strategy)",
        lambda: gate.try_enter(
            Name("AAA"), real(w, 20), order_id=Name("o-s"), side=Name("buy"), strategy=alpha
        ),
    )
    assert isinstance(budgeted, Decision) and budgeted.admitted
    denied = do(
        "try_enter(strategy, capped)", lambda: gate.try_enter("AAA", real(w, 501), strategy=alpha)
    )
    assert isinstance(denied, Decision) and denied.scope == "alpha"
    do("set_position(strategy)", lambda: gate.set_position(Name("FFF"), real(w, 3), strategy=alpha))
    assert do(
        "confirm_fill(strategy)",
        lambda: gate.confirm_fill(Name("o-s"), real(w, 20), strategy=alpha),
    )
    do("positions(strategy)", lambda: gate.positions(strategy=alpha))
    assert do("close_position(strategy)", lambda: gate.close_position(
        Name("AAA"), strategy=alpha))  # fmt: skip
    assert do("confirm_fill", lambda: gate.confirm_fill(Name("o-3"), real(w, 4)))
    assert not do("confirm_fill(late)", lambda: gate.confirm_fill(
        "o-missing", real(w, 1), symbol=Name("GGG")))  # fmt: skip
    assert do("close_position", lambda: gate.close_position(Name("GGG")))
    assert do("release(symbol)", lambda: ledger.release(Name("DDD")))
    assert not do("release_order", lambda: ledger.release_order(Name("o-1")))
    do("record_pnl(Real)", lambda: gate.record_pnl(real(w, -1_000.5)))  # latches
    do("set_equity(Real)", lambda: gate.set_equity(real(w, 5_000)))
    assert do("state", lambda: gate.state) == "reducing"
    assert do("latch", lambda: gate.latch) is not None
    reducing = do("try_enter(latched, side)", lambda: gate.try_enter(
        Name("AAA"), real(w, 1), book, side=Name("sell")))  # fmt: skip
    assert isinstance(reducing, Decision) and reducing.admitted  # a sell against AAA's long
    do("reduce_only", gate.reduce_only)
    do("halt", gate.halt)
    do("resume", gate.resume)
    late = do("try_enter(late)", lambda: gate.try_enter(
        Name("HHH"), real(w, 1.5), book, order_id="o-late"))  # fmt: skip
    assert isinstance(late, Admitted)
    reservation = late.reservation
    assert isinstance(reservation, Reservation)
    s.clock.manual.advance(11.0)
    expired = do("Reservation.state", lambda: reservation.state)
    assert expired is ReservationState.EXPIRED  # expired on read: on_expire ran
    do("try_enter", lambda: gate.try_enter("III", 1))
    s.clock.manual.advance(11.0)
    do("ledger.stats", ledger.stats)  # sweeps "III": on_expire again
    do("gate.stats", gate.stats)
    do("gate.positions", gate.positions)
    do("ledger.audit", ledger.audit)
    w.doing = ""


def test_caller_objects_never_run_under_the_ledger_lock() -> None:
    """Every caller object ran (so the check is not vacuous) and none ran with the lock held."""
    witness = Witness()
    Name.witness = witness
    try:
        setup = make_setup(witness)
        every_operation(setup)
    finally:
        Name.witness = None
    assert len(setup.expired) == 4
    assert {"clock", "wall_clock", "on_expire", "positions", "Real"} <= witness.ran()
    assert witness.under_lock() == []


def test_the_witness_sees_code_run_under_the_lock() -> None:
    """The control: the same recorders, run inside a ``lock()`` block, report the lock held."""
    witness = Witness()
    setup = make_setup(witness)
    with setup.ledger.lock():
        setup.clock()
        float(Amount(witness, 1.0))
        dict(Book(witness, {"AAA": 1}).items())
    assert witness.under_lock() == [
        "Real.__float__",
        "Real.__getattribute__(_saw)",
        "Real.__getattribute__(_value)",
        "clock",
        "positions.items",
    ]


# ---------------------------------------------------------------------------- the tracer


@dataclass
class Trace:
    """Python-level events seen while a ledger's lock was held, and how many events in all."""

    events: int = 0
    under_lock: dict[str, int] = field(default_factory=dict)


@contextmanager
def traced(witness: Witness) -> Iterator[Trace]:
    """Record every Python event (this thread and any started meanwhile): how many, and which
    ones happened with one of ``witness.ledgers`` locked, during which operation."""
    trace = Trace()

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        trace.events += 1
        if any(ledger.locked() for ledger in witness.ledgers):
            code = frame.f_code
            where = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name} in {witness.doing}"
            trace.under_lock[where] = trace.under_lock.get(where, 0) + 1
        return tracer

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        yield trace
    finally:
        sys.settrace(None)
        threading.settrace(None)
        if was_enabled:
            gc.enable()


def trace_operations(rounds: int) -> Trace:
    """``every_operation`` ``rounds`` times (caller objects included) under the tracer."""
    witness = Witness()
    with traced(witness) as trace:
        for _ in range(rounds):
            every_operation(make_setup(witness))
    return trace


@pytest.mark.timeout(10)
def test_the_core_takes_its_compiled_forms_only_when_compiled() -> None:
    """The core's plain acquires before a ``try`` are safe only in a C extension; a sourceless
    ``.pyc`` install is interpreted and must take the interrupt-safe forms."""
    from pendingledger import _core

    assert _core._COMPILED is pendingledger.COMPILED


@pytest.mark.timeout(60)
@pytest.mark.skipif(not pendingledger.COMPILED, reason="the compiled build's property")
def test_compiled_no_python_bytecode_runs_under_the_lock() -> None:
    """Compiled: across many operations, no Python call or line event happens with the lock
    held (the tracer sees thousands of events, all outside it)."""
    trace = trace_operations(rounds=20)
    assert trace.events > 1000
    assert trace.under_lock == {}


@pytest.mark.timeout(60)
@pytest.mark.skipif(pendingledger.COMPILED, reason="the interpreted build's property")
def test_interpreted_the_tracer_sees_the_core_run_under_the_lock() -> None:
    """Interpreted, the same harness sees Python frames under the lock: the core's own
    ``*_locked`` methods. This is what shows the compiled test above can fail."""
    trace = trace_operations(rounds=2)
    seen = {where.split(" in ")[0] for where in trace.under_lock}
    assert {"_core.py:_sweep_locked", "_core.py:_end_locked", "rules.py:first_failing_rule"} <= seen
