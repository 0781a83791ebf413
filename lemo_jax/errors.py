"""User-facing errors and the command-line wrapper that turns them into one line.

A `UserError` is a mistake the user can fix (a wrong name, a missing file, a bad value). Scripts
run their `main` through `run_cli`, which prints such an error as a single `error: ...` line on
stderr and exits with status 2, instead of a traceback. Anything else is a bug in lemo-jax and
keeps its traceback.
"""

from __future__ import annotations

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
    sys.exit(0)
