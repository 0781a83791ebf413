"""LeMo's oracle key-block scores (paper eq. 2, causal variant), tiled so memory stays O(T * b).

For queries q [B, T, N, H] and keys k [B, S, K, H] (GQA: query head n reads kv head n // G,
G = N // K), block size b, the logits are s_h(i, j) = q_i^h . k_j^(h // G) / sqrt(H) and

    tile score       B[m, n] = max over (i, j) in tile (m, n) of sum_h relu(s_h(i, j)) / N
    key-block score  score[n] = sum over query blocks m of B[m, n]

where tile (m, n) holds query block m and key block n, restricted to i >= j when causal; ragged
last blocks hold only the real tokens and a tile with no valid pair scores 0. Only positive
logits count, and the max keeps a block that holds even one important token (paper section 2).
The scores select which key blocks a layer keeps, under no-grad: the inputs are wrapped in
`stop_gradient`.

`impl="xla"` (the CPU path) scans over query blocks; each step scores one query block against
all keys for all heads at once, so its peak is one [B, N, b, S] float32 array of logits, never the
[B, N, T, S] ones (XLA:CPU even fuses the logits into the head sum, leaving [B, b, S]; measured
temp at T = S = 4096, N = 8, K = 2, H = 64, b = 64: 4 MiB, against 512 MiB of full logits).
The scan carry is the [B, ceil(S / b)] score accumulator. `impl="pallas"` is reserved for a fused
kernel behind the same signature; `impl="reference"` runs `block_scores_reference`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._shapes import check_query_key_shapes

_IMPLS = ("xla", "pallas", "reference")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_shapes(q, k, block_size: int, causal: bool) -> None:
    check_query_key_shapes(q, k, causal=causal, op="block scores")
    if block_size < 1:
        raise ValueError(f"block_size must be positive; got {block_size=}")


def _valid_pairs(q_positions, k_positions, q_len: int, kv_len: int, causal: bool) -> jax.Array:
    """[len(q_positions), len(k_positions)] bool: real query i, real key j, and i >= j if causal.
    Shared by the tiled path and the reference so padding and causality are written once."""
    valid = (q_positions[:, None] < q_len) & (k_positions[None, :] < kv_len)
    if causal:
        valid &= q_positions[:, None] >= k_positions[None, :]
    return valid


def _tile_max(head_sums: jax.Array, block_size: int) -> jax.Array:
    """[B, Tq, S_padded] per-pair head sums -> [B, S_padded // b] max over queries and each key
    block. Every entry is >= 0 (relu'd, masked entries set to 0), so zeros from masking or padding
    never change a tile's max, and a tile with no valid pair gives 0 rather than -inf."""
    batch, _, padded_kv_len = head_sums.shape
    blocks = head_sums.reshape(batch, -1, padded_kv_len // block_size, block_size)  # [B,Tq,Mk,b]
    return jnp.max(blocks, axis=(1, 3))


def _block_scores_xla(q, k, block_size: int, causal: bool) -> jax.Array:
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    num_q_blocks = _cdiv(q_len, block_size)
    num_k_blocks = _cdiv(kv_len, block_size)
    scale = 1.0 / math.sqrt(head_dim)
    is_half = jnp.dtype(q.dtype).itemsize < 4 and jnp.dtype(k.dtype).itemsize < 4
    precision = lax.Precision.DEFAULT if is_half else lax.Precision.HIGHEST

    # Pad T and S to whole blocks with zeros; _valid_pairs masks the padded rows and columns.
    q = jnp.pad(q, ((0, 0), (0, num_q_blocks * block_size - q_len), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, num_k_blocks * block_size - kv_len), (0, 0), (0, 0)))
    # [B, S_pad, K, H] -> [B, K, S_pad, H] once, outside the loop, so no step re-lays out K.
    k = jnp.swapaxes(k, 1, 2)
    k_positions = jnp.arange(k.shape[2])

    def step(scores, block_index):
        start = block_index * block_size
        q_block = lax.dynamic_slice_in_dim(q, start, block_size, axis=1)  # [B, b, N, H]
        # GQA by grouping, never by repeating K: query head n = k * G + g reads kv head k.
        q_block = q_block.reshape(batch, block_size, num_kv_heads, -1, head_dim)  # [B,b,K,G,H]
        # fp32 accumulation whatever the input dtype (bf16 products are exact in fp32). HIGHEST
        # only for fp32 inputs, to keep them out of TF32 on a GPU; bf16 inputs need nothing more
        # than the default bf16 tensor-core product. This [B, K, G, b, S_pad] fp32 array is the
        # step's memory peak, O(N * b * S) per batch row (XLA:CPU may fuse it into the head sum).
        logits = scale * jnp.einsum(
            "bqkgh,bksh->bkgqs",
            q_block,
            k,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        head_sums = jnp.sum(jax.nn.relu(logits), axis=(1, 2)) / num_heads  # [B, b, S_pad]
        q_positions = start + jnp.arange(block_size)
        valid = _valid_pairs(q_positions, k_positions, q_len, kv_len, causal)  # [b, S_pad]
        head_sums = jnp.where(valid, head_sums, 0.0)
        return scores + _tile_max(head_sums, block_size), None  # [B, Mk]

    init = jnp.zeros((batch, num_k_blocks), jnp.float32)
    scores, _ = lax.scan(step, init, jnp.arange(num_q_blocks))
    return scores


@functools.partial(jax.jit, static_argnames=("block_size", "causal", "impl"))
def block_scores(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    *,
    block_size: int = 64,
    causal: bool = True,
    impl: str = "xla",
) -> jax.Array:  # [B, ceil(S / block_size)] float32
    """LeMo key-block scores score[n] = sum_m max_tile(m, n) sum_h relu(s_h) / N (module doc).

    Any T and S (ragged last blocks are masked, not dropped); causal needs S == T. Inputs may be
    bf16; logits and scores are fp32. No gradient flows: the inputs are stop_gradient'ed.
    `impl`: "xla" (tiled jnp, the CPU path), "reference" (direct O(T * S)), or "pallas"
    (not written yet).
    """
    _check_shapes(q, k, block_size, causal)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl=}")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    if impl == "pallas":
        raise NotImplementedError(
            "block_scores impl='pallas': the fused Pallas block-score kernel (one program per "
            "key block, looping over query blocks, GQA-native) is not written yet; use impl='xla'"
        )
    if impl == "reference":
        return block_scores_reference(q, k, block_size=block_size, causal=causal)
    return _block_scores_xla(q, k, block_size, causal)


def block_scores_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    *,
    block_size: int = 64,
    causal: bool = True,
) -> jax.Array:  # [B, ceil(S / block_size)] float32
    """The direct formula over all [B, N, T, S] fp32 logits at once, for tests. O(T * S) memory:
    XLA:CPU fuses the logits into the head sum and holds [B, T, S]; a GPU holds all logits."""
    _check_shapes(q, k, block_size, causal)
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    q = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, -1, head_dim)  # [B,T,K,G,H]
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q, k.astype(jnp.float32), precision=lax.Precision.HIGHEST
    ) / math.sqrt(head_dim)
    head_sums = jnp.sum(jax.nn.relu(logits), axis=(1, 2)) / num_heads  # [B, T, S]
    valid = _valid_pairs(jnp.arange(q_len), jnp.arange(kv_len), q_len, kv_len, causal)
    head_sums = jnp.where(valid, head_sums, 0.0)
    # Pad to whole tiles with zeros (never above a real entry, which is >= 0), then tile-max.
    num_q_blocks, num_k_blocks = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
    head_sums = jnp.pad(
        head_sums,
        ((0, 0), (0, num_q_blocks * block_size - q_len), (0, num_k_blocks * block_size - kv_len)),
    )
    tiles = head_sums.reshape(batch, num_q_blocks, block_size, num_k_blocks, block_size)
    tile_scores = jnp.max(tiles, axis=(2, 4))  # B[m, n]: [B, M, Mk]
    return jnp.sum(tile_scores, axis=1)  # [B, Mk]
