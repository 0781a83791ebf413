"""Selective load (LeMo paper section 4.4): the kept rows of the residual stream, normalised.

`gather_rmsnorm(h, token_ids, scale, eps=...)` returns RMSNorm(h[b, token_ids[b, r]]) as
[B, R, D] for h [B, T, D] and sorted, unique token_ids [B, R], computed exactly as lemo-jax's
RMSNorm does: mean of squares and normalisation in fp32, the result cast to `out_dtype`, then
multiplied by the scale cast to `out_dtype`.

`impl="pallas"`: one Triton-style program per (batch row, group of rows) loads its token ids,
loads those rows of h straight from memory by index (no gathered copy of the rows is written
first), normalises them and writes [rows, D]. Under differentiation the forward also writes the
raw rows, which the backward needs (the residual stream itself is never kept). `impl="xla"`:
`take_along_axis` then the norm, what XLA fuses on its own.

Backward (both impls): the norm's row gradients, scatter-added into a zero [B, T, D] (the
gather's transpose), and the scale's gradient summed over the rows.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_IMPLS = ("xla", "pallas")
_TILE_ELEMENTS = 16384  # rows x D per program: 64 KiB of fp32 registers at most


def _check(h, token_ids, scale, impl: str) -> None:
    if h.ndim != 3 or token_ids.ndim != 2 or token_ids.shape[0] != h.shape[0]:
        raise ValueError(
            f"need h [B, T, D] and token_ids [B, R]; got {h.shape=} {token_ids.shape=}"
        )
    if scale.shape != (h.shape[2],):
        raise ValueError(f"scale must be [D] = [{h.shape[2]}]; got {scale.shape=}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl=}")
    if impl == "pallas" and h.shape[2] & (h.shape[2] - 1):
        raise ValueError(f"impl='pallas' needs a power-of-two model dim D; got {h.shape[2]}")


def rows_per_program(num_rows: int, dim: int) -> int:
    """The largest power of two dividing `num_rows` with rows x dim <= 16K elements (>= 1)."""
    rows = 1
    while rows * 2 * dim <= _TILE_ELEMENTS and num_rows % (rows * 2) == 0:
        rows *= 2
    return rows


def _normalise(x, scale, eps: float, out_dtype):
    """lemo-jax's RMSNorm on rows x [..., D]: fp32 statistics, cast, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(out_dtype) * scale.astype(out_dtype)


def gather_rmsnorm_reference(h, token_ids, scale, *, eps: float, out_dtype=None):
    """take_along_axis, then RMSNorm: the definition."""
    rows = jnp.take_along_axis(h, token_ids[..., None], axis=1)
    return _normalise(rows, scale, eps, out_dtype or h.dtype)


def _kernel(ids_ref, h_ref, scale_ref, out_ref, *rows_ref, eps: float):
    ids = ids_ref[...]  # [rows]
    rows = h_ref[ids, :]  # [rows, D], loaded by index
    out_ref[...] = _normalise(rows, scale_ref[...], eps, out_ref.dtype)
    if rows_ref:
        rows_ref[0][...] = rows


def _pallas_forward(h, token_ids, scale, eps, out_dtype, interpret, with_rows: bool):
    batch, _, dim = h.shape
    num_rows = token_ids.shape[1]
    rows = rows_per_program(num_rows, dim)
    tile = pl.BlockSpec((None, rows, dim), lambda b, r: (b, r, 0))
    out_shape = [jax.ShapeDtypeStruct((batch, num_rows, dim), out_dtype)]
    if with_rows:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_rows, dim), h.dtype))
    outputs = pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(batch, num_rows // rows),
        in_specs=[
            pl.BlockSpec((None, rows), lambda b, r: (b, r)),
            pl.BlockSpec((None, *h.shape[1:]), lambda b, r: (b, 0, 0)),  # all of row b's h
            pl.BlockSpec((dim,), lambda b, r: (0,)),
        ],
        out_specs=[tile] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4 if dim <= 2048 else 8, num_stages=1),
        interpret=interpret,
        name="lemo_gather_rmsnorm",
    )(token_ids, h, scale)
    return outputs if with_rows else outputs[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gather_rmsnorm(h, token_ids, scale, eps, out_dtype, impl, interpret):
    if impl == "pallas":
        return _pallas_forward(h, token_ids, scale, eps, out_dtype, interpret, with_rows=False)
    return gather_rmsnorm_reference(h, token_ids, scale, eps=eps, out_dtype=out_dtype)


def _gather_rmsnorm_fwd(h, token_ids, scale, eps, out_dtype, impl, interpret):
    if impl == "pallas":
        out, rows = _pallas_forward(h, token_ids, scale, eps, out_dtype, interpret, True)
    else:
        rows = jnp.take_along_axis(h, token_ids[..., None], axis=1)
        out = _normalise(rows, scale, eps, out_dtype)
    return out, (rows, token_ids, scale, h.shape)


def _gather_rmsnorm_bwd(eps, out_dtype, impl, interpret, residuals, d_out):
    rows, token_ids, scale, h_shape = residuals
    _, pullback = jax.vjp(lambda x, s: _normalise(x, s, eps, out_dtype), rows, scale)
    d_rows, d_scale = pullback(d_out)
    batch = jnp.arange(h_shape[0])[:, None]
    d_h = jnp.zeros(h_shape, d_rows.dtype).at[batch, token_ids].add(d_rows, unique_indices=True)
    return d_h, None, d_scale


_gather_rmsnorm.defvjp(_gather_rmsnorm_fwd, _gather_rmsnorm_bwd)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "impl", "interpret"))
def gather_rmsnorm(
    h: jax.Array,  # [B, T, D]
    token_ids: jax.Array,  # [B, R] int32, sorted and unique per row
    scale: jax.Array,  # [D]
    *,
    eps: float,
    out_dtype=None,
    impl: str = "xla",
    interpret: bool | None = None,
) -> jax.Array:  # [B, R, D] in out_dtype (default h.dtype)
    """RMSNorm of the `token_ids` rows of h (module doc). `impl="pallas"` needs a power-of-two
    D; `interpret=None` interprets the kernel off the GPU."""
    _check(h, token_ids, scale, impl)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    out_dtype = jnp.dtype(out_dtype or h.dtype)
    return _gather_rmsnorm(h, token_ids.astype(jnp.int32), scale, eps, out_dtype, impl, interpret)
