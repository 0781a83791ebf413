"""Graceful stop: the first SIGINT/SIGTERM asks the loop to finish its step, save and exit."""

from __future__ import annotations

import signal
import sys


class StopRequest:
    """Context manager; `requested` becomes the signal number once a stop was asked for.

    A second SIGINT while stopping raises KeyboardInterrupt as usual (the user insists).
    """

    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def _handle(self, number, frame):
        if self.requested is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = number
        print(
            f"\n{signal.Signals(number).name}: finishing this step, saving a checkpoint, "
            "then stopping (Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopRequest:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
