"""`python -m ftlab` / `ftlab`: user errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import sys

from ftlab.errors import ConfigError


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind an exception, if any. jsonargparse wraps errors raised while it
    instantiates subclass-typed arguments (e.g. `data:`) in its own ValueError; the original stays on
    the exception's context chain."""
    outer, seen = err, 0
    while err is not None and seen < 20:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    last = ConfigError.last
    if last is not None and str(last) in str(outer):  # quoted inside jsonargparse's Union error text
        return last
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: the command line)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["export"]:
            from ftlab.export_cli import main as export_main

            export_main(args[1:])
        elif args[:1] == ["slurm"]:
            from ftlab.slurm.cli import main as slurm_main

            slurm_main(args[1:])
        else:
            from ftlab.cli import run_cli

            run_cli(argv)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        cause = user_error(err)
        if cause is None:
            raise
        print(f"ftlab: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
