"""User-facing errors and the command-line wrapper that turns them into one line.

A `UserError` is a mistake the user can fix (a wrong name, a missing file, a bad value). Scripts
run their `main` through `run_cli`, which prints such an error as a single `error: ...` line on
stderr and exits with status 2, instead of a traceback. Anything else is a bug in lemo-jax and
keeps its traceback.

A closed standard output (`finetune.py --list-configs | head -1`) ends the script quietly with
status 141, as a killed-by-SIGPIPE process would. The scripts do not restore SIGPIPE's default
action for that: it would apply to every pipe and socket in the process. Orbax's checkpointing
runs asyncio event loops on threads, which wake each other through socket pairs; under the
default action a write to one whose peer has closed kills the process instead of raising an
`OSError` that asyncio handles (a SIGINT-then-save test run died with signal 13 that way).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input, reported as one line without a traceback."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None):
    """Runs `main(argv)` and exits; a `UserError` becomes `error: <message>` and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _quiet_closed_stdout()
    try:
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
    except BrokenPipeError:
        _quiet_closed_stdout()
    sys.exit(0)


def _quiet_closed_stdout() -> None:
    """Exits 128 + SIGPIPE; stdout is pointed at /dev/null so the interpreter's final flush of
    the lost output does not print a second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)
