"""Cross-entropy over the LM head, computed in sequence chunks.

Full logits are [B, T, V] float32: 8 GB at 64K tokens with a 32K vocabulary. Scanning over
chunks of the sequence, with each chunk's LM head + log-softmax under `jax.checkpoint`, keeps only
one chunk's logits alive, in the forward pass and again when the backward pass recomputes them
(paper section 4.4, "segment-based peak cutting").
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def chunked_cross_entropy(
    logits_fn: Callable[[Float[Array, "B C D"]], Float[Array, "B C V"]],
    hidden: Float[Array, "B T D"],
    targets: Int[Array, "B T"],
    weights: Float[Array, "B T"],
    *,
    chunk_size: int = 2048,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Returns (sum of weighted token NLLs, sum of weights), both float32 scalars.

    `logits_fn` maps hidden states to float32 logits (the model's LM head).
    """
    B, T, _ = hidden.shape
    chunk_size = min(chunk_size, T)
    padding = (-T) % chunk_size
    if padding:  # padded positions get weight 0, so they add nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padding)))
        weights = jnp.pad(weights, ((0, 0), (0, padding)))
    num_chunks = (T + padding) // chunk_size

    def to_chunks(x):  # [B, T, ...] -> [num_chunks, B, chunk_size, ...]
        return jnp.swapaxes(x.reshape(B, num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_nll(h, t, w):
        logits = logits_fn(h).astype(jnp.float32)  # [B, C, V]
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((log_normaliser - target_logit) * w)

    def body(total, chunk):
        return total + chunk_nll(*chunk), None

    xs = (to_chunks(hidden), to_chunks(targets), to_chunks(weights.astype(jnp.float32)))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights.astype(jnp.float32))


def next_token_targets(
    input_ids: Int[Array, "B T"],
) -> tuple[Int[Array, "B T"], Float[Array, "B T"]]:
    """Targets shifted left by one; the last position has no target and weight 0."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.ones(input_ids.shape, jnp.float32).at[:, -1].set(0.0)
    return targets, weights
