"""Build: the core compiled with mypyc, or installed as plain Python.

``pip install .`` compiles the modules in ``CORE`` with mypyc (the source stays ordinary typed
Python, which the wheel also ships). ``PENDINGLEDGER_PURE_PYTHON=1`` installs the pure-Python
core instead; so does a machine where compiling fails (no C compiler, no Python headers), with a
warning. ``pendingledger.COMPILED`` says which build was imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

CORE = [
    "pendingledger/_units.py",
    "pendingledger/decision.py",
    "pendingledger/trading.py",
    "pendingledger/events.py",
    "pendingledger/rules.py",
    "pendingledger/budgets.py",
    "pendingledger/_core.py",
    "pendingledger/_positions.py",
    "pendingledger/ledger.py",
    "pendingledger/gate.py",
]
"""The modules compiled: the amount model, the rules, the lock-owning core and its facades.
The Redis client code, the simulation and the command line stay plain Python."""


def warn(message: str) -> None:
    print(f"WARNING: pendingledger: {message}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compile the core, or build nothing and leave the pure-Python core if any part fails.

    All or nothing: mypyc's modules share one library, so half a build would not import.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler or headers surface as several types
            warn(f"compiling the core failed ({exc}); installing the pure-Python build")
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.extensions = []


# pip runs this file for metadata too; only these commands build the extension modules.
BUILDS = {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel"}


def ext_modules() -> list[object]:
    if not BUILDS.intersection(sys.argv[1:]):
        return []
    if os.environ.get("PENDINGLEDGER_PURE_PYTHON", "") not in ("", "0"):
        print("pendingledger: PENDINGLEDGER_PURE_PYTHON is set: pure-Python build", file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 - only a compiled build needs it

        return list(mypycify(CORE, opt_level="3"))
    except (ImportError, SystemExit, Exception) as exc:  # mypyc exits on a type error
        warn(f"mypyc could not compile the core ({exc!r}); installing the pure-Python build")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
