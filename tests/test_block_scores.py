"""pallas_kernels.block_scores (LeMo paper eq. 2) vs its reference, by hand, and by brute force.

The tiled XLA path and the Pallas kernel (interpret mode on CPU, compiled Triton on a GPU) are
compared with the direct O(T * S) reference over a hand-picked grid (each value of B, T (ragged
200 included), (N, K), H, block size, dtype and causality appears at least once); the `gpu` grid
repeats this at Llama-2-7B sizes on the GPU; a hand-computed case pins exact values; a
Python-loop brute force guards against a bug shared by both implementations; `memory_analysis()`
checks the tiled path never holds the full [B, N, T, S] logits.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import TOLERANCES, relative_error

from pallas_kernels import block_scores, block_scores_reference
from pallas_kernels.block_scores import query_splits

F32, BF16 = jnp.float32, jnp.bfloat16


# Jitted once per shape: eager op-by-op dispatch compiles every primitive and is several times
# slower on a small CPU.
_reference = jax.jit(block_scores_reference, static_argnames=("block_size", "causal"))


def _inputs(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """q [B, T, N, H] and k [B, S, K, H] in `dtype`, small scale (0.5 * normal), drawn in NumPy
    (no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    q = 0.5 * rng.standard_normal((batch, q_len, num_heads, head_dim), np.float32)
    k = 0.5 * rng.standard_normal((batch, kv_len, num_kv_heads, head_dim), np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype)


# (B, T, S, N, K, H), block_size, dtype, causal
CASES = [
    ((1, 64, 64, 4, 4, 32), 16, F32, True),
    ((2, 128, 128, 4, 2, 64), 64, BF16, True),
    ((1, 200, 200, 6, 2, 32), 16, F32, True),  # ragged T = 12 * 16 + 8
    ((2, 200, 200, 8, 1, 64), 64, BF16, True),  # ragged T = 3 * 64 + 8
    ((1, 256, 256, 8, 1, 32), 64, F32, True),
    ((2, 64, 64, 6, 2, 64), 64, F32, False),
    ((1, 128, 200, 4, 2, 32), 64, BF16, False),  # S != T, ragged S
    ((1, 200, 72, 4, 4, 64), 16, F32, False),  # S != T, both ragged
    ((2, 256, 128, 6, 2, 32), 16, BF16, False),
    ((1, 64, 256, 8, 1, 64), 16, F32, False),
    ((1, 1024, 1024, 3, 3, 128), 64, BF16, True),
    ((2, 1000, 1000, 8, 4, 128), 64, F32, True),  # ragged T = 15 * 64 + 40
]


def _case_id(case) -> str:
    (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim), block_size, dtype, causal = case
    mask = "causal" if causal else "full"
    sizes = f"B{batch}-T{q_len}-S{kv_len}-N{num_heads}-K{num_kv_heads}-H{head_dim}"
    return f"{sizes}-b{block_size}-{jnp.dtype(dtype).name}-{mask}"


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, impl):
    shape, block_size, dtype, causal = case
    q, k = _inputs(*shape, dtype)
    scores = block_scores(q, k, block_size=block_size, causal=causal, impl=impl)
    # The truth: the reference on the very same (already rounded) values in fp32. Both compute in
    # fp32 with exact products, so the fp32 tolerance applies to bf16 inputs too.
    expected = _reference(q.astype(F32), k.astype(F32), block_size=block_size, causal=causal)
    assert scores.shape == (shape[0], math.ceil(shape[2] / block_size))
    assert scores.dtype == F32
    assert relative_error(scores, expected) < TOLERANCES[jnp.dtype(F32)].forward


@pytest.mark.parametrize("tiles", [(2, 2), (1, 4), (4, 1)])
@pytest.mark.parametrize("case", [CASES[i] for i in (2, 3, 6, 11)], ids=_case_id)
def test_kernel_tiles_of_several_blocks(case, tiles):
    """Query and key tiles of several blocks give the same scores as one block per tile,
    including ragged ends and key blocks that share a tile with later query blocks."""
    shape, block_size, dtype, causal = case
    q, k = _inputs(*shape, dtype)
    scores = block_scores(q, k, block_size=block_size, causal=causal, impl="pallas", tiles=tiles)
    expected = _reference(q.astype(F32), k.astype(F32), block_size=block_size, causal=causal)
    assert relative_error(scores, expected) < TOLERANCES[jnp.dtype(F32)].forward


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("case", [CASES[i] for i in (2, 6, 11)], ids=_case_id)
def test_query_range_split_over_programs(case, splits):
    """Each key tile's query tiles shared by several programs (partial sums added after the
    kernel) give the same scores, also when a split has no query tile left (causal tails)."""
    shape, block_size, dtype, causal = case
    q, k = _inputs(*shape, dtype)
    scores = block_scores(
        q, k, block_size=block_size, causal=causal, impl="pallas", tiles=(2, 1), splits=splits
    )
    expected = _reference(q.astype(F32), k.astype(F32), block_size=block_size, causal=causal)
    assert relative_error(scores, expected) < TOLERANCES[jnp.dtype(F32)].forward


