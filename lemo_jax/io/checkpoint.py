"""Run checkpoints with Orbax: asynchronous saves, the last K kept, fallback past damage.

A checkpoint holds the training state tree (trainable weights, optimizer state, step, RNG) and a
JSON record (step, data position, anything else the loop needs). Orbax writes each step into a
temporary directory and renames it when complete, so a crash never leaves a half-written
checkpoint under a step's name; a checkpoint damaged afterwards (a truncated file, a deleted
directory) is skipped in favour of the previous one, with a warning.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from lemo_jax.errors import UserError

# Orbax logs every save at INFO level; the training progress bar is the user's view.
logging.getLogger("absl").setLevel(logging.WARNING)


class RunCheckpoints:
    """The checkpoints of one run, in `directory` (created on first save)."""

    def __init__(self, directory: str | Path, *, keep: int = 2, asynchronous: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict) -> None:
        """Starts saving `state` and `record` as `step` (returns before the write finishes)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["record"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores, or None if there is none at all.

        A damaged checkpoint is reported and skipped; if every one is damaged, `UserError`.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                state, record = self.restore(step, abstract_state)
            except Exception as err:  # any read failure means "damaged"
                reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                aside = self._set_aside(step)
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is damaged "
                    f"({reason[:200]}); moved to {aside}, trying an earlier one",
                    stacklevel=2,
                )
                continue
            return step, state, record
        if steps:
            raise UserError(
                f"every checkpoint in {self.directory} is damaged "
                f"(steps {steps}); remove the directory to start over"
            )
        return None

    def _set_aside(self, step: int) -> Path:
        """Moves a damaged step out of the way (kept for inspection) so it can be saved again."""
        aside = (
            self.directory.parent
            / "damaged_checkpoints"
            / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), aside)
        self._manager.reload()
        return aside

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
