"""Token elimination inside one decoder layer (paper sections 4.2 and 4.4).

An eliminated attention block: score key blocks (stop-gradient), keep the top `budget` blocks in
their original order, gather only those rows of the residual stream and normalise them
("selective load"), run q/k/v, RoPE at the original positions, causal attention over the
compacted sequence and o_proj on the R kept tokens, and add the result back into the residual at
the kept rows. Eliminated tokens pass through unchanged and are neither queries nor keys/values
in that layer. A token-sparse MLP does the same with per-token scores.

Only compacted [B, R, ...] tensors and int32 indices depend on the budget; the selection itself is
computed outside the layer's remat region, so the backward pass neither stores nor recomputes
the full-length scoring tensors.

Elimination is per sequence, so on a mesh (a batch split over devices) it needs no
communication: the selection and the row ops run on each device's own sequences
(`lemo_jax.model.batch_parallel.on_each_device`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lemo_jax.model.batch_parallel import on_each_device
from pallas_kernels import block_scores, gather_rmsnorm
from pallas_kernels import scatter_add_rows as _scatter_add_rows

# Query x key blocks per product of the Pallas block-score kernel: the fastest on the H200 at
# Llama-2-7B shapes (16K-64K tokens; BENCHMARKS.md, "Sparse-path kernels on the H200").
SCORE_TILES = (4, 2)


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """Consecutive layers [start, stop) sharing static budgets; None means dense."""

    start: int
    stop: int
    attention_blocks: int | None = None
    mlp_blocks: int | None = None


@dataclasses.dataclass(frozen=True)
class EliminationPlan:
    """Static (hashable) description of which layers eliminate how many 64-token blocks."""

    block_size: int
    groups: tuple[GroupPlan, ...]
    keep_first_blocks: int = 1
    pruned_remat: str | None = None  # remat policy of pruned groups; None: the run's policy
    score_reduction: str = "sum"  # "sum" (paper eq. 2) or "mean" over causally visible queries
    kernels: str = "xla"  # implementation of the block scores: "xla" or "pallas"
    row_kernels: str = "xla"  # selective load and in-place residual add: "xla" or "pallas"
    scorer: str = "oracle"  # "oracle" (paper eq. 2) or "predictor" (the model's predictors)


def gather_rows(
    x: Float[Array, "B T ..."], token_ids: Int[Array, "B R"]
) -> Float[Array, "B R ..."]:
    index = token_ids.reshape(*token_ids.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def scatter_add_rows(
    h: Float[Array, "B T D"],
    token_ids: Int[Array, "B R"],
    rows: Float[Array, "B R D"],
    kernels: str = "xla",
) -> Float[Array, "B T D"]:
    """h[b, token_ids[b, r]] += rows[b, r] (in place with the Pallas kernel); indices are
    unique, so the add is exact."""
    impl = _impl(kernels, h.shape[-1])
    return on_each_device(
        lambda h, token_ids, rows: _scatter_add_rows(h, token_ids, rows, impl=impl),
        h,
        token_ids,
        rows,
    )


def selective_load(norm, h: Float[Array, "B T D"], token_ids: Int[Array, "B R"], kernels: str):
    """`norm` (an RMSNorm) applied to the kept rows of h only, gathered and normalised in one
    pass (paper section 4.4)."""
    impl = _impl(kernels, h.shape[-1])

    def load(h, token_ids, scale):
        return gather_rmsnorm(
            h, token_ids, scale, eps=norm.eps, out_dtype=norm.compute_dtype, impl=impl
        )

    return on_each_device(load, h, token_ids, shared=(norm.scale[...],))


def _impl(kernels: str, dim: int) -> str:
    """The row kernels tile whole rows of D elements: Triton needs D to be a power of two."""
    return kernels if dim & (dim - 1) == 0 else "xla"


def block_token_ids(block_ids: Int[Array, "B K"], block_size: int) -> Int[Array, "B R"]:
    """Sorted block ids -> the sorted token ids they cover (R = K * block_size)."""
    offsets = jnp.arange(block_size, dtype=block_ids.dtype)
    return (block_ids[..., None] * block_size + offsets).reshape(block_ids.shape[0], -1)


def top_blocks(scores: Float[Array, "B M"], num_kept: int, keep_first: int) -> Int[Array, "B K"]:
    """The `num_kept` highest-scoring blocks in original order; the first `keep_first` blocks
    always stay (the sequence start acts as an attention sink for every later query)."""
    forced = jnp.arange(scores.shape[-1]) < keep_first
    return sorted_top_k(jnp.where(forced, jnp.inf, scores), num_kept)


def sorted_top_k(scores: Float[Array, "B M"], num_kept: int) -> Int[Array, "B K"]:
    """The indices of the `num_kept` largest scores per row, in increasing order (int32)."""

    def select(scores):
        _, ids = jax.lax.top_k(scores, num_kept)
        return jnp.sort(ids, axis=-1).astype(jnp.int32)

    return on_each_device(select, scores)


def oracle_block_scores(
    query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], *, block_size: int, kernels: str
) -> Float[Array, "B M"]:
    """The oracle's key-block scores (paper eq. 2, causal) with the model's kernel choice: the
    Pallas kernel at `SCORE_TILES` (its query ranges split to fill the device) or XLA's tiled
    version; on a mesh, each device scores its own sequences."""
    return on_each_device(
        lambda query, key: block_scores(
            query,
            key,
            block_size=block_size,
            causal=True,
            impl=kernels,
            tiles=SCORE_TILES if kernels == "pallas" else (1, 1),
            splits=None,
        ),
        query,
        key,
    )


def attention_token_ids(
    layer,
    h: Float[Array, "B T D"],
    cos,
    sin,
    *,
    num_blocks: int,
    plan: EliminationPlan,
    predictor=None,
    index=None,
) -> Int[Array, "B R"]:
    """The kept token ids of one layer: top blocks by the oracle (paper eq. 2, from the layer's
    own LoRA-adapted queries and keys) or by the attached predictors (paper section 4.3)."""
    x = layer.attention_norm(jax.lax.stop_gradient(h))
    if plan.scorer == "predictor":
        if predictor is None:
            raise ValueError("plan.scorer='predictor' but the model has no predictors attached")
        scores = predictor(index, x, layer.attention, cos, sin, kernels=plan.kernels)
        scores = jax.lax.stop_gradient(scores)
    else:
        query, key = layer.attention.rotated_query_key(x, cos, sin)
        scores = oracle_block_scores(query, key, block_size=plan.block_size, kernels=plan.kernels)
    if plan.score_reduction == "mean":  # block n is seen by query blocks n .. M-1
        num_blocks_total = scores.shape[-1]
        scores = scores / (num_blocks_total - jnp.arange(num_blocks_total, dtype=scores.dtype))
    block_ids = top_blocks(scores, num_blocks, plan.keep_first_blocks)
    return jax.lax.stop_gradient(block_token_ids(block_ids, plan.block_size))


def eliminated_attention(
    layer,
    h: Float[Array, "B T D"],
    token_ids: Int[Array, "B R"],
    cos,
    sin,
    keys,
    kernels: str = "xla",
) -> Float[Array, "B T D"]:
    """h + attention over the kept tokens only, added back at their rows."""
    x = selective_load(layer.attention_norm, h, token_ids, kernels)  # norm kept rows only
    out = layer.attention(x, gather_rows(cos, token_ids), gather_rows(sin, token_ids), keys)
    return scatter_add_rows(h, token_ids, out, kernels)


def mlp_intermediate(mlp, x: Float[Array, "B T D"]) -> Float[Array, "B T F"]:
    """silu(gate(x)) * up(x) of the frozen MLP, without dropout."""
    return jax.nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


def token_magnitudes(intermediate: Float[Array, "B T F"]) -> Float[Array, "B T"]:
    """The token-sparse MLP's oracle criterion: ||intermediate||^2 per token, in float32."""
    return jnp.sum(jnp.square(intermediate.astype(jnp.float32)), axis=-1)


def token_sparse_mlp(
    layer,
    h: Float[Array, "B T D"],
    num_tokens: int,
    keys,
    kernels: str = "xla",
    scorer=None,
) -> Float[Array, "B T D"]:
    """h + MLP over the `num_tokens` tokens with the largest intermediate activation
    ||silu(gate(x)) * up(x)|| (the paper's MLP criterion), or the largest `scorer(x)` (a
    trained predictor's [B, T] scores, paper section 4.3), added back at their rows."""
    x = layer.mlp_norm(jax.lax.stop_gradient(h))
    magnitude = token_magnitudes(mlp_intermediate(layer.mlp, x)) if scorer is None else scorer(x)
    token_ids = sorted_top_k(jax.lax.stop_gradient(magnitude), num_tokens)
    out = layer.mlp(selective_load(layer.mlp_norm, h, token_ids, kernels), keys)
    return scatter_add_rows(h, token_ids, out, kernels)
