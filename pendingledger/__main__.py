"""``python -m pendingledger``: see ``pendingledger.cli``."""

from __future__ import annotations

import sys


def _run() -> int:
    # The import is inside the try: a Ctrl-C while the CLI's modules load exits like one
    # during the race (status 130, one line, no traceback).
    try:
        from .cli import main  # noqa: PLC0415

        return main()
    except KeyboardInterrupt:
        sys.stderr.write("race: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(_run())
