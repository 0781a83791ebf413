"""Rebuilding a run's model from its directory: base weights + the checkpointed trainables."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from lemo_jax.configs.overrides import config_from_dict
from lemo_jax.configs.run import RunConfig
from lemo_jax.errors import UserError
from lemo_jax.io.checkpoint import RunCheckpoints
from lemo_jax.model.llama import Llama
from lemo_jax.model.lora import trainable_filter
from lemo_jax.train.optimizer import make_optimizer
from lemo_jax.train.setup import RUN_CONFIG_FILE, build_model
from lemo_jax.train.step import init_state


def read_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir).expanduser() / RUN_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a lemo-jax run directory (no {RUN_CONFIG_FILE})")
    try:
        return config_from_dict(RunConfig, json.loads(path.read_text()))
    except (ValueError, UserError) as err:
        raise UserError(f"{path} is unreadable: {err}") from None


def load_run_model(
    run_dir: str | Path, *, step: int | None = None
) -> tuple[Llama, object, RunConfig, int]:
    """(model, tokenizer, run config, step) from a run's checkpoint (the latest by default)."""
    config = read_run_config(run_dir)
    lora = config.lora if config.train.method == "lora" else None
    model, tokenizer = build_model(
        config.model, lora, seq_len=config.train.seq_len, seed=config.train.seed
    )
    graphdef, state = init_state(
        model, trainable_filter(lora), make_optimizer(config.train), config.train.seed
    )
    checkpoints = RunCheckpoints(Path(run_dir).expanduser() / "checkpoints", asynchronous=False)
    tree = dict(
        step=state.step, trainable=state.trainable, opt_state=state.opt_state, rng=state.rng
    )
    if step is None:
        restored = checkpoints.restore_latest(tree)
        if restored is None:
            raise UserError(f"{run_dir} has no checkpoint yet")
        step, tree, _ = restored
    else:
        if step not in checkpoints.steps():
            raise UserError(
                f"{run_dir} has no checkpoint at step {step}; "
                f"available: {checkpoints.steps() or 'none'}"
            )
        try:
            tree, _ = checkpoints.restore(step, tree)
        except Exception as err:  # any read failure means the checkpoint is damaged
            raise UserError(
                f"the checkpoint at step {step} in {run_dir} is damaged: "
                f"{str(err).strip().splitlines()[0][:200]}"
            ) from None
    checkpoints.close()
    model = nnx.merge(graphdef, tree["trainable"], state.frozen)
    return model, tokenizer, config, step
