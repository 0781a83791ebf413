"""Optax AdamW with warm-up, schedule and global-norm clipping (the paper's recipe by default)."""

from __future__ import annotations

import optax

from lemo_jax.configs.run import TrainSection


def learning_rate_schedule(train: TrainSection) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant, cosine or linear decay to 0."""
    warmup = min(train.warmup_steps, train.steps)
    decay_steps = max(train.steps - warmup, 1)
    if train.schedule == "constant":
        after = optax.constant_schedule(train.learning_rate)
    elif train.schedule == "cosine":
        after = optax.cosine_decay_schedule(train.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(train.learning_rate, 0.0, decay_steps)
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, train.learning_rate, warmup)
    return optax.join_schedules([ramp, after], boundaries=[warmup])


def make_optimizer(train: TrainSection) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(train),
        b1=train.adam_b1,
        b2=train.adam_b2,
        weight_decay=train.weight_decay,
    )
    if train.clip_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(train.clip_norm), adamw)
