"""Which blocks each layer keeps: LeMo's forward pass with every layer's selection returned.

Training's step runs the layer groups of an `EliminationPlan` and drops each layer's kept token
ids once the layer has used them. `kept_blocks` runs the model's same forward pass
(`Llama.hidden_states_and_kept_tokens`, without dropout or remat) and turns the ids into, per
layer, which 64-token blocks its attention kept, e.g. for a heat map of layers x blocks. A
layer's selection depends on the layers before it, since eliminated tokens skip their updates,
so it cannot be read from a dense pass except up to the first pruned layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lemo_jax.lemo.layer import EliminationPlan
from lemo_jax.model.llama import Llama


class KeptBlocks(NamedTuple):
    """`kept[l, b, m]`: whether layer l's attention kept block m of example b (dense layers keep
    every block); `hidden`: the final-norm output, as `Llama.hidden_states(..., plan=plan)`."""

    kept: Bool[Array, "L B M"]
    hidden: Float[Array, "B T D"]


def kept_blocks(model: Llama, token_ids: Int[Array, "B T"], plan: EliminationPlan) -> KeptBlocks:
    """The LeMo forward pass of `model` under `plan` (no dropout), with each layer's kept blocks.

    T must be a multiple of `plan.block_size` (as in training, `lemo_jax.lemo.budgets`).
    """
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.ndim != 2 or token_ids.shape[1] % plan.block_size:
        raise ValueError(
            f"token_ids must be [B, T] with T a multiple of {plan.block_size=}; "
            f"got {token_ids.shape=}"
        )
    return _kept_blocks(model, token_ids, plan)


@nnx.jit(static_argnames=("plan",))
def _kept_blocks(model: Llama, token_ids, plan: EliminationPlan) -> KeptBlocks:
    B, T = token_ids.shape
    num_blocks = T // plan.block_size
    hidden, kept_ids = model.hidden_states_and_kept_tokens(token_ids, plan=plan)
    masks = []
    for group, ids in zip(plan.groups, kept_ids, strict=True):
        if ids is None:  # attention-dense layers keep every block
            masks.append(jnp.ones((group.stop - group.start, B, num_blocks), bool))
        else:  # [layers, B, R] -> [layers, B, M]
            masks.append(jax.vmap(lambda i: _block_mask(i, plan.block_size, num_blocks))(ids))
    return KeptBlocks(jnp.concatenate(masks), hidden)


def _block_mask(
    token_ids: Int[Array, "B R"], block_size: int, num_blocks: int
) -> Bool[Array, "B M"]:
    """Kept token ids (whole blocks) -> a [B, M] mask of the kept blocks."""
    block_ids = token_ids[:, ::block_size] // block_size  # [B, R / block_size]
    rows = jnp.arange(token_ids.shape[0])[:, None]
    return jnp.zeros((token_ids.shape[0], num_blocks), bool).at[rows, block_ids].set(True)
