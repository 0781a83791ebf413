"""In-place residual addition (LeMo paper section 4.4): h[b, token_ids[b, r]] += rows[b, r].

`scatter_add_rows(h, token_ids, rows)` adds the [B, R, D] outputs of a compacted sublayer into
the [B, T, D] residual stream at their (sorted, unique) rows; the other rows pass through.
The result has h's dtype.

`impl="pallas"`: the kernel's output aliases h (`input_output_aliases`): each Triton-style
program loads its token ids, reads those rows of h, adds its [rows, D] tile and writes them
back; rows no program touches are never read or written. When h is donated (a dead value, as
the residual stream usually is) nothing is copied; otherwise XLA copies h first. `impl="xla"`:
`h.at[...].add(..., unique_indices=True)`.

Backward (both impls): the residual's gradient passes through unchanged and the rows' gradient
is its gather at token_ids.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selective_load import rows_per_program

_IMPLS = ("xla", "pallas")


def _check(h, token_ids, rows, impl: str) -> None:
    if h.ndim != 3 or token_ids.ndim != 2 or rows.ndim != 3:
        raise ValueError(
            f"need h [B, T, D], token_ids [B, R], rows [B, R, D]; got {h.shape=} "
            f"{token_ids.shape=} {rows.shape=}"
        )
    if rows.shape != (*token_ids.shape, h.shape[2]) or token_ids.shape[0] != h.shape[0]:
        raise ValueError(
            f"rows must be [B, R, D] = {(*token_ids.shape, h.shape[2])}; got {rows.shape=}"
        )
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl=}")
    if impl == "pallas" and h.shape[2] & (h.shape[2] - 1):
        raise ValueError(f"impl='pallas' needs a power-of-two model dim D; got {h.shape[2]}")


def scatter_add_rows_reference(h, token_ids, rows):
    batch = jnp.arange(h.shape[0])[:, None]
    return h.at[batch, token_ids].add(rows.astype(h.dtype), unique_indices=True)


def _kernel(ids_ref, rows_ref, h_ref, out_ref):
    ids = ids_ref[...]  # [rows]
    out_ref[ids, :] = h_ref[ids, :] + rows_ref[...].astype(out_ref.dtype)


def _pallas_add(h, token_ids, rows, interpret: bool):
    batch, _, dim = h.shape
    num_rows = token_ids.shape[1]
    per_program = rows_per_program(num_rows, dim)
    whole = pl.BlockSpec((None, *h.shape[1:]), lambda b, r: (b, 0, 0))  # all of row b's h
    return pl.pallas_call(
        _kernel,
        grid=(batch, num_rows // per_program),
        in_specs=[
            pl.BlockSpec((None, per_program), lambda b, r: (b, r)),
            pl.BlockSpec((None, per_program, dim), lambda b, r: (b, r, 0)),
            whole,
        ],
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        input_output_aliases={2: 0},  # h is updated in place
        compiler_params=plgpu.CompilerParams(num_warps=4 if dim <= 2048 else 8, num_stages=1),
        interpret=interpret,
        name="lemo_scatter_add_rows",
    )(token_ids, rows, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scatter_add_rows(h, token_ids, rows, impl, interpret):
    if impl == "pallas":
        return _pallas_add(h, token_ids, rows, interpret)
    return scatter_add_rows_reference(h, token_ids, rows)


def _scatter_add_rows_fwd(h, token_ids, rows, impl, interpret):
    # The rows' dtype travels as an empty array of it (residuals must be arrays).
    dtype_tag = jnp.zeros((0,), rows.dtype)
    return _scatter_add_rows(h, token_ids, rows, impl, interpret), (token_ids, dtype_tag)


def _scatter_add_rows_bwd(impl, interpret, residuals, d_out):
    token_ids, dtype_tag = residuals
    d_rows = jnp.take_along_axis(d_out, token_ids[..., None], axis=1).astype(dtype_tag.dtype)
    return d_out, None, d_rows


_scatter_add_rows.defvjp(_scatter_add_rows_fwd, _scatter_add_rows_bwd)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def scatter_add_rows(
    h: jax.Array,  # [B, T, D]
    token_ids: jax.Array,  # [B, R] int32, sorted and unique per row
    rows: jax.Array,  # [B, R, D]
    *,
    impl: str = "xla",
    interpret: bool | None = None,
) -> jax.Array:  # [B, T, D], h.dtype
    """h with `rows` added at `token_ids` (module doc). `impl="pallas"` needs a power-of-two D;
    `interpret=None` interprets the kernel off the GPU."""
    _check(h, token_ids, rows, impl)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _scatter_add_rows(h, token_ids.astype(jnp.int32), rows, impl, interpret)
