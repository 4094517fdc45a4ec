"""Type-checks a user's program against the pendingledger under test, with ``mypy --strict``.

Used by the typing tests of the API (tests/test_gate.py) and of the README's examples
(tests/test_readme.py). mypy is in the dev extra only; the tests skip without it, and CI runs
them in its dev environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def mypy_args(where: Path) -> list[str]:
    """A cache in ``where``, and an empty config so the project's own mypy settings don't apply."""
    config = where / "mypy.ini"
    config.write_text("[mypy]\n")
    return ["--config-file", str(config), "--cache-dir", str(where / "cache")]


def run_mypy(program: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``mypy --strict`` over ``program``: its exit status (0 clean, 1 type errors) and output.
    Any other status means mypy itself did not run, and raises."""
    api = pytest.importorskip("mypy.api")
    import pendingledger

    root = Path(pendingledger.__file__).resolve().parent.parent
    where: list[str] = []
    if root.name in ("site-packages", "dist-packages"):  # installed: found as a PEP 561 package
        where = ["--python-executable", sys.executable]
    else:  # a source tree (an editable install's import hook is invisible to mypy)
        monkeypatch.setenv("MYPYPATH", str(root))
    stdout, stderr, status = api.run(
        [*args, *where, "--strict", "--no-error-summary", "-c", program]
    )
    if status not in (0, 1):  # not a type error: mypy did not run (a skip would hide it)
        raise RuntimeError(f"mypy exited {status}: {stdout}{stderr}")
    return status, stdout + stderr
