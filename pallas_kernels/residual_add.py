"""In-place residual addition (LeMo paper section 4.4): h[b, token_ids[b, r]] += rows[b, r].

`scatter_add_rows(h, token_ids, rows)` adds the [B, R, D] outputs of a compacted sublayer into
the [B, T, D] residual stream at their (sorted, unique) rows; the other rows pass through.
The result has h's dtype.

`impl="pallas"`: the kernel's output aliases h (`input_output_aliases`): each Triton-style
program loads its token ids, reads those rows of h, adds its [rows, D] tile and writes them
back; rows no program touches are never read or written. When h is donated (a dead value, as
the residual stream usually is) nothing is copied; otherwise XLA copies h first. `impl="xla"`:
`h.at[...].add(..., unique_indices=True)`. The rows are spread over programs as in the selective
load (`selective_load.row_tiling`: rows per step, steps per program in a pipelined loop, Triton
warps and stages); every choice gives the same result.

Backward (both impls): the residual's gradient passes through unchanged and the rows' gradient
is its gather at token_ids.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selective_load import RowTiling, row_steps, row_tiling

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


def _kernel(ids_ref, rows_ref, h_ref, out_ref, *, tiling: RowTiling):
    def step(span):
        ids = ids_ref[span]  # [rows]
        # Unique ids: no step reads a row another step writes, so loads may run ahead of stores.
        out_ref[ids, :] = h_ref[ids, :] + rows_ref[span, :].astype(out_ref.dtype)

    row_steps(tiling, step)


def _pallas_add(h, token_ids, rows, interpret: bool, tiling: RowTiling):
    batch, _, dim = h.shape
    num_rows = token_ids.shape[1]
    per_program = tiling.rows_per_step * tiling.steps_per_program
    whole = pl.BlockSpec((None, *h.shape[1:]), lambda b, r: (b, 0, 0))  # all of row b's h
    return pl.pallas_call(
        functools.partial(_kernel, tiling=tiling),
        grid=(batch, num_rows // per_program),
        in_specs=[
            pl.BlockSpec((None, per_program), lambda b, r: (b, r)),
            pl.BlockSpec((None, per_program, dim), lambda b, r: (b, r, 0)),
            whole,
        ],
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        input_output_aliases={2: 0},  # h is updated in place
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages
        ),
        interpret=interpret,
        name="lemo_scatter_add_rows",
    )(token_ids, rows, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scatter_add_rows(h, token_ids, rows, impl, interpret, tiling):
    if impl == "pallas":
        return _pallas_add(h, token_ids, rows, interpret, tiling)
    return scatter_add_rows_reference(h, token_ids, rows)


def _scatter_add_rows_fwd(h, token_ids, rows, impl, interpret, tiling):
    # The rows' dtype travels as an empty array of it (residuals must be arrays).
    dtype_tag = jnp.zeros((0,), rows.dtype)
    out = _scatter_add_rows(h, token_ids, rows, impl, interpret, tiling)
    return out, (token_ids, dtype_tag)


def _scatter_add_rows_bwd(impl, interpret, tiling, residuals, d_out):
    token_ids, dtype_tag = residuals
    d_rows = jnp.take_along_axis(d_out, token_ids[..., None], axis=1).astype(dtype_tag.dtype)
    return d_out, None, d_rows


_scatter_add_rows.defvjp(_scatter_add_rows_fwd, _scatter_add_rows_bwd)


@functools.partial(
    jax.jit,
    static_argnames=(
        "impl",
        "interpret",
        "rows_per_step",
        "steps_per_program",
        "num_warps",
        "num_stages",
    ),
)
def scatter_add_rows(
    h: jax.Array,  # [B, T, D]
    token_ids: jax.Array,  # [B, R] int32, sorted and unique per row
    rows: jax.Array,  # [B, R, D]
    *,
    impl: str = "xla",
    interpret: bool | None = None,
    rows_per_step: int | None = None,
    steps_per_program: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:  # [B, T, D], h.dtype
    """h with `rows` added at `token_ids` (module doc). `impl="pallas"` needs a power-of-two D;
    `interpret=None` interprets the kernel off the GPU. The last four arguments tune the
    Pallas kernel only (`selective_load.row_tiling`; the defaults are the original kernel)."""
    _check(h, token_ids, rows, impl)
    tiling = None
    if impl == "pallas":
        tiling = row_tiling(
            token_ids.shape[1],
            h.shape[2],
            rows_per_step=rows_per_step,
            steps_per_program=steps_per_program,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _scatter_add_rows(h, token_ids.astype(jnp.int32), rows, impl, interpret, tiling)