def test_short_sequences_get_more_programs_per_key_tile():
    assert query_splits(num_k_tiles=128, batch=1) == 4  # 16K tokens, 4x2 tiles of 64
    assert query_splits(num_k_tiles=256, batch=1) == 4  # 32K
    assert query_splits(num_k_tiles=512, batch=1) == 2  # 64K
    assert query_splits(num_k_tiles=1024, batch=1) == 1
    assert query_splits(num_k_tiles=2, batch=1) == 4  # never more than 4


# q = [1, 2, -1, -0.5], k = [1, 0.5, 2, -5], H = 1 (scale 1), N = 1: s(i, j) = q_i * k_j, exact.
# Tiles (query block m, key block n) of b = 2, causal:
#   (0, 0): s(0,0)=1, s(1,0)=2, s(1,1)=1                  -> 2   (s(0,1)=0.5 is j > i)
#   (1, 0): s(2,0)=-1, s(2,1)=-.5, s(3,0)=-.5, s(3,1)=-.25 -> 0   (negative-only tile)
#   (0, 1): no pair with i >= j                            -> 0   (non-causal: s(1,2)=4)
#   (1, 1): s(2,2)=-2, s(3,2)=-1, s(3,3)=2.5               -> 2.5 (non-causal: s(2,3)=5)
HAND_Q = [1.0, 2.0, -1.0, -0.5]
HAND_K = [1.0, 0.5, 2.0, -5.0]


@pytest.mark.parametrize(
    ("length", "causal", "expected"),
    [
        (4, True, [2.0 + 0.0, 0.0 + 2.5]),
        (4, False, [2.0 + 0.0, 4.0 + 5.0]),
        (3, True, [2.0 + 0.0, 0.0]),  # ragged: last blocks hold token 2 only; s(2,2) = -2 -> 0
    ],
)
def test_hand_computed(length, causal, expected):
    q = jnp.asarray(HAND_Q[:length], F32).reshape(1, length, 1, 1)
    k = jnp.asarray(HAND_K[:length], F32).reshape(1, length, 1, 1)
    for scores in (
        block_scores(q, k, block_size=2, causal=causal),
        _reference(q, k, block_size=2, causal=causal),
    ):
        np.testing.assert_array_equal(np.asarray(scores), np.asarray([expected], np.float32))
    # The kernel's tiles are >= 16 tokens: the same values, each token repeated 16 times (every
    # 2-token block becomes a 32-token block whose pairs are those of the small one).
    big_q, big_k = jnp.repeat(q, 16, axis=1), jnp.repeat(k, 16, axis=1)
    scores = block_scores(big_q, big_k, block_size=32, causal=causal, impl="pallas")
    np.testing.assert_array_equal(np.asarray(scores), np.asarray([expected], np.float32))


