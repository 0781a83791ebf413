"""What the kernels share: shape validation for queries [B, T, N, H] and keys [B, S, K, H]
(grouped-query attention: N a multiple of K), and the in-kernel tile product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MIN_TILE = 16  # Triton's tl.dot needs every tile dimension >= 16


def tile_matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """2-D matmul with fp32 accumulation inside a kernel; fp32 inputs stay full fp32 (no TF32)."""
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def check_query_key_shapes(q: jax.Array, k: jax.Array, *, causal: bool, op: str) -> None:
    """Raises `ValueError` naming the shapes unless q and k fit together."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"q and k must be [B, T, N, H] and [B, S, K, H]; got {q.shape=} {k.shape=}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch (B) and head dim (H) must match; got {q.shape=} {k.shape=}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads N must be a multiple of kv heads K; got {q.shape=} {k.shape=}"
        )
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal {op} needs S == T; got {q.shape=} {k.shape=}")
