"""pallas_kernels.flash_attention vs its plain-jnp reference, forward and backward.

The small grid runs in Pallas interpret mode on CPU (compiled Triton on a GPU); the `gpu` grid
repeats it at real sizes. Each case picks B, T (ragged 200 included), (N, K), H, dtype and
causality by hand so every value of each dimension is covered without the full product.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from tolerances import TOLERANCES, relative_error

from pallas_kernels import AttentionBlockSizes, flash_attention, flash_attention_reference

# Small tiles keep interpret mode fast and make T = 64..200 span several tiles.
SMALL_BLOCKS = AttentionBlockSizes(
    block_q=32, block_k=32, block_q_dkv=16, block_k_dkv=16, block_q_dq=16, block_k_dq=16
)
F32, BF16 = jnp.float32, jnp.bfloat16


def _inputs(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """q, k, v in `dtype` and a cotangent for the output; small scale (0.5 * normal)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q_shape, kv_shape = (batch, q_len, num_heads, head_dim), (batch, kv_len, num_kv_heads, head_dim)
    q = 0.5 * jax.random.normal(keys[0], q_shape)
    k = 0.5 * jax.random.normal(keys[1], kv_shape)
    v = 0.5 * jax.random.normal(keys[2], kv_shape)
    cotangent = jax.random.normal(keys[3], q_shape)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), cotangent


@jax.jit(static_argnames=("attention", "causal"))
def _output_and_grads(q, k, v, cotangent, *, attention, causal):
    """attention(q, k, v) and the grads of sum(out * cotangent) w.r.t. q, k, v."""
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=causal), q, k, v)
    return out, vjp(cotangent.astype(out.dtype))


def _case_id(case) -> str:
    (batch, q_len, kv_len, num_heads, num_kv_heads, head_dim), dtype, causal = case
    mask = "causal" if causal else "full"
    sizes = f"B{batch}-T{q_len}-S{kv_len}-N{num_heads}-K{num_kv_heads}-H{head_dim}"
    return f"{sizes}-{jnp.dtype(dtype).name}-{mask}"


def _check_against_reference(shape, dtype, causal, block_sizes):
    q, k, v, cotangent = _inputs(*shape, dtype)
    flash = functools.partial(flash_attention, block_sizes=block_sizes)
    out, grads = _output_and_grads(q, k, v, cotangent, attention=flash, causal=causal)
    # The truth: the reference in fp32 on the very same (already rounded) input values.
    q32, k32, v32 = (x.astype(F32) for x in (q, k, v))
    expected_out, expected_grads = _output_and_grads(
        q32, k32, v32, cotangent, attention=flash_attention_reference, causal=causal
    )

    tolerance = TOLERANCES[jnp.dtype(dtype)]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, expected_out) < tolerance.attention
    for name, grad, expected, x in zip("qkv", grads, expected_grads, (q, k, v), strict=True):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        error = relative_error(grad, expected)
        assert error < tolerance.attention_gradient, f"d{name}: {error=}"


# (B, T, S, N, K, H), dtype, causal
SMALL_CASES = [
    ((1, 64, 64, 4, 4, 32), F32, True),
    ((2, 128, 128, 4, 2, 64), BF16, True),
    ((1, 200, 200, 6, 2, 32), F32, True),  # ragged T
    ((2, 200, 200, 4, 2, 64), BF16, True),
    ((2, 64, 64, 6, 2, 32), BF16, True),
    ((1, 128, 128, 6, 2, 64), F32, False),
    ((1, 200, 200, 4, 4, 32), BF16, False),
    ((1, 72, 200, 4, 2, 32), F32, False),  # S != T, both ragged
    ((1, 64, 64, 4, 2, 48), F32, True),  # head dim padded to 64 inside
]


@pytest.mark.parametrize(("shape", "dtype", "causal"), SMALL_CASES, ids=map(_case_id, SMALL_CASES))
def test_matches_reference(shape, dtype, causal):
    _check_against_reference(shape, dtype, causal, SMALL_BLOCKS)


def test_default_blocks_and_custom_scale():
    q, k, v, _ = _inputs(1, 100, 100, 4, 2, 32, F32)
    out = flash_attention(q, k, v, sm_scale=0.3)
    expected = flash_attention_reference(q, k, v, sm_scale=0.3)
    assert relative_error(out, expected) < TOLERANCES[jnp.dtype(F32)].attention


def test_padded_keys_are_never_attended():
    # Every real score is -sqrt(H) (k = -q), so attention is the mean of v. The zero-padded keys
    # (S = 40 -> 64) would score 0 and take nearly all the weight if they were attended.
    q = jnp.ones((1, 40, 2, 32))
    k, v = -q, jax.random.normal(jax.random.key(0), (1, 40, 2, 32))
    out = flash_attention(q, k, v, causal=False, block_sizes=SMALL_BLOCKS)
    expected = jnp.broadcast_to(v.mean(axis=1, keepdims=True), q.shape)
    assert relative_error(out, expected) < TOLERANCES[jnp.dtype(F32)].attention


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "v_shape", "causal", "message"),
    [
        ((2, 64, 4), (2, 64, 4, 32), None, True, "must be"),
        ((2, 64, 4, 32), (1, 64, 4, 32), None, True, "batch"),
        ((2, 64, 4, 32), (2, 64, 4, 16), None, True, "head dim"),
        ((2, 64, 6, 32), (2, 64, 4, 32), None, True, "multiple"),
        ((2, 64, 4, 32), (2, 128, 4, 32), None, True, "S == T"),
        ((2, 64, 4, 32), (2, 64, 4, 32), (2, 64, 2, 32), True, "same shape"),
    ],
)
def test_shape_validation(q_shape, kv_shape, v_shape, causal, message):
    q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    v = jnp.zeros(v_shape or kv_shape)
    for attention in (flash_attention, flash_attention_reference):
        with pytest.raises(ValueError, match=message) as error:
            attention(q, k, v, causal=causal)
        assert "q.shape=" in str(error.value)


def test_non_causal_allows_s_different_from_t():
    q, k, v, _ = _inputs(1, 32, 48, 2, 1, 32, F32)
    assert flash_attention(q, k, v, causal=False, block_sizes=SMALL_BLOCKS).shape == q.shape


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="block_k=48"):
        AttentionBlockSizes(block_k=48)


GPU_CASES = [
    ((1, 2048, 2048, 8, 8, 128), BF16, True),
    ((2, 4096, 4096, 8, 2, 128), BF16, True),
    ((1, 8192, 8192, 32, 8, 128), BF16, True),
    ((1, 3000, 3000, 6, 2, 128), F32, True),  # ragged T
    ((1, 4096, 4096, 4, 2, 128), F32, False),
    ((1, 5000, 5000, 4, 4, 128), BF16, False),  # ragged T
    ((1, 2000, 6000, 4, 2, 128), BF16, False),  # S != T
]


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "dtype", "causal"), GPU_CASES, ids=map(_case_id, GPU_CASES))
def test_matches_reference_gpu(shape, dtype, causal):
    _check_against_reference(shape, dtype, causal, block_sizes=None)
