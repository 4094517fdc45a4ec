"""Driving the broken gate's check-then-act gap deliberately: its first ``between`` call waits
(bounded) until the test lets it go on, so a second decision runs inside the gap every time.
The ``held_gap`` fixture (conftest) is ``hold_first_call()``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

Gap = tuple[threading.Event, threading.Event, Callable[[], None]]
"""``(in_gap, go_on, between)``: set when the first call is in the gap; set to let it go on;
the ``between`` to give ``BrokenGate``."""

T = TypeVar("T")


@contextmanager
def hold_first_call() -> Iterator[Gap]:
    in_gap, go_on = threading.Event(), threading.Event()
    calls: list[int] = []

    def between() -> None:
        calls.append(1)
        if len(calls) == 1:
            in_gap.set()
            assert go_on.wait(10)

    try:
        yield in_gap, go_on, between
    finally:
        go_on.set()


def interleave(gap: Gap, first: Callable[[], T], second: Callable[[], T]) -> tuple[T, T]:
    """A checks, B checks and reserves, A reserves: ``first`` runs on a thread until it is
    held in the gap, ``second`` runs meanwhile; both answers, in that order."""
    in_gap, go_on, _ = gap
    got: list[T] = []
    a = threading.Thread(target=lambda: got.append(first()))
    a.start()
    try:
        assert in_gap.wait(10)  # A has checked and not reserved yet
        b = second()
    finally:
        go_on.set()
        a.join(10)
    assert not a.is_alive() and got
    return got[0], b
