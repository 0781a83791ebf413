"""The row kernels of the sparse path against their references, forward and backward.

`gather_rmsnorm` (selective load) and `scatter_add_rows` (in-place residual add), Pallas
(interpret mode on CPU, compiled Triton on a GPU) and XLA implementations, over a grid of
B (1, 2), T (64..2048), kept rows R (16 up to all of T), D (64, 128) and dtypes (fp32,
bf16); the `gpu` grid repeats this at Llama-2-7B sizes. The model's own RMSNorm is the
definition the selective load must reproduce.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import TOLERANCES, relative_error

from lemo_jax.model.layers import RMSNorm
from pallas_kernels import (
    gather_rmsnorm,
    gather_rmsnorm_reference,
    scatter_add_rows,
    scatter_add_rows_reference,
)
from pallas_kernels.selective_load import rows_per_program

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-5

# (B, T, R, D), dtype
CASES = [
    ((1, 64, 16, 64), F32),
    ((2, 256, 64, 128), BF16),
    ((2, 512, 512, 64), F32),  # every row kept
    ((1, 2048, 832, 128), BF16),  # 13 of 32 blocks of 64
    ((2, 1024, 48, 128), F32),  # R not a power of two: 16 rows per program
]


def _case_id(case) -> str:
    (batch, length, kept, dim), dtype = case
    return f"B{batch}-T{length}-R{kept}-D{dim}-{jnp.dtype(dtype).name}"


def _inputs(batch, length, kept, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((batch, length, dim), np.float32), dtype)
    ids = np.stack([np.sort(rng.choice(length, kept, replace=False)) for _ in range(batch)])
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(dim, np.float32), dtype)
    rows = jnp.asarray(rng.standard_normal((batch, kept, dim), np.float32), dtype)
    probe = jnp.asarray(rng.standard_normal((batch, kept, dim), np.float32), dtype)
    return h, jnp.asarray(ids, jnp.int32), scale, rows, probe


def _tolerance(dtype):
    return TOLERANCES[jnp.dtype(dtype)]


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gather_rmsnorm_matches_reference(case, impl):
    shape, dtype = case
    h, ids, scale, _, probe = _inputs(*shape, dtype)

    def loss(fn):
        return lambda h, scale: jnp.sum((fn(h, ids, scale) * probe).astype(jnp.float32) ** 2)

    kernel = jax.jit(lambda h, ids, scale: gather_rmsnorm(h, ids, scale, eps=EPS, impl=impl))
    reference = jax.jit(lambda h, ids, scale: gather_rmsnorm_reference(h, ids, scale, eps=EPS))
    out, expected = kernel(h, ids, scale), reference(h, ids, scale)
    assert out.shape == (*ids.shape, h.shape[2]) and out.dtype == h.dtype
    assert relative_error(out, expected) <= _tolerance(dtype).forward
    grads = jax.grad(loss(kernel), argnums=(0, 1))(h, scale)
    expected_grads = jax.grad(loss(reference), argnums=(0, 1))(h, scale)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) <= _tolerance(dtype).gradient
    untouched = np.ones(h.shape[1], bool)
    untouched[np.asarray(ids[0])] = False
    assert not np.any(np.asarray(grads[0][0, untouched], np.float32))  # eliminated rows: no grad


def test_gather_rmsnorm_is_the_models_rmsnorm_of_the_kept_rows():
    h, ids, _, _, _ = _inputs(2, 256, 64, 128, F32)
    norm = RMSNorm(128, eps=EPS, param_dtype=F32, compute_dtype=BF16)
    norm.scale.set_value(1 + jnp.arange(128, dtype=F32) / 128)
    rows = jnp.take_along_axis(h, ids[..., None], axis=1)
    for impl in ("pallas", "xla"):
        out = gather_rmsnorm(h, ids, norm.scale[...], eps=EPS, out_dtype=BF16, impl=impl)
        np.testing.assert_array_equal(
            np.asarray(out, np.float32), np.asarray(norm(rows), np.float32)
        )


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_scatter_add_rows_matches_reference(case, impl):
    shape, dtype = case
    h, ids, _, rows, _ = _inputs(*shape, dtype)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal(h.shape, np.float32), dtype)

    def loss(fn):
        return lambda h, rows: jnp.sum((fn(h, ids, rows) * probe).astype(jnp.float32) ** 2)

    kernel = jax.jit(lambda h, ids, rows: scatter_add_rows(h, ids, rows, impl=impl))
    out = kernel(h, ids, rows)
    # Exact: each touched row is one addition in h's dtype, the others are copied.
    np.testing.assert_array_equal(
        np.asarray(out, np.float32),
        np.asarray(scatter_add_rows_reference(h, ids, rows), np.float32),
    )
    grads = jax.grad(loss(kernel), argnums=(0, 1))(h, rows)
    expected = jax.grad(loss(scatter_add_rows_reference), argnums=(0, 1))(h, rows)
    for grad, expected_grad in zip(grads, expected, strict=True):
        assert relative_error(grad, expected_grad) <= _tolerance(dtype).gradient


def test_in_place_add_with_a_donated_residual():
    """Donated, the residual's buffer is reused for the result (no copy of h)."""
    h, ids, _, rows, _ = _inputs(1, 256, 64, 64, F32)
    expected = scatter_add_rows_reference(h, ids, rows)
    add = jax.jit(
        lambda h, ids, rows: scatter_add_rows(h, ids, rows, impl="pallas"), donate_argnums=0
    )
    out = add(h, ids, rows)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert h.is_deleted()


def test_rows_per_program():
    assert rows_per_program(1024, 4096) == 4  # 16K elements per program
    assert rows_per_program(1024, 64) == 256
    assert rows_per_program(48, 128) == 16
    assert rows_per_program(7, 64) == 1


@pytest.mark.parametrize(
    ("fn", "args", "match"),
    [
        (gather_rmsnorm, ((1, 64, 96), (1, 16), (96,)), "power-of-two model dim"),
        (gather_rmsnorm, ((1, 64, 64), (1, 16), (32,)), "scale must be"),
        (gather_rmsnorm, ((1, 64, 64), (2, 16), (64,)), "token_ids"),
        (scatter_add_rows, ((1, 64, 96), (1, 16), (1, 16, 96)), "power-of-two model dim"),
        (scatter_add_rows, ((1, 64, 64), (1, 16), (1, 8, 64)), "rows must be"),
    ],
)
def test_shape_errors(fn, args, match):
    h, ids, third = (jnp.zeros(shape, jnp.int32 if i == 1 else F32) for i, shape in enumerate(args))
    kwargs = {"eps": EPS} if fn is gather_rmsnorm else {}
    with pytest.raises(ValueError, match=match):
        fn(h, ids, third, impl="pallas", **kwargs)


GPU_CASES = [
    ((1, 16384, 6592, 4096), BF16),  # Llama-2-7B, 103 of 256 blocks
    ((1, 65536, 26368, 4096), BF16),  # 412 of 1,024 blocks
    ((2, 8192, 4096, 4096), F32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_row_kernels_gpu(case):
    shape, dtype = case
    h, ids, scale, rows, _ = _inputs(*shape, dtype)
    out = gather_rmsnorm(h, ids, scale, eps=EPS, impl="pallas")
    expected = gather_rmsnorm_reference(h, ids, scale, eps=EPS)
    assert relative_error(out, expected) <= _tolerance(dtype).forward
    added = scatter_add_rows(h, ids, rows, impl="pallas")
    np.testing.assert_array_equal(
        np.asarray(added, np.float32),
        np.asarray(scatter_add_rows_reference(h, ids, rows), np.float32),
    )
