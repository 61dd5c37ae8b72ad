"""The `ddrs` command line: parser.py builds the parser from the run specifications,
commands.py runs each command with library calls; `main` is the entry point (also run in
each worker of a sharded run)."""

from __future__ import annotations

import sys

from ddrs.cli.parser import build_parser
from ddrs.errors import DDRSError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from ddrs.cli import commands
    from ddrs.launch import leave, quiet_on_interrupt

    try:
        code = commands.run(args, argv, entry=main) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except DDRSError as error:
        if not getattr(error, "quiet", False):  # a sharded run's other ranks stay quiet
            print(f"ddrs: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`ddrs ... | head`): nothing to report
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        if not quiet_on_interrupt():
            print(
                "ddrs: interrupted; results written so far are kept (re-run to resume)",
                file=sys.stderr,
            )
        return 130
    finally:
        leave()


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of a closed pipe
    raises nothing at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
