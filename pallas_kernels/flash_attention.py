"""Flash attention (forward and fused-recompute backward) as Triton-lowered Pallas kernels.

Adapted from JAX's `jax.experimental.pallas.ops.gpu.attention.mha` (FlashAttention-2: online
softmax over key blocks in the forward; the backward recomputes probabilities from the saved
log-sum-exp), with three changes:

- grouped-query attention: K/V heads are repeated to the N query heads in the wrapper;
- any sequence length: sequences are zero-padded to a multiple of the block sizes and padded keys
  are masked inside the kernels (see `flash_attention`);
- one mask helper shared by all three kernels, and separate dK/dV and dQ kernels so queries and
  keys may be split into different numbers of blocks.

Layout BTNH: q [B, T, N, H], k and v [B, S, K, H], N a multiple of K (G = N // K).
On JAX 0.11 lowering emits "The Pallas Triton backend is deprecated" warnings; it still works.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import MIN_TILE, check_query_key_shapes, tile_matmul

# Finite rather than -inf: a block whose scores are all masked then gives exp2(0) = 1 terms that
# the next block's max rescales to zero, instead of exp2(-inf - -inf) = NaN. The 0.7 leaves
# headroom so subtracting a row max or log-sum-exp from it cannot overflow.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2_E = math.log2(math.e)  # the kernels use exp2: e^x = 2^(x * log2 e)
# Checkpoint names of the forward's residuals that the backward needs besides q, k, v.
RESIDUAL_NAMES = ("flash_attention_out", "flash_attention_lse")


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
    """Tile sizes (powers of two; >= 16 for compiled Triton) of the three kernels.

    `block_q`/`block_k`: forward query/key tiles; `*_dkv`: tiles of the dK/dV kernel (one program
    per key tile, looping over query tiles); `*_dq`: tiles of the dQ kernel (one program per query
    tile, looping over key tiles). The field defaults are those of JAX's `mha`;
    `flash_attention` uses `default(H, dtype)` unless given tile sizes.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 32
    block_k_dkv: int = 32
    block_q_dq: int = 32
    block_k_dq: int = 32

    @classmethod
    def default(cls, head_dim: int, dtype) -> "AttentionBlockSizes":
        """Forward tiles of 128 rows for rows of <= 256 bytes (bf16, H <= 128), narrower for wider
        rows: fp32 at H = 128 with 128-row tiles asks Triton for 256 KiB of shared memory, more
        than an H200 SM has (227 KiB). Backward tiles are half as tall: 64 rather than mha's 32
        halves bf16 fwd+bwd time on the H200 (8K tokens, H = 128: 11.1 -> 5.2 ms)."""
        row_bytes = pl.next_power_of_2(head_dim) * jnp.dtype(dtype).itemsize
        forward = max(MIN_TILE, min(128, 128 * 256 // row_bytes))
        backward = max(MIN_TILE, forward // 2)
        return cls(forward, forward, backward, backward, backward, backward)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            size = getattr(self, field.name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"{field.name}={size} must be a power of two")

    def fit(self, length: int) -> "AttentionBlockSizes":
        """Shrinks tiles larger than the (power-of-two rounded) sequence length."""
        cap = max(MIN_TILE, pl.next_power_of_2(length))
        sizes = {f.name: min(getattr(self, f.name), cap) for f in dataclasses.fields(self)}
        return AttentionBlockSizes(**sizes)

    @property
    def largest(self) -> int:
        return max(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static (hashable) kernel parameters, passed to the custom VJP as one nondiff argument."""

    sm_scale: float
    causal: bool
    real_kv_len: int | None  # real key count S when keys were padded, else None (no key mask)
    block_sizes: AttentionBlockSizes
    interpret: bool


def _masked_logits(q, k, q_start, k_start, config: _KernelConfig) -> jax.Array:
    """Scores q k^T in the base-2 domain, [block_q, block_k] fp32, masked entries MASK_VALUE."""
    logits = tile_matmul(q, k, transpose_b=True) * (config.sm_scale * _LOG2_E)
    k_positions = k_start + jnp.arange(k.shape[0])
    mask = None
    if config.real_kv_len is not None:  # padded keys are never attended
        mask = jnp.broadcast_to(k_positions[None, :] < config.real_kv_len, logits.shape)
    if config.causal:
        q_positions = q_start + jnp.arange(q.shape[0])
        causal_mask = q_positions[:, None] >= k_positions[None, :]
        mask = causal_mask if mask is None else mask & causal_mask
    return logits if mask is None else jnp.where(mask, logits, MASK_VALUE)


def _key_blocks_to_visit(q_end, block_k: int, padded_kv_len: int, config: _KernelConfig):
    """Key tiles a query tile ending (exclusive) at `q_end` must visit: those holding a real key
    and, when causal, a key not after its last query. Skipped tiles would be fully masked."""
    real_kv_len = padded_kv_len if config.real_kv_len is None else config.real_kv_len
    num_blocks = pl.cdiv(real_kv_len, block_k)
    if not config.causal:
        return num_blocks
    return jnp.minimum(lax.div(q_end + block_k - 1, block_k), num_blocks)


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *, config: _KernelConfig):
    block_q, block_k = q_ref.shape[0], config.block_sizes.block_k
    q_start = pl.program_id(0) * block_q
    q = q_ref[...]

    def body(k_index, carry):
        out, row_max, row_sum = carry  # out is unnormalised; divided by row_sum at the end
        k_slice = pl.ds(k_index * block_k, block_k)
        logits = _masked_logits(q, k_ref[k_slice, :], q_start, k_index * block_k, config)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        correction = jnp.exp2(row_max - new_max)  # rescales what earlier tiles accumulated
        probs = jnp.exp2(logits - new_max[:, None])
        row_sum = correction * row_sum + jnp.sum(probs, axis=1)
        v = v_ref[k_slice, :]
        out = correction[:, None] * out + tile_matmul(probs.astype(v.dtype), v)
        return out, new_max, row_sum

    num_blocks = _key_blocks_to_visit(q_start + block_q, block_k, k_ref.shape[0], config)
    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    out, row_max, row_sum = lax.fori_loop(0, num_blocks, body, init)
    out_ref[...] = (out / row_sum[:, None]).astype(out_ref.dtype)
    lse_ref[...] = row_max + jnp.log2(row_sum)  # base-2 log-sum-exp, saved for the backward


def _softmax_grads(q, k, v, d_out, lse, delta, q_start, k_start, config: _KernelConfig):
    """Probabilities P and score gradients dS = P * (dO V^T - delta) * sm_scale of one tile pair."""
    probs = jnp.exp2(_masked_logits(q, k, q_start, k_start, config) - lse[:, None])
    d_probs = tile_matmul(d_out, v, transpose_b=True)
    return probs, probs * (d_probs - delta[:, None]) * config.sm_scale


def _backward_dkv_kernel(
    q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, config: _KernelConfig
):
    block_k, block_q = k_ref.shape[0], config.block_sizes.block_q_dkv
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]

    def body(q_index, carry):
        dk, dv = carry
        q_slice = pl.ds(q_index * block_q, block_q)
        q, d_out = q_ref[q_slice, :], d_out_ref[q_slice, :]
        probs, d_logits = _softmax_grads(
            q, k, v, d_out, lse_ref[q_slice], delta_ref[q_slice], q_index * block_q, k_start, config
        )
        dv = dv + tile_matmul(probs.astype(d_out.dtype), d_out, transpose_a=True)
        dk = dk + tile_matmul(d_logits.astype(q.dtype), q, transpose_a=True)
        return dk, dv

    # Causal: query tiles entirely before this key tile never see it.
    first_block = lax.div(k_start, block_q) if config.causal else 0
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first_block, q_ref.shape[0] // block_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dq_kernel(
    q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, *, config: _KernelConfig
):
    block_q, block_k = q_ref.shape[0], config.block_sizes.block_k_dq
    q_start = pl.program_id(0) * block_q
    q, d_out, lse, delta = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...]

    def body(k_index, dq):
        k_slice = pl.ds(k_index * block_k, block_k)
        k = k_ref[k_slice, :]
        _, d_logits = _softmax_grads(
            q, k, v_ref[k_slice, :], d_out, lse, delta, q_start, k_index * block_k, config
        )
        return dq + tile_matmul(d_logits.astype(k.dtype), k)

    num_blocks = _key_blocks_to_visit(q_start + block_q, block_k, k_ref.shape[0], config)
    dq = lax.fori_loop(0, num_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# BlockSpecs for a grid (sequence tile i, batch b, head n).
def _tile(block: int, head_dim: int) -> pl.BlockSpec:  # one [block, H] tile of [B, T, N, H]
    return pl.BlockSpec((None, block, None, head_dim), lambda i, b, n: (b, i, n, 0))


def _whole(length: int, head_dim: int) -> pl.BlockSpec:  # all [length, H] rows of one (b, n)
    return pl.BlockSpec((None, length, None, head_dim), lambda i, b, n: (b, 0, n, 0))


def _row_stat(block: int) -> pl.BlockSpec:  # [block] of a per-row statistic [B, N, T]
    return pl.BlockSpec((None, None, block), lambda i, b, n: (b, n, i))


def _whole_row_stat(length: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, length), lambda i, b, n: (b, n, 0))


def _compiler_params(num_warps: int) -> plgpu.CompilerParams:
    # Name Triton's params: since JAX 0.9 the default GPU lowering is Mosaic GPU.
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _backward_warps(block_q: int, block_k: int) -> int:
    return 8 if block_q * block_k >= 128 * 128 else 4  # as JAX's mha


def _forward(q, k, v, config: _KernelConfig) -> tuple[jax.Array, jax.Array]:
    batch, q_len, num_heads, head_dim = q.shape
    blocks = config.block_sizes
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(q_len // blocks.block_q, batch, num_heads),
        in_specs=[_tile(blocks.block_q, head_dim)] + [_whole(k.shape[1], head_dim)] * 2,
        out_specs=[_tile(blocks.block_q, head_dim), _row_stat(blocks.block_q)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),  # lse [B, N, T]
        ],
        compiler_params=_compiler_params(num_warps=8 if head_dim > 64 else 4),  # as JAX's mha
        interpret=config.interpret,
        name="flash_attention_forward",
    )(q, k, v)


def _backward(q, k, v, out, lse, d_out, config: _KernelConfig):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, blocks = k.shape[1], config.block_sizes
    # delta_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij, the softmax backward's row term [B, N, T].
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    args = (q, k, v, d_out, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_backward_dkv_kernel, config=config),
        grid=(kv_len // blocks.block_k_dkv, batch, num_heads),
        in_specs=[_whole(q_len, head_dim)]
        + [_tile(blocks.block_k_dkv, head_dim)] * 2
        + [_whole(q_len, head_dim)]
        + [_whole_row_stat(q_len)] * 2,
        out_specs=[_tile(blocks.block_k_dkv, head_dim)] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(_backward_warps(blocks.block_q_dkv, blocks.block_k_dkv)),
        interpret=config.interpret,
        name="flash_attention_backward_dkv",
    )(*args)
    dq = pl.pallas_call(
        functools.partial(_backward_dq_kernel, config=config),
        grid=(q_len // blocks.block_q_dq, batch, num_heads),
        in_specs=[_tile(blocks.block_q_dq, head_dim)]
        + [_whole(kv_len, head_dim)] * 2
        + [_tile(blocks.block_q_dq, head_dim)]
        + [_row_stat(blocks.block_q_dq)] * 2,
        out_specs=_tile(blocks.block_q_dq, head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(_backward_warps(blocks.block_q_dq, blocks.block_k_dq)),
        interpret=config.interpret,
        name="flash_attention_backward_dq",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _padded_attention(q, k, v, config: _KernelConfig) -> jax.Array:
    return _forward(q, k, v, config)[0]


def _padded_attention_fwd(q, k, v, config: _KernelConfig):
    out, lse = _forward(q, k, v, config)
    # Named so that a remat policy can keep them (RESIDUAL_NAMES): with both saved, the backward
    # pass recomputes only q, k, v, never the attention forward.
    out = checkpoint_name(out, RESIDUAL_NAMES[0])
    lse = checkpoint_name(lse, RESIDUAL_NAMES[1])
    return out, (q, k, v, out, lse)


def _padded_attention_bwd(config: _KernelConfig, residuals, d_out):
    return _backward(*residuals, d_out, config)


_padded_attention.defvjp(_padded_attention_fwd, _padded_attention_bwd)


def _check_shapes(q, k, v, causal: bool) -> None:
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape; got {q.shape=} {k.shape=} {v.shape=}")
    check_query_key_shapes(q, k, causal=causal, op="attention")


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    block_sizes: AttentionBlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [B, T, N, H], q.dtype
    """Multi-head (GQA) attention softmax(sm_scale q k^T) v, differentiable.

    Any T and S: both are zero-padded at the end to a multiple of the largest block size (block
    sizes must be powers of two for Triton, so choosing tiles that divide T would fail for e.g.
    T = 200). Padded keys are masked in every kernel; padded query rows are computed, attend only
    real keys (so they stay finite), get a zero gradient and are sliced off. Head dims that are
    not a power of two >= 16 are zero-padded too (zeros change neither scores nor outputs).

    `sm_scale` defaults to 1/sqrt(H). `interpret=None` runs the Pallas interpreter unless JAX's
    default backend is a GPU, so the same code runs (slowly) on CPU. bf16 is the fast path; fp32
    inputs use exact fp32 (not TF32) dots and narrower tiles. Checked on an H200 at H = 32..128.
    """
    _check_shapes(q, k, v, causal)
    _, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if block_sizes is None:
        block_sizes = AttentionBlockSizes.default(head_dim, q.dtype)
    blocks = block_sizes.fit(max(q_len, kv_len))

    # GQA by repetition: query head n reads kv head n // G. This materialises [B, S, N, H] K and V
    # (and their gradients); a GQA-native kernel (index_map n // G, group-summed dK/dV) comes later.
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)  # [B, S, N, H]
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=2)

    padded_head_dim = max(MIN_TILE, pl.next_power_of_2(head_dim))

    def pad(x):  # [B, L, N, H] -> [B, L_padded, N, H_padded], zeros at the ends
        padded_len = pl.cdiv(x.shape[1], blocks.largest) * blocks.largest
        return jnp.pad(
            x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, padded_head_dim - head_dim))
        )

    q, k, v = pad(q), pad(k), pad(v)
    config = _KernelConfig(
        sm_scale=float(sm_scale),
        causal=causal,
        real_kv_len=kv_len if k.shape[1] > kv_len else None,
        block_sizes=blocks,
        interpret=interpret,
    )
    out = _padded_attention(q, k, v, config)
    return out[:, :q_len, :, :head_dim]  # drop padded query rows and head-dim columns


def flash_attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    causal: bool = True,
    sm_scale: float | None = None,
) -> jax.Array:  # [B, T, N, H], q.dtype
    """Plain-jnp attention with fp32 scores and softmax, GQA by grouping (no repeat)."""
    _check_shapes(q, k, v, causal)
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B,T,K,G,H]
    logits = sm_scale * jnp.einsum(
        "btkgh,bskh->bkgts", q, k, precision="highest", preferred_element_type=jnp.float32
    )
    if causal:
        # MASK_VALUE, as in the kernels: exp(MASK_VALUE - row max) underflows to exactly 0, so any
        # row with an unmasked key gets the same result as with -inf, while a fully masked row
        # (impossible here, possible once callers add masks) stays finite instead of NaN.
        mask = jnp.tril(jnp.ones((q_len, k.shape[1]), dtype=bool))
        logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)  # fp32
    out = jnp.einsum(
        "bkgts,bskh->btkgh", weights, v.astype(jnp.float32), precision="highest"
    )  # [B, T, K, G, H]
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
