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
the keys for all heads at once, in chunks of whole key blocks (an eighth of S each when causal,
and only the chunks up to the query block's own: about 0.56 of the full product; all keys in
one chunk otherwise), so its peak is one [B, N, b, S / 8] float32 array of logits, never the
[B, N, T, S] ones (XLA:CPU even fuses the logits into the head sum). The scan carry is the
[B, ceil(S / b)] score accumulator. On a 2-core CPU the chunks made it 2.1x faster at
T = 16K (N = 8, K = 2, H = 64, bf16: 3.7 s against 7.9 s; 1.2x at 8K), with the same scores
to the bit. On the H200 it ran at about 6% of the bf16 matmul ceiling
without the causal chunks (430 ms per layer at 64K tokens): each step writes and reads its
logits.

`impl="pallas"` is a fused Triton-style Pallas kernel (interpret mode off the GPU): one program
per (key block n, batch row) loops over the query blocks m that see n (m >= n when causal) and,
for each, over all query heads, accumulating sum_h relu(q_h k_(h // G)^T) for the b x b tile in
registers; the tile's max is added to the program's running score[n]. No logits reach memory, K
is read per kv head (no repetition), and causally empty tiles are never visited.
`impl="reference"` runs `block_scores_reference`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import MIN_TILE, check_query_key_shapes, tile_matmul

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


# Causal XLA scores split the keys into this many chunks: query block m scores only the
# chunks up to the one holding key m, about 0.56 of the full product's work with 8, in at most
# 8 loop steps per query block (few enough that the loop's overhead stays small on a GPU).
_XLA_KEY_CHUNKS = 8


def _block_scores_xla(q, k, block_size: int, causal: bool) -> jax.Array:
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    num_q_blocks = _cdiv(q_len, block_size)
    num_k_blocks = _cdiv(kv_len, block_size)
    # Keys in chunks of whole blocks; without causality one chunk holds them all.
    chunk_blocks = _cdiv(num_k_blocks, _XLA_KEY_CHUNKS) if causal else num_k_blocks
    num_chunks = _cdiv(num_k_blocks, chunk_blocks)
    chunk_len = chunk_blocks * block_size
    scale = 1.0 / math.sqrt(head_dim)
    is_half = jnp.dtype(q.dtype).itemsize < 4 and jnp.dtype(k.dtype).itemsize < 4
    precision = lax.Precision.DEFAULT if is_half else lax.Precision.HIGHEST

    # Pad T and the keys to whole blocks and chunks with zeros; _valid_pairs masks the padding.
    q = jnp.pad(q, ((0, 0), (0, num_q_blocks * block_size - q_len), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, num_chunks * chunk_len - kv_len), (0, 0), (0, 0)))
    # [B, S_pad, K, H] -> [B, K, S_pad, H] once, outside the loop, so no step re-lays out K.
    k = jnp.swapaxes(k, 1, 2)

    def step(scores, block_index):
        start = block_index * block_size
        q_block = lax.dynamic_slice_in_dim(q, start, block_size, axis=1)  # [B, b, N, H]
        # GQA by grouping, never by repeating K: query head n = k * G + g reads kv head k.
        q_block = q_block.reshape(batch, block_size, num_kv_heads, -1, head_dim)  # [B,b,K,G,H]
        q_positions = start + jnp.arange(block_size)

        def add_chunk(chunk, scores):
            k_start = chunk * chunk_len
            k_chunk = lax.dynamic_slice_in_dim(k, k_start, chunk_len, axis=2)  # [B, K, C, H]
            # fp32 accumulation whatever the input dtype (bf16 products are exact in fp32).
            # HIGHEST only for fp32 inputs, to keep them out of TF32 on a GPU; bf16 inputs need
            # nothing more than the default bf16 tensor-core product. This [B, K, G, b, C] fp32
            # array is the step's memory peak (XLA:CPU may fuse it into the head sum).
            logits = scale * jnp.einsum(
                "bqkgh,bksh->bkgqs",
                q_block,
                k_chunk,
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            head_sums = jnp.sum(jax.nn.relu(logits), axis=(1, 2)) / num_heads  # [B, b, C]
            k_positions = k_start + jnp.arange(chunk_len)
            valid = _valid_pairs(q_positions, k_positions, q_len, kv_len, causal)  # [b, C]
            head_sums = jnp.where(valid, head_sums, 0.0)
            first = chunk * chunk_blocks
            old = lax.dynamic_slice_in_dim(scores, first, chunk_blocks, axis=1)
            new = old + _tile_max(head_sums, block_size)  # [B, chunk_blocks]
            return lax.dynamic_update_slice_in_dim(scores, new, first, axis=1)

        # Causal: the chunks after the one holding this block's last query are all masked.
        stop = num_chunks
        if causal:
            stop = jnp.minimum((start + block_size - 1) // chunk_len + 1, num_chunks)
        return lax.fori_loop(0, stop, add_chunk, scores), None

    init = jnp.zeros((batch, num_chunks * chunk_blocks), jnp.float32)
    scores, _ = lax.scan(step, init, jnp.arange(num_q_blocks))
    return scores[:, :num_k_blocks]


_OUT_WIDTH = 16  # each program writes its score broadcast over one 16-wide row (Triton tiles)


def _block_scores_kernel(
    q_ref, k_ref, out_ref, *, block_size, tiles, q_len, kv_len, causal, group, splits
):
    """Program (key tile, batch row, split): for each of its key blocks n, the sum over its
    share of the query blocks m of the tile max. A key tile holds `tiles[1]` blocks and each
    step of the loop multiplies a query tile of `tiles[0]` blocks by it, head by head, so every
    loaded tile serves several blocks; the per-block maxima are then taken over masked
    sub-tiles. The query tiles that see the key tile are cut into `splits` contiguous shares,
    one per program, whose partial sums the caller adds."""
    q_blocks, k_blocks = tiles
    q_rows, k_rows = q_blocks * block_size, k_blocks * block_size
    num_heads = q_ref.shape[1]
    k_start = pl.program_id(0) * k_rows
    k_positions = k_start + jnp.arange(k_rows)
    rows, cols = jnp.arange(q_rows), jnp.arange(k_rows)

    def body(q_tile, totals):
        q_start = q_tile * q_rows

        def add_head(head, head_sum):  # GQA: query head n reads kv head n // G
            q_tile_values = q_ref[pl.ds(q_start, q_rows), head, :]
            k_tile_values = k_ref[pl.ds(k_start, k_rows), head // group, :]
            logits = tile_matmul(q_tile_values, k_tile_values, transpose_b=True)
            return head_sum + jnp.maximum(logits, 0.0)

        # A loop rather than a Python unroll: Triton pipelines the innermost loop's two tile
        # loads; an unrolled body's 2 x N loads, all prefetched at once, would need more shared
        # memory than an SM has (measured: 1.5 MB asked for at N = 32, H = 128, bf16).
        head_sum = lax.fori_loop(0, num_heads, add_head, jnp.zeros((q_rows, k_rows), jnp.float32))
        q_positions = q_start + rows
        valid = (q_positions[:, None] < q_len) & (k_positions[None, :] < kv_len)
        if causal:
            valid &= q_positions[:, None] >= k_positions[None, :]
        head_sum = jnp.where(valid, head_sum, 0.0)  # >= 0: zeros never raise a maximum
        if tiles == (1, 1):
            return (totals[0] + jnp.max(head_sum),)
        new_totals = []
        for j in range(k_blocks):
            in_column = (cols >= j * block_size) & (cols < (j + 1) * block_size)
            total = totals[j]
            for i in range(q_blocks):
                in_row = (rows >= i * block_size) & (rows < (i + 1) * block_size)
                in_block = in_row[:, None] & in_column[None, :]
                total = total + jnp.max(jnp.where(in_block, head_sum, 0.0))
            new_totals.append(total)
        return tuple(new_totals)

    # Causal: query tiles wholly before the key tile's first key hold no pair with i >= j.
    first = k_start // q_rows if causal else 0
    num_q_tiles = pl.cdiv(q_len, q_rows)
    start, stop = first, num_q_tiles
    if splits > 1:
        share = pl.cdiv(num_q_tiles - first, splits)
        start = jnp.minimum(first + pl.program_id(2) * share, num_q_tiles)
        stop = jnp.minimum(start + share, num_q_tiles)
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(k_blocks))
    totals = lax.fori_loop(start, stop, body, zeros)
    for j in range(k_blocks):
        out_ref[j, :] = jnp.full((_OUT_WIDTH,), totals[j], jnp.float32)


# Enough programs to fill the device several times over: with fewer key tiles than this, each
# key tile's query range is split over several programs, since one program per key tile
# leaves the device idle behind the longest (the first key tile's, which every query tile
# sees). The H200 has 132 SMs. `splits=None` picks this way, as the model does. Timed on the
# H200 at Llama-2-7B shapes with 4x2 tiles (BENCHMARKS.md): the best splits were 4, 4 and 2 at
# 16K, 32K and 64K tokens (0.19 -> 0.39, 0.37 -> 0.42, 0.39 -> 0.43 of the matmul ceiling),
# 8 was not better than 4.
_TARGET_PROGRAMS = 1024
_MAX_SPLITS = 4


def query_splits(num_k_tiles: int, batch: int) -> int:
    """Programs per key tile: the power of two (<= 4) that brings the grid to about 1024."""
    splits = 1
    while splits < _MAX_SPLITS and num_k_tiles * batch * splits < _TARGET_PROGRAMS:
        splits *= 2
    return splits


def _block_scores_pallas(
    q,
    k,
    block_size: int,
    causal: bool,
    interpret: bool,
    tiles: tuple[int, int],
    splits: int | None,
    num_warps: int | None,
    num_stages: int,
) -> jax.Array:
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    q_rows, k_rows = tiles[0] * block_size, tiles[1] * block_size
    num_k_tiles = _cdiv(kv_len, k_rows)
    if splits is None:
        splits = query_splits(num_k_tiles, batch)
    padded_head_dim = max(MIN_TILE, pl.next_power_of_2(head_dim))
    unit = max(q_rows, k_rows)  # both powers of two times the block: the larger is a multiple

    def pad(x):  # zeros at the ends: padded rows are masked, padded head dims add nothing
        padded_len = _cdiv(max(q_len, kv_len), unit) * unit
        return jnp.pad(
            x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, padded_head_dim - head_dim))
        )

    q, k = pad(q), pad(k)
    kernel = functools.partial(
        _block_scores_kernel,
        block_size=block_size,
        tiles=tiles,
        q_len=q_len,
        kv_len=kv_len,
        causal=causal,
        group=num_heads // num_kv_heads,
        splits=splits,
    )

    def whole(x):  # all rows and heads of one batch row
        return pl.BlockSpec((None, *x.shape[1:]), lambda n, b, s: (b, 0, 0, 0))

    if num_warps is None:
        num_warps = 4 if tiles == (1, 1) else 8
    scores = pl.pallas_call(
        kernel,
        grid=(num_k_tiles, batch, splits),
        in_specs=[whole(q), whole(k)],
        out_specs=pl.BlockSpec((None, None, tiles[1], _OUT_WIDTH), lambda n, b, s: (b, s, n, 0)),
        out_shape=jax.ShapeDtypeStruct(
            (batch, splits, num_k_tiles * tiles[1], _OUT_WIDTH), jnp.float32
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lemo_block_scores",
    )(q, k)
    num_k_blocks = _cdiv(kv_len, block_size)
    scores = jnp.sum(scores[:, :, :num_k_blocks, 0], axis=1)  # the splits' partial sums
    return scores / (math.sqrt(head_dim) * num_heads)


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_size",
        "causal",
        "impl",
        "interpret",
        "tiles",
        "splits",
        "num_warps",
        "num_stages",
    ),
)
def block_scores(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    *,
    block_size: int = 64,
    causal: bool = True,
    impl: str = "xla",
    interpret: bool | None = None,
    tiles: tuple[int, int] = (1, 1),
    splits: int | None = 1,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:  # [B, ceil(S / block_size)] float32
    """LeMo key-block scores score[n] = sum_m max_tile(m, n) sum_h relu(s_h) / N (module doc).

    Any T and S (ragged last blocks are masked, not dropped); causal needs S == T. Inputs may be
    bf16; logits and scores are fp32. No gradient flows: the inputs are stop_gradient'ed.
    `impl`: "xla" (tiled jnp), "pallas" (fused kernel; block_size a power of two >= 16;
    `interpret=None` interprets it off the GPU; `tiles=(q, k)`: query and key blocks per
    kernel tile, powers of two; `splits`: programs sharing each key tile's query range,
    None = `query_splits`; `num_warps` (None: 4 for 1x1 tiles, else 8) and `num_stages`:
    Triton's) or "reference" (direct O(T * S)).
    """
    _check_shapes(q, k, block_size, causal)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl=}")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    if impl == "pallas":
        if block_size < MIN_TILE or block_size & (block_size - 1):
            raise ValueError(
                f"impl='pallas' needs a power-of-two block_size >= {MIN_TILE}; got {block_size}"
            )
        if len(tiles) != 2 or any(t < 1 or t & (t - 1) for t in tiles):
            raise ValueError(f"tiles must be two powers of two (query, key blocks); got {tiles}")
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        if splits is not None and splits < 1:
            raise ValueError(f"splits must be at least 1; got {splits}")
        if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
            raise ValueError(f"num_warps must be a power of two; got {num_warps}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be at least 1; got {num_stages}")
        return _block_scores_pallas(
            q,
            k,
            block_size,
            causal,
            interpret,
            tuple(tiles),
            splits,
            num_warps,
            num_stages,
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
