"""Shape validation shared by the kernels whose inputs are queries [B, T, N, H] and keys
[B, S, K, H] (grouped-query attention: N a multiple of K)."""

from __future__ import annotations

import jax


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
