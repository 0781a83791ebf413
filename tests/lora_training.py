"""Shared pieces of the tests that differentiate a LoRA model's loss."""

import jax
from flax import nnx

from lemo_jax.train.step import sequence_loss_sum


def activate_lora(model) -> None:
    """Random non-zero LoRA B matrices: with B = 0 (PEFT's init) A's gradient is exactly zero."""
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":
            shape = variable.get_value().shape
            variable.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), shape))


def mean_loss(graphdef, *, remat_policy: str, loss_chunk_size: int, plan=None):
    """`loss(trainable, frozen, token_ids)`: the mean next-token loss of the merged model."""

    def loss(trainable, frozen, token_ids):
        total, count = sequence_loss_sum(
            nnx.merge(graphdef, trainable, frozen),
            token_ids,
            dropout_key=None,
            remat_policy=remat_policy,
            loss_chunk_size=loss_chunk_size,
            plan=plan,
        )
        return total / count

    return loss
