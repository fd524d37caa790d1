"""`python -m ftlab` / `ftlab`: user errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import sys

from ftlab.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from ftlab.cli import run_cli

        run_cli(argv)
    except ConfigError as err:
        print(f"ftlab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