def _brute_force(q, k, block_size: int, causal: bool) -> np.ndarray:
    """The definition, loop by loop in float64, sharing no code with the implementations."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, group = k.shape[1], num_heads // k.shape[2]
    num_q_blocks, num_k_blocks = -(-q_len // block_size), -(-kv_len // block_size)
    tiles = np.zeros((batch, num_q_blocks, num_k_blocks))
    for b, i, j in itertools.product(range(batch), range(q_len), range(kv_len)):
        if causal and j > i:
            continue
        head_sum = 0.0
        for h in range(num_heads):
            logit = sum(q[b, i, h, d] * k[b, j, h // group, d] for d in range(head_dim))
            head_sum += max(logit / math.sqrt(head_dim), 0.0)
        m, n = i // block_size, j // block_size
        tiles[b, m, n] = max(tiles[b, m, n], head_sum / num_heads)
    return tiles.sum(axis=1)


@pytest.mark.parametrize(
    ("shape", "causal"),
    [((2, 7, 7, 4, 2, 3), True), ((1, 7, 8, 6, 2, 2), False), ((1, 5, 5, 3, 1, 2), True)],
)
def test_brute_force(shape, causal):
    q, k = _inputs(*shape, F32, seed=1)
    expected = _brute_force(q, k, block_size=3, causal=causal)
    for scores in (
        block_scores(q, k, block_size=3, causal=causal),
        _reference(q, k, block_size=3, causal=causal),
    ):
        assert relative_error(scores, expected) < TOLERANCES[jnp.dtype(F32)].forward


def test_memory_is_tiled():
    """At T = S = 4096, N = 8, K = 2, H = 64, b = 64 the [B, N, T, S] fp32 logits are 512 MiB.
    The tiled path must stay far below that. The reference is O(T * S): XLA:CPU fuses its logits
    into the head sum, so it holds (at least) [B, T, S] fp32 rather than all [B, N, T, S]."""
    batch, length, num_heads, num_kv_heads, head_dim = 1, 4096, 8, 2, 64
    q = jax.ShapeDtypeStruct((batch, length, num_heads, head_dim), F32)
    k = jax.ShapeDtypeStruct((batch, length, num_kv_heads, head_dim), F32)
    logits_bytes = batch * num_heads * length * length * 4  # [B, N, T, S] fp32
    head_sum_bytes = batch * length * length * 4  # [B, T, S] fp32

    def temp_bytes(fn) -> int:
        return jax.jit(fn).lower(q, k).compile().memory_analysis().temp_size_in_bytes

    tiled, reference = temp_bytes(block_scores), temp_bytes(block_scores_reference)
    assert tiled < logits_bytes / 8, f"{tiled=} {logits_bytes=}"
    assert tiled < head_sum_bytes / 8, f"{tiled=} {head_sum_bytes=}"  # not O(T * S) at all
    assert reference >= head_sum_bytes, f"{reference=} {head_sum_bytes=}"


def test_impl_switch_and_no_gradient():
    q, k = _inputs(1, 40, 40, 4, 2, 8, F32)
    expected = _reference(q, k, block_size=16)
    # Exact: impl="reference" runs the very same jitted computation.
    np.testing.assert_array_equal(block_scores(q, k, block_size=16, impl="reference"), expected)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        block_scores(q, k, block_size=24, impl="pallas")
    with pytest.raises(ValueError, match="tiles must be two powers of two"):
        block_scores(q, k, block_size=16, impl="pallas", tiles=(3, 1))
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        block_scores(q, k, block_size=16, impl="pallas", num_warps=6)
    with pytest.raises(ValueError, match="num_stages must be at least 1"):
        block_scores(q, k, block_size=16, impl="pallas", num_stages=0)
    with pytest.raises(ValueError, match="impl"):
        block_scores(q, k, impl="cuda")
    for impl in ("xla", "pallas"):
        grad_q, grad_k = jax.grad(
            lambda q, k, impl=impl: block_scores(q, k, block_size=16, impl=impl).sum(),
            argnums=(0, 1),
        )(q, k)
        assert not np.any(grad_q) and not np.any(grad_k)


# Llama-2-7B (N = K = 32, H = 128) and Llama-3-8B (N = 32, K = 8) heads at real lengths.
GPU_CASES = [
    ((1, 8192, 8192, 32, 32, 128), 64, BF16, True),
    ((1, 16384, 16384, 32, 8, 128), 64, BF16, True),
    ((2, 4000, 4000, 32, 8, 128), 64, BF16, True),  # ragged
    ((1, 4096, 4096, 8, 8, 64), 32, F32, True),
    ((1, 4096, 2048, 16, 4, 128), 64, BF16, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_kernel_matches_tiled_path_gpu(case):
    """The kernel against the tiled XLA path (the O(T * S) reference would not fit in memory),
    both fp32-accumulated from the same bf16 values; the orders of summation differ."""
    shape, block_size, dtype, causal = case
    q, k = _inputs(*shape, dtype)
    tiled = block_scores(q.astype(F32), k.astype(F32), block_size=block_size, causal=causal)
    for tiles in ((1, 1), (2, 2)):
        kernel = block_scores(
            q, k, block_size=block_size, causal=causal, impl="pallas", tiles=tiles
        )
        assert relative_error(kernel, tiled) < TOLERANCES[jnp.dtype(F32)].forward


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "kwargs", "match"),
    [
        ((1, 8, 2, 4), (1, 8, 2), {}, "k.shape"),  # rank
        ((8, 2, 4), (1, 8, 2, 4), {}, "q.shape"),  # rank
        ((2, 8, 2, 4), (1, 8, 2, 4), {}, "batch"),
        ((1, 8, 2, 4), (1, 8, 2, 8), {}, "head dim"),
        ((1, 8, 3, 4), (1, 8, 2, 4), {}, "multiple of kv heads"),
        ((1, 8, 2, 4), (1, 16, 2, 4), {}, "S == T"),
        ((1, 8, 2, 4), (1, 8, 2, 4), {"block_size": 0}, "block_size"),
    ],
)
def test_shape_errors(q_shape, k_shape, kwargs, match):
    q, k = jnp.zeros(q_shape, F32), jnp.zeros(k_shape, F32)
    for fn in (block_scores, block_scores_reference):
        with pytest.raises(ValueError, match=match):
            fn(q, k, **kwargs)
