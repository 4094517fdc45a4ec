"""List the GIL switch points inside pendingledger's critical sections (a review aid, not a test).

CPython hands the GIL to another thread only at certain instructions: on 3.10 and 3.11 mainly
calls (``CALL``/``PRECALL``/``CALL_FUNCTION*``: the callee's entry and the return from a builtin)
and backward jumps (loops). If one of them executes while the ledger lock is held, the thread
can be switched out holding the lock and every other thread queues behind it: a lock convoy (see
shared/PERFORMANCE-NOTES.md). This script finds every ``with <...lock...>:`` and
``with <...guard...>:`` block in the package's source, disassembles the enclosing function and
prints each such instruction whose line lies inside the block, with the line, so a reviewer can
tell the hot paths (which should list nothing) from slow paths (where calls are accepted).

Usage::

    python benchmarks/lockcheck.py               # every lock block in pendingledger
    python benchmarks/lockcheck.py --only try_enter --only _release_reservation

Limits: static. Dict and attribute operations can still run Python code (a ``__hash__`` or
``__eq__`` written in Python on a caller's symbol or order id, a finaliser run by the garbage
collector on an allocation), which this cannot see. Blocks taken with explicit
``acquire()``/``release()`` calls are not found; neither are the lines of a ``lock()`` block in a
caller's code.
"""

from __future__ import annotations

import argparse
import ast
import dis
import importlib
import inspect
import pkgutil
import sys
import types
from collections.abc import Iterator

SWITCH_POINTS = {
    "CALL",
    "PRECALL",
    "CALL_FUNCTION",
    "CALL_FUNCTION_KW",
    "CALL_FUNCTION_EX",
    "CALL_METHOD",
    "CALL_KW",
    "JUMP_BACKWARD",
    "JUMP_ABSOLUTE",  # 3.10's backward jump
    "YIELD_VALUE",  # a generator suspended while the lock is held
}
if sys.version_info < (3, 11):
    # CPython 3.10 also checks the eval breaker on every *taken* POP_JUMP_IF_FALSE/TRUE: an
    # ``if`` whose test fails inside the lock is a switch point (measured: one such ``if`` in a
    # 64-thread lock loop drops throughput from 1.0x to 0.08x of one thread). An ``if`` whose
    # body runs falls through, and ``and``/``or`` (JUMP_IF_*_OR_POP) are not checked.
    SWITCH_POINTS |= {"POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE"}


def _lock_blocks(tree: ast.AST) -> Iterator[tuple[int, int, str]]:
    """(first body line, last body line, the with item's source) of each lock/guard block."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.With):
            continue
        for item in node.items:
            text = ast.unparse(item.context_expr)
            lowered = text.lower()
            if "lock" in lowered or "guard" in lowered:
                first = node.body[0].lineno
                last = max(getattr(n, "end_lineno", n.lineno) or n.lineno for n in node.body)
                yield first, last, text


def _functions(module: types.ModuleType) -> Iterator[tuple[str, types.FunctionType]]:
    for name, obj in vars(module).items():
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            yield name, obj
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, value in vars(obj).items():
                func = value.fget if isinstance(value, property) else value
                if inspect.isfunction(func):
                    yield f"{name}.{attr}", func


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _lines(code: types.CodeType) -> Iterator[tuple[int | None, dis.Instruction]]:
    """Each instruction with its source line (3.10 marks only the first of each line)."""
    current: int | None = None
    for ins in dis.get_instructions(code):
        positions = getattr(ins, "positions", None)
        if positions is not None and positions.lineno is not None:
            current = int(positions.lineno)
        elif isinstance(ins.starts_line, int):
            current = ins.starts_line
        yield current, ins


def check(package: str, only: list[str] | None) -> int:
    root = importlib.import_module(package)
    modules = [root]
    names = [info.name for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")]
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:  # an optional extra that is not installed (e.g. redis)
            print(f"skipped {name}: {exc}")
    found = 0
    for module in modules:
        source = inspect.getsource(module)
        lines = source.splitlines()
        tree = ast.parse(source)
        blocks = list(_lock_blocks(tree))
        if not blocks:
            continue
        for qualname, func in _functions(module):
            if only and not any(qualname.endswith(o) for o in only):
                continue
            code = func.__code__
            first_line = code.co_firstlineno
            last_line = max(
                (ln for c in _code_objects(code) for _, _, ln in c.co_lines() if ln is not None),
                default=first_line,
            )
            for lo, hi, text in blocks:
                if not first_line <= lo <= last_line:
                    continue
                hits: list[tuple[int, str]] = []
                for c in _code_objects(code):
                    for line, ins in _lines(c):
                        if line is not None and lo <= line <= hi and ins.opname in SWITCH_POINTS:
                            hits.append((line, ins.opname))
                where = f"{module.__name__}:{lo}-{hi} {qualname} (with {text})"
                if not hits:
                    print(f"clean  {where}")
                    continue
                found += len(hits)
                print(f"{len(hits):>4}   {where}")
                seen: set[int] = set()
                for line, _ in sorted(hits):
                    if line in seen:
                        continue
                    seen.add(line)
                    ops = sorted({op for ln, op in hits if ln == line})
                    print(f"         {line:>5} {'/'.join(ops):<22} {lines[line - 1].strip()}")
    print(f"\n{found} switch point(s) inside lock blocks (Python {sys.version.split()[0]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="pendingledger")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="functions whose name ends with NAME"
    )
    args = parser.parse_args(argv)
    return check(args.package, args.only)


if __name__ == "__main__":
    sys.exit(main())
