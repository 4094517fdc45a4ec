"""The README's Python examples type-check under ``mypy --strict``, as written.

Every ```` ```python ```` block of README.md is extracted verbatim and checked. A block may be
preceded by a marker comment that says what it builds on:

* ``<!-- readme-test: continues -->``: it follows on from the previous block (their programs
  are joined, as a reader reads them);
* ``<!-- readme-test: given NAME -->``: it uses objects of the reader's own that the README
  leaves out (an exchange client, the exchange's view of the book), declared in ``GIVEN`` here
  with their types and nothing else;
* ``<!-- readme-test: continues, given NAME -->``: both.

A block without a marker stands alone. The test fails if a block is left unchecked, a marker
names nothing, or a marker is not followed by a block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typecheck

README = Path(__file__).resolve().parent.parent / "README.md"

GIVEN = {
    "exchange": """
class _Exchange:
    def submit(self, order_id: str, symbol: str, notional: float) -> None: ...
exchange = _Exchange()
def new_client_order_id() -> str:
    return "cl-1"
""",
    "exchange-book": """
from pendingledger.redis import OpenOrder
positions_from_exchange: dict[str, float] = {}
open_orders_from_exchange: list[OpenOrder] = []
""",
}

_FENCE = re.compile(r"^```(\w*)\s*$")
_PART = r"(?:continues|given [\w-]+(?: [\w-]+)*)"
_MARKER = re.compile(rf"^<!-- readme-test: ({_PART}(?:, {_PART})*) -->$")


def readme_programs(text: str) -> list[tuple[int, str]]:
    """Each Python block as ``(line, program)``, joined to what it continues, given what it is
    given."""
    lines = text.splitlines()
    programs: list[tuple[int, str]] = []
    marker: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        found = _MARKER.match(line)
        if found:
            assert marker is None, f"README.md:{i + 1}: two markers with no block between"
            marker = found.group(1)
        fence = _FENCE.match(line)
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "python":
            programs.append((i + 1, _program(marker, "\n".join(lines[i + 1 : end]), programs, i)))
        else:
            assert marker is None, f"README.md:{i + 1}: a marker before a {fence.group(1)} block"
        marker = None
        i = end + 1
    return programs


def _program(marker: str | None, block: str, before: list[tuple[int, str]], i: int) -> str:
    program = block + "\n"
    for part in (marker or "").split(", "):
        if part == "continues":
            assert before, f"README.md:{i + 1}: the first block continues nothing"
            program = before[-1][1] + program
        elif part.startswith("given "):
            names = part.split()[1:]
            missing = [name for name in names if name not in GIVEN]
            assert not missing, f"README.md:{i + 1}: given {missing}, which GIVEN does not declare"
            program = "".join(GIVEN[name] for name in names) + program
    return program


PROGRAMS = readme_programs(README.read_text(encoding="utf-8"))


def test_every_python_block_of_the_readme_is_checked() -> None:
    """The extraction sees every block (a fence it misread would hide one from the check)."""
    text = README.read_text(encoding="utf-8")
    assert len(PROGRAMS) == text.count("\n```python\n") > 5


@pytest.fixture(scope="module")
def mypy_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return typecheck.mypy_args(tmp_path_factory.mktemp("mypy-readme"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("line", "program"), PROGRAMS, ids=[f"line{n}" for n, _ in PROGRAMS])
def test_readme_example_typing(
    line: int, program: str, mypy_args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block at README.md:``line`` passes ``mypy --strict`` as written."""
    status, output = typecheck.run_mypy(program, mypy_args, monkeypatch)
    assert status == 0, f"README.md:{line}\n{output}"


def test_the_extraction_joins_continued_blocks_and_refuses_unknown_givens() -> None:
    text = (
        "```python\nx = 1\n```\n<!-- readme-test: continues -->\n```python\ny = x\n```\n"
        "```bash\nls\n```\n<!-- readme-test: continues, given exchange -->\n"
        "```python\nexchange\n```\n"
    )
    (_, first), (_, second), (_, third) = readme_programs(text)
    assert (first, second) == ("x = 1\n", "x = 1\ny = x\n")
    assert third.startswith("\nclass _Exchange") and third.endswith("x = 1\ny = x\nexchange\n")
    with pytest.raises(AssertionError, match="GIVEN does not declare"):
        readme_programs("<!-- readme-test: given nothing-such -->\n```python\nz\n```\n")
