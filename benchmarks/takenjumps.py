"""List the conditional jumps a common decision takes while the ledger lock is held (a review aid).

On CPython 3.10 a *taken* ``POP_JUMP_IF_*`` is a point where the interpreter may hand the GIL to
another thread; inside the ledger lock that can start a lock convoy (see lockcheck.py, which
lists every candidate statically). So ``PortfolioGate.try_enter`` and ``Reservation.release`` are
written to fall through their branches on common decisions. This script traces one admitted
``try_enter`` plus its ``release`` on each common path and prints the jumps actually taken with
the lock held. On 3.11 and later a taken forward jump is not a switch point; the list is printed
for information (the trace runs on 3.10 and 3.11). Not a test: it asserts nothing.

Usage::

    python3.10 benchmarks/takenjumps.py
"""

from __future__ import annotations

import dis
import itertools
import sys
import types
from collections.abc import Callable
from typing import Any

from pendingledger import PendingEntryLedger, PortfolioGate, PortfolioLimits

TRACED = {"try_enter", "release"}


def _jumps_taken(ledger: PendingEntryLedger, action: Callable[[], object]) -> list[str]:
    """Run ``action`` under an opcode tracer; the conditional jumps taken with the lock held."""
    layouts: dict[types.CodeType, tuple[dict[int, dis.Instruction], dict[int, int]]] = {}
    last: dict[int, tuple[types.CodeType, int]] = {}  # frame id -> (code, offset of last op)
    taken: list[str] = []

    def layout(code: types.CodeType) -> tuple[dict[int, dis.Instruction], dict[int, int]]:
        if code not in layouts:
            ops = list(dis.get_instructions(code))
            after = {a.offset: b.offset for a, b in itertools.pairwise(ops)}
            layouts[code] = ({op.offset: op for op in ops}, after)
        return layouts[code]

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            by_offset, after = layout(code)
            previous = last.get(id(frame))
            if previous is not None and ledger._lock.locked():
                offset = previous[1]
                op = by_offset.get(offset)
                while op is not None and op.opname == "EXTENDED_ARG":
                    offset = after[offset]
                    op = by_offset.get(offset)
                if (
                    op is not None
                    and "JUMP" in op.opname
                    and "IF" in op.opname
                    and frame.f_lasti != after.get(offset)
                ):
                    taken.append(f"{code.co_name}:{frame.f_lineno} after {op.opname}")
            last[id(frame)] = (code, frame.f_lasti)
        return local

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_name not in TRACED:
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(None)
    return taken


def main() -> int:
    if sys.version_info >= (3, 12):
        # Tracing per opcode works differently there (sys.monitoring), and taken forward jumps
        # are not switch points anyway: run it with 3.10, where they are, or 3.11.
        print(f"CPython {sys.version.split()[0]}: run this with CPython 3.10 (or 3.11)")
        return 0
    limits = PortfolioLimits(
        max_concurrent_positions=10**9, max_gross_exposure=1e15, max_symbol_exposure=1e12
    )
    positions = {"OPEN0": 1_000.0, "OPEN1": -2_500.0, "OPEN2": 400.0}
    print(f"CPython {sys.version.split()[0]}: conditional jumps taken with the ledger lock held")
    cases: list[tuple[str, Any, bool, str | None]] = [
        ("own book (positions=None), a client order id", None, False, "cl-1"),
        ("own book, client order id, other reservations outstanding", None, True, "cl-1"),
        ("own book, no order id (generated)", None, False, None),
        ("empty dict, client order id", {}, False, "cl-1"),
        ("mapping of 3 open positions, client order id", positions, False, "cl-1"),
    ]
    for label, source, busy, order_id in cases:
        ledger = PendingEntryLedger(3600.0)
        gate = PortfolioGate(ledger, limits)
        if busy:
            gate.try_enter("OTHER", 1.0, source)
        gate.try_enter("WARM", 1.0, source).reservation.release()  # scale limits, warm up

        def decide(
            gate: PortfolioGate = gate, source: Any = source, order_id: str | None = order_id
        ) -> None:
            reservation = gate.try_enter("HOT", 100.0, source, order_id=order_id).reservation
            assert reservation is not None, "the traced decision must be admitted"
            reservation.release()

        taken = _jumps_taken(ledger, decide)
        print(f"{len(taken):3d}  {label}")
        for where in taken:
            print(f"       {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
