"""Calibrated per-layer keep ratios: measure how many blocks each layer of a frozen model needs.

The paper tunes one threshold per layer (section 2, Algorithm 1); its artifact and our budgets
use static per-layer keep ratios instead. Calibration derives those ratios from the paper's
analysis definition: a block is uninformative when its score is under `tau` (10%) of the layer's
maximum, outliers excluded.

    scores = layer_block_scores(model, token_ids, block_size=64)   # float32 [L, B, M]
    ratios = calibrated_keep_ratios(scores, tau=0.1)               # L floats in (0, 1]
    write_schedule_file(path, attention=ratios, source={...})      # lemo.schedule=file:PATH

Or by the loss itself: which layers can keep `trial_ratio` of their blocks while the model's
loss on the samples rises by at most `max_rise` nats (`loss_bounded_keep_ratios`, from each
layer's own rise, `single_layer_loss_rises`). The score threshold says which blocks carry
attention mass; only the loss says what dropping them costs, and on small models the two
disagree (docs/ACCURACY.md).

Scores are the exact oracle scores (paper eq. 2, causal) that training's block selection ranks,
computed from each layer's input in the dense model, so no elimination upstream changes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from lemo_jax.lemo.layer import EliminationPlan, mlp_intermediate, token_magnitudes
from lemo_jax.model.llama import PROJECTIONS, Llama, matmul_precision
from lemo_jax.model.loss import chunked_cross_entropy, next_token_targets
from lemo_jax.model.rope import rotary_angles
from lemo_jax.train.step import sequence_loss_sum
from pallas_kernels import block_scores


def layer_block_scores(
    model: Llama, token_ids: Int[Array, "B T"], *, block_size: int = 64
) -> Float[Array, "L B M"]:
    """Key-block scores of every layer of the dense `model`, M = ceil(T / block_size).

    Layer l's scores come from its own normalised input `attention_norm(h_l)`, through its
    RoPE'd queries and keys, exactly as training's oracle selection reads them. Forward only:
    nothing is differentiated and `block_scores` stops gradients anyway.
    """
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [B, T]; got {token_ids.shape=}")
    return _layer_block_scores(model, token_ids, block_size)


@nnx.jit(static_argnames=("block_size",))
def _layer_block_scores(model: Llama, token_ids, block_size: int):
    return dense_layer_scan(model, token_ids, block_size=block_size).scores


class LayerScan(NamedTuple):
    """Per layer of a dense pass: attention inputs and block scores, MLP inputs and token
    magnitudes (None unless asked for)."""

    inputs: Float[Array, "L B T D"] | None
    scores: Float[Array, "L B M"]
    mlp_inputs: Float[Array, "L B T D"] | None = None
    mlp_scores: Float[Array, "L B T"] | None = None


def dense_layer_scan(
    model: Llama,
    token_ids: Int[Array, "B T"],
    *,
    block_size: int,
    kernels: str = "xla",
    keep_inputs: bool = False,
    keep_mlp: bool = False,
) -> LayerScan:
    """One pass of the dense `model` over its layers: per layer the oracle key-block scores of
    its normalised attention input (and that input, with `keep_inputs`); with `keep_mlp` also
    the normalised MLP input and the oracle's per-token MLP magnitudes
    ||silu(gate(x)) * up(x)||^2 (`lemo_jax.lemo.layer.token_magnitudes`)."""
    with matmul_precision(model.config.compute_jnp_dtype):
        B, T = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rotary_angles(model.config.rope, model.config.head_dim, positions)
        no_dropout = dict.fromkeys(PROJECTIONS)

        def body(h, index):
            layer = model.layer(index)  # the frozen dense layer, without dropout
            x = layer.attention_norm(h)
            query, key = layer.attention.rotated_query_key(x, cos, sin)
            scores = block_scores(query, key, block_size=block_size, causal=True, impl=kernels)
            h = h + layer.attention(x, cos, sin, no_dropout)
            mlp_input = layer.mlp_norm(h)
            intermediate = mlp_intermediate(layer.mlp, mlp_input)
            h = h + layer.mlp.down_proj(intermediate, dropout_key=None)
            mlp = (mlp_input, token_magnitudes(intermediate)) if keep_mlp else (None, None)
            return h, ((x if keep_inputs else None), scores, *mlp)

        h = model.embedding(token_ids)  # [B, T, D]
        _, outputs = jax.lax.scan(body, h, jnp.arange(model.config.num_layers))
    return LayerScan(*outputs)


def _reference_maximum(scores: np.ndarray, outlier_quantile: float) -> np.ndarray:
    """[L, B, M] -> [L, B, 1]: the layer's maximum block score per example, outliers excluded.

    The maximum is the `outlier_quantile` quantile of the M scores, taken as an actual score
    (numpy's "lower" method, the floor(q * (M - 1))-th smallest), so the top
    M - 1 - floor(q * (M - 1)) blocks count as outliers: at least one whenever M >= 2 and q < 1,
    and about 1% of them for long sequences at q = 0.99. Always excluding the top block matters
    under causal scoring: key block n is summed over the M - n query blocks that can see it, and
    block 0 is also the attention sink (every query attends to it whatever its content), so the
    first block routinely scores far above all others. Measured against it, most blocks would
    look uninformative for positional reasons, not for their content. The raw causal sums are
    kept (not divided by M - n) because they are exactly what training's top-k ranks: with
    these counts as budgets, top-k keeps the blocks this criterion calls informative. The cost:
    the last blocks are seen by few queries, so even content-free scores (a random model) fail
    the threshold there and calibrate to about 1 - tau, not 1 (0.91-0.92 at 32 blocks).
    """
    return np.quantile(scores, outlier_quantile, axis=-1, method="lower", keepdims=True)


def calibrated_keep_ratios(
    scores: Float[Array, "L B M"] | np.ndarray,
    *,
    tau: float = 0.1,
    outlier_quantile: float = 0.99,
    min_ratio: float = 0.0,
    use_dense_end_layers: bool = True,
) -> list[float]:
    """Per-layer keep ratios from block scores of sample sequences (paper section 2).

    Per layer and example, a block is informative when its score >= tau * the maximum with
    outliers excluded (`_reference_maximum`); the layer's ratio is the mean informative fraction
    over the examples, raised to `min_ratio` if below. It is never 0: the reference block itself
    passes (tau <= 1), and an all-zero layer keeps everything.

    With `use_dense_end_layers`, the first and last layers keep 1.0 whatever they measure, as in
    the paper's end-to-end rule (every reported run): layer 0 scores raw token embeddings, before
    any context has been mixed in, so its scores say little about which tokens later matter; and
    a token the last layer drops reaches the LM head without its final attention update, so the
    loss sees the error directly, with no later layer to correct it. The rule's dense prefix
    (layers 0..14 of 32) is not imposed: calibration measures those layers instead, as the
    paper's per-layer table does.
    """
    scores = np.asarray(scores, dtype=np.float64)  # float32 scores compare exactly in float64
    if scores.ndim != 3 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty [L, B, M] array; got {scores.shape=}")
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1]; got {tau=}")
    if not 0 <= outlier_quantile <= 1:
        raise ValueError(f"outlier_quantile must be in [0, 1]; got {outlier_quantile=}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1]; got {min_ratio=}")
    if not np.all(np.isfinite(scores)) or np.any(scores < 0):
        raise ValueError("block scores must be finite and non-negative (relu'd logit sums)")
    maximum = _reference_maximum(scores, outlier_quantile)  # [L, B, 1]
    informative = scores >= tau * maximum  # [L, B, M]
    ratios = informative.mean(axis=(1, 2))  # equal M per example: mean of per-example fractions
    ratios = np.clip(ratios, min_ratio, 1.0)
    if use_dense_end_layers:
        ratios[[0, -1]] = 1.0
    return [float(ratio) for ratio in ratios]


# ---------------------------------------------------------------------------------------------
# Loss-bounded calibration (paper Algorithm 1's idea: steps on the model's quality, per layer).


@nnx.jit(static_argnames=("plan", "loss_chunk_size"))
def _window_loss(model: Llama, token_ids, plan: EliminationPlan | None, loss_chunk_size: int):
    total, count = sequence_loss_sum(
        model,
        token_ids,
        dropout_key=None,
        remat_policy="none",
        loss_chunk_size=loss_chunk_size,
        plan=plan,
    )
    return total / count


def mean_window_loss(
    model: Llama,
    windows: Int[Array, "W T"],
    plan: EliminationPlan | None,
    *,
    loss_chunk_size: int = 2048,
) -> float:
    """Mean next-token loss of `model` (under `plan`, dense for None) over the windows, one
    window at a time (one compiled shape, the memory of a single sequence)."""
    losses = [_window_loss(model, window[None], plan, loss_chunk_size) for window in windows]
    return float(np.mean(losses))


@nnx.jit(static_argnames=("num_blocks", "plan", "loss_chunk_size"))
def _single_layer_loss(model: Llama, token_ids, layer, num_blocks, plan, loss_chunk_size):
    """The loss with only layer `layer` (traced: one compilation serves every layer) keeping
    `num_blocks` blocks for attention, selected as training selects them under `plan`."""
    with matmul_precision(model.config.compute_jnp_dtype):
        B, T = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rotary_angles(model.config.rope, model.config.head_dim, positions)

        def dense(index, h):
            return model.layer(index)(h, cos, sin, None)

        h = jax.lax.fori_loop(0, layer, dense, model.embedding(token_ids))
        kept = model.select_attention_tokens(h, cos, sin, layer, num_blocks=num_blocks, plan=plan)
        h = model.layer(layer)(
            h, cos, sin, None, attention_token_ids=kept, kernels=plan.row_kernels
        )
        h = jax.lax.fori_loop(layer + 1, model.config.num_layers, dense, h)
        hidden = model.final_norm(h)
    targets, weights = next_token_targets(token_ids)
    total, count = chunked_cross_entropy(
        model.logits, hidden, targets, weights, chunk_size=loss_chunk_size
    )
    return total / count


def single_layer_loss_rises(
    model: Llama,
    windows: Int[Array, "W T"],
    *,
    num_blocks: int,
    plan: EliminationPlan,
    dense_loss: float,
    loss_chunk_size: int = 2048,
) -> np.ndarray:
    """[L] float64: per layer, the mean loss rise over the windows when that layer alone keeps
    `num_blocks` attention blocks (chosen by `plan`'s scorer and settings) and every other
    layer is dense. Compiled once for all layers."""
    rises = []
    for layer in range(model.config.num_layers):
        losses = [
            _single_layer_loss(
                model, window[None], jnp.int32(layer), num_blocks, plan, loss_chunk_size
            )
            for window in windows
        ]
        rises.append(float(np.mean(losses)) - dense_loss)
    return np.asarray(rises)


class LossBoundedRatios(NamedTuple):
    ratios: list[float]  # per layer: `trial_ratio` for the chosen layers, 1.0 elsewhere
    rise: float  # the measured loss rise of `ratios` together
    order: list[int]  # candidate layers, least harmful first
    evaluated: list[tuple[int, float]]  # (layers pruned, measured rise) of every joint probe


def loss_bounded_keep_ratios(
    single_rises: Sequence[float],
    *,
    max_rise: float,
    trial_ratio: float,
    joint_rise: Callable[[list[float]], float],
    use_dense_end_layers: bool = True,
) -> LossBoundedRatios:
    """The most layers keeping `trial_ratio` whose joint loss rise stays within `max_rise`.

    Layers are taken in order of their own rise (`single_layer_loss_rises`), least harmful
    first; layers that alone exceed `max_rise` (and, with `use_dense_end_layers`, the first and
    last, see `calibrated_keep_ratios`) are never taken. Joint rises are not the sum of single
    ones, so `joint_rise(ratios)` measures them: a bisection on the number of layers taken,
    assuming more layers never lower the rise (about log2(L) measurements).
    """
    if not max_rise > 0:
        raise ValueError(f"max_rise must be positive; got {max_rise=}")
    if not 0 < trial_ratio < 1:
        raise ValueError(f"trial_ratio must be in (0, 1); got {trial_ratio=}")
    rises = np.asarray(single_rises, dtype=np.float64)
    num_layers = len(rises)
    excluded = {0, num_layers - 1} if use_dense_end_layers else set()
    order = [
        int(layer)
        for layer in np.argsort(rises, kind="stable")
        if layer not in excluded and rises[layer] <= max_rise
    ]

    def ratios_for(count: int) -> list[float]:
        chosen = set(order[:count])
        return [trial_ratio if layer in chosen else 1.0 for layer in range(num_layers)]

    evaluated: list[tuple[int, float]] = []
    best, best_rise = 0, 0.0
    low, high = 1, len(order)  # the answer is in [best, high]; `best` is known to fit
    while low <= high:
        middle = (low + high) // 2
        rise = float(joint_rise(ratios_for(middle)))
        evaluated.append((middle, rise))
        if rise <= max_rise:
            best, best_rise, low = middle, rise, middle + 1
        else:
            high = middle - 1
    return LossBoundedRatios(ratios_for(best), best_rise, order, evaluated)
