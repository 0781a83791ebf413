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

How the rows are spread over programs (`row_tiling`, shared with the residual add): by default
each program does one step of up to 16K elements (4 rows at D = 4,096), so a 64K-token layer
launches thousands of programs that each issue one wave of loads with nothing to overlap it.
`steps_per_program > 1` gives each program that many steps of `rows_per_step` rows in an
in-kernel loop, which Triton can software-pipeline (`num_stages` >= 2: the next step's ids and
rows are loaded while this step's are normalised and stored); `num_warps` and `num_stages` are
the Triton compiler's. Every choice computes the same values, row by row.

Backward (both impls): the norm's row gradients, scatter-added into a zero [B, T, D] (the
gather's transpose), and the scale's gradient summed over the rows.
"""

import functools
from typing import NamedTuple

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


class RowTiling(NamedTuple):
    """How a row kernel spreads R rows over programs: each program runs `steps_per_program`
    steps of `rows_per_step` rows (a loop when more than one), with these Triton settings."""

    rows_per_step: int
    steps_per_program: int
    num_warps: int
    num_stages: int


def _is_power_of_two(value) -> bool:
    return isinstance(value, int) and value >= 1 and not value & (value - 1)


def row_tiling(
    num_rows: int,
    dim: int,
    *,
    rows_per_step: int | None = None,
    steps_per_program: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> RowTiling:
    """The row kernels' tiling for R = `num_rows` rows of `dim`, defaults filled in and checked
    (`ValueError`). Defaults: `rows_per_program` rows per step, one step per program (the
    original kernels), 4 warps up to D = 2,048 and 8 above, 1 stage for a single step (nothing
    to pipeline) and 2 for a loop (the next step's loads in flight during this one's work).
    Triton tiles are powers of two, so both row counts must be, and their product must divide
    R (no ragged last program)."""
    if rows_per_step is None:
        rows_per_step = rows_per_program(num_rows, dim)
    if num_warps is None:
        num_warps = 4 if dim <= 2048 else 8
    if num_stages is None:
        num_stages = 1 if steps_per_program == 1 else 2
    for name, value in (("rows_per_step", rows_per_step), ("steps_per_program", steps_per_program)):
        if not _is_power_of_two(value):
            raise ValueError(f"{name} must be a power of two; got {value!r}")
    if num_rows % (rows_per_step * steps_per_program):
        raise ValueError(
            f"rows_per_step x steps_per_program = {rows_per_step} x {steps_per_program} must "
            f"divide the R = {num_rows} rows"
        )
    if not _is_power_of_two(num_warps) or num_warps > 32:
        raise ValueError(f"num_warps must be a power of two <= 32; got {num_warps!r}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer; got {num_stages!r}")
    return RowTiling(rows_per_step, steps_per_program, num_warps, num_stages)


def row_steps(tiling: RowTiling, step) -> None:
    """Runs `step(span)` for each of a program's steps, `span` indexing that step's rows in
    the program's block: the whole block for one step (the original kernels), else a
    `fori_loop` Triton can pipeline over aligned slices of `rows_per_step` rows."""
    rows, steps = tiling.rows_per_step, tiling.steps_per_program
    if steps == 1:
        step(slice(None))
        return

    def body(index, carry):
        step(pl.ds(pl.multiple_of(index * rows, rows), rows))
        return carry

    lax.fori_loop(0, steps, body, 0)


def _normalise(x, scale, eps: float, out_dtype):
    """lemo-jax's RMSNorm on rows x [..., D]: fp32 statistics, cast, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(out_dtype) * scale.astype(out_dtype)


def gather_rmsnorm_reference(h, token_ids, scale, *, eps: float, out_dtype=None):
    """take_along_axis, then RMSNorm: the definition."""
    rows = jnp.take_along_axis(h, token_ids[..., None], axis=1)
    return _normalise(rows, scale, eps, out_dtype or h.dtype)


def _kernel(ids_ref, h_ref, scale_ref, out_ref, *rows_ref, eps: float, tiling: RowTiling):
    scale = scale_ref[...]

    def step(span):
        ids = ids_ref[span]  # [rows]
        rows = h_ref[ids, :]  # [rows, D], loaded by index
        out_ref[span, :] = _normalise(rows, scale, eps, out_ref.dtype)
        if rows_ref:
            rows_ref[0][span, :] = rows

    row_steps(tiling, step)


def _pallas_forward(h, token_ids, scale, eps, out_dtype, interpret, with_rows: bool, tiling):
    batch, _, dim = h.shape
    num_rows = token_ids.shape[1]
    rows = tiling.rows_per_step * tiling.steps_per_program  # per program
    tile = pl.BlockSpec((None, rows, dim), lambda b, r: (b, r, 0))
    out_shape = [jax.ShapeDtypeStruct((batch, num_rows, dim), out_dtype)]
    if with_rows:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_rows, dim), h.dtype))
    outputs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, tiling=tiling),
        grid=(batch, num_rows // rows),
        in_specs=[
            pl.BlockSpec((None, rows), lambda b, r: (b, r)),
            pl.BlockSpec((None, *h.shape[1:]), lambda b, r: (b, 0, 0)),  # all of row b's h
            pl.BlockSpec((dim,), lambda b, r: (0,)),
        ],
        out_specs=[tile] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages
        ),
        interpret=interpret,
        name="lemo_gather_rmsnorm",
    )(token_ids, h, scale)
    return outputs if with_rows else outputs[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _gather_rmsnorm(h, token_ids, scale, eps, out_dtype, impl, interpret, tiling):
    if impl == "pallas":
        return _pallas_forward(h, token_ids, scale, eps, out_dtype, interpret, False, tiling)
    return gather_rmsnorm_reference(h, token_ids, scale, eps=eps, out_dtype=out_dtype)


def _gather_rmsnorm_fwd(h, token_ids, scale, eps, out_dtype, impl, interpret, tiling):
    if impl == "pallas":
        out, rows = _pallas_forward(h, token_ids, scale, eps, out_dtype, interpret, True, tiling)
    else:
        rows = jnp.take_along_axis(h, token_ids[..., None], axis=1)
        out = _normalise(rows, scale, eps, out_dtype)
    return out, (rows, token_ids, scale, h.shape)


def _gather_rmsnorm_bwd(eps, out_dtype, impl, interpret, tiling, residuals, d_out):
    rows, token_ids, scale, h_shape = residuals
    _, pullback = jax.vjp(lambda x, s: _normalise(x, s, eps, out_dtype), rows, scale)
    d_rows, d_scale = pullback(d_out)
    batch = jnp.arange(h_shape[0])[:, None]
    d_h = jnp.zeros(h_shape, d_rows.dtype).at[batch, token_ids].add(d_rows, unique_indices=True)
    return d_h, None, d_scale


_gather_rmsnorm.defvjp(_gather_rmsnorm_fwd, _gather_rmsnorm_bwd)


@functools.partial(
    jax.jit,
    static_argnames=(
        "eps",
        "out_dtype",
        "impl",
        "interpret",
        "rows_per_step",
        "steps_per_program",
        "num_warps",
        "num_stages",
    ),
)
def gather_rmsnorm(
    h: jax.Array,  # [B, T, D]
    token_ids: jax.Array,  # [B, R] int32, sorted and unique per row
    scale: jax.Array,  # [D]
    *,
    eps: float,
    out_dtype=None,
    impl: str = "xla",
    interpret: bool | None = None,
    rows_per_step: int | None = None,
    steps_per_program: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:  # [B, R, D] in out_dtype (default h.dtype)
    """RMSNorm of the `token_ids` rows of h (module doc). `impl="pallas"` needs a power-of-two
    D; `interpret=None` interprets the kernel off the GPU. The last four arguments tune the
    Pallas kernel only (`row_tiling`; the defaults are the original one-step kernel)."""
    _check(h, token_ids, scale, impl)
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
    out_dtype = jnp.dtype(out_dtype or h.dtype)
    return _gather_rmsnorm(
        h, token_ids.astype(jnp.int32), scale, eps, out_dtype, impl, interpret, tiling
    )
