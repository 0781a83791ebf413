"""Which blocks each layer keeps: LeMo's forward pass with every layer's selection returned.

Training's step runs the layer groups of an `EliminationPlan` and discards each layer's kept
token ids once the layer has used them. `kept_blocks` runs the same forward pass (the same
`Llama.select_attention_tokens` and decoder layers, group by group) without dropout or remat,
and also returns, per layer, which 64-token blocks its attention kept, e.g. for a heat map of
layers x blocks. A layer's selection depends on the layers before it, since eliminated tokens
skip their updates, so it cannot be read from a dense pass except up to the first pruned layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lemo_jax.lemo.layer import EliminationPlan
from lemo_jax.model.llama import Llama, matmul_precision
from lemo_jax.model.rope import rotary_angles


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
    with matmul_precision(model.config.compute_jnp_dtype):
        B, T = token_ids.shape
        num_blocks = T // plan.block_size
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rotary_angles(model.config.rope, model.config.head_dim, positions)
        h = model.embedding(token_ids)  # [B, T, D]
        kept = []
        for group in plan.groups:
            # The body of `Llama._run_group` without dropout keys and remat, which change
            # neither the selection nor the forward values.
            mlp_tokens = None if group.mlp_blocks is None else group.mlp_blocks * plan.block_size

            def body(h, index, group=group, mlp_tokens=mlp_tokens):
                token_ids_kept, mask = None, jnp.ones((B, num_blocks), bool)
                if group.attention_blocks is not None:
                    token_ids_kept = model.select_attention_tokens(
                        h, cos, sin, index, num_blocks=group.attention_blocks, plan=plan
                    )  # [B, R], whole blocks in order
                    mask = _block_mask(token_ids_kept, plan.block_size, num_blocks)
                mlp_scorer = None
                if mlp_tokens is not None and plan.scorer == "predictor":
                    mlp_scorer = functools.partial(model.block_predictor.token_scores, index)
                h = model.layer(index)(
                    h,
                    cos,
                    sin,
                    None,
                    attention_token_ids=token_ids_kept,
                    mlp_tokens=mlp_tokens,
                    mlp_scorer=mlp_scorer,
                    kernels=plan.row_kernels,
                )
                return h, mask

            h, group_kept = jax.lax.scan(body, h, jnp.arange(group.start, group.stop))
            kept.append(group_kept)  # [layers of the group, B, M]
        return KeptBlocks(jnp.concatenate(kept), model.final_norm(h))


def _block_mask(
    token_ids: Int[Array, "B R"], block_size: int, num_blocks: int
) -> Bool[Array, "B M"]:
    """Kept token ids (whole blocks) -> a [B, M] mask of the kept blocks."""
    block_ids = token_ids[:, ::block_size] // block_size  # [B, R / block_size]
    rows = jnp.arange(token_ids.shape[0])[:, None]
    return jnp.zeros((token_ids.shape[0], num_blocks), bool).at[rows, block_ids].set(True)
