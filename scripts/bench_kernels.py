"""Time LeMo's sparse-path ops against the device's measured ceilings (GPU).

    python scripts/bench_kernels.py --seq-lens 16384,32768,65536 --impls xla,pallas

Llama-2-7B shapes (32 query heads, 32 KV heads unless --kv-heads, head dim 128, model dim
4096, bf16, batch 1). First the ceilings are measured in the same process: a bf16 matrix
product (8192^3) and a device copy. Then each op and implementation is timed (best of
--repeats after a warm-up) and reported as a fraction of its ceiling:

- `block_scores`: FLOPs of the causal q.k products for all heads (N * H * T^2), against the
  matmul ceiling.
- `selective_load` (gather + RMSNorm of the kept rows, R = --keep x T rounded to blocks):
  bytes read and written (2 * R * D elements), against the copy ceiling.
- `residual_add` (h[ids] += rows, h donated so the update is in place): bytes of the touched
  rows of h read and written plus the rows read (3 * R * D elements), against the copy ceiling.

One JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lemo_jax.errors import UserError, run_cli
from pallas_kernels import block_scores, gather_rmsnorm, scatter_add_rows

OPS = ("block_scores", "selective_load", "residual_add")


def best_seconds(function: Callable, *args, repeats: int) -> float:
    """Best wall time of `repeats` synchronised calls after one warm-up (compile) call."""
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_ceiling(repeats: int, n: int = 8192) -> float:
    """Measured bf16 matrix-product rate (n x n x n), FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    seconds = best_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / seconds


def copy_ceiling(repeats: int, n: int = 8192) -> float:
    """Measured device copy bandwidth (bytes read + written per second) over n * n * 4 floats
    (1 GiB for n = 8192)."""
    x = jnp.ones((4 * n * n,), jnp.float32)
    seconds = best_seconds(jax.jit(lambda v: v * 2.0), x, repeats=repeats)
    return 2 * x.nbytes / seconds


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} expects positive integers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seq-lens", default="16384,32768,65536")
    parser.add_argument("--impls", default="xla", help="comma-separated: xla, pallas")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--model-dim", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.4, help="kept fraction (row ops)")
    parser.add_argument(
        "--score-tiles", default="1x1", help="block_scores Pallas tiles, e.g. 1x1,2x2 (q x k)"
    )
    parser.add_argument(
        "--score-splits",
        default="1",
        help="block_scores Pallas programs per key tile, e.g. 1,4,auto",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--ceiling-size",
        type=int,
        default=8192,
        help="n of the n^3 matmul and n^2 * 4-float copy ceilings (smaller only for smoke tests)",
    )
    args = parser.parse_args(argv)
    lengths = parse_ints(args.seq_lens, "--seq-lens")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if unknown := sorted(set(ops) - set(OPS)):
        raise UserError(f"--ops: unknown {unknown}; choose from {', '.join(OPS)}")
    if args.heads % args.kv_heads:
        raise UserError(f"--heads={args.heads} is not a multiple of --kv-heads={args.kv_heads}")
    if args.ceiling_size < 1:
        raise UserError(f"--ceiling-size must be positive, got {args.ceiling_size}")
    score_tiles = _parse_tiles(args.score_tiles)  # bad input fails before the ceilings' minute
    score_splits = _parse_splits(args.score_splits)
    kernel_variants = [(tiles, splits) for tiles in score_tiles for splits in score_splits]

    device = jax.devices()[0].device_kind
    flops_ceiling = matmul_ceiling(args.repeats, args.ceiling_size)
    bytes_ceiling = copy_ceiling(args.repeats, args.ceiling_size)
    print(
        json.dumps(
            dict(device=device, matmul_tflops=flops_ceiling / 1e12, copy_tbps=bytes_ceiling / 1e12)
        ),
        flush=True,
    )
    rows = []
    for seq_len in lengths:
        for op in ops:
            variants = [
                (impl, variant)
                for impl in impls
                for variant in (
                    kernel_variants if op == "block_scores" and impl == "pallas" else [None]
                )
            ]
            for impl, variant in variants:
                function, inputs, work = _op(op, impl, seq_len, args, variant)
                if variant is not None and variant != ((1, 1), 1):
                    (q_blocks, k_blocks), splits = variant
                    impl = f"{impl}:{q_blocks}x{k_blocks}"
                    if splits != 1:
                        impl += f"/s{'auto' if splits is None else splits}"
                seconds = best_seconds(function, *inputs, repeats=args.repeats)
                ceiling = flops_ceiling if op == "block_scores" else bytes_ceiling
                row = dict(
                    op=op,
                    impl=impl,
                    seq_len=seq_len,
                    ms=seconds * 1e3,
                    rate=work / seconds / 1e12,
                    unit="TFLOP/s" if op == "block_scores" else "TB/s",
                    fraction_of_ceiling=work / seconds / ceiling,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\nceilings on {device}: matmul {flops_ceiling / 1e12:.0f} TFLOP/s, "
        f"copy {bytes_ceiling / 1e12:.2f} TB/s"
    )
    print(f"{'op':<16}{'impl':<16}{'tokens':>8}{'ms':>10}{'rate':>16}{'of ceiling':>12}")
    for row in rows:
        rate = f"{row['rate']:.2f} {row['unit']}"
        print(
            f"{row['op']:<16}{row['impl']:<16}{row['seq_len']:>8}{row['ms']:>10.3f}"
            f"{rate:>16}{row['fraction_of_ceiling']:>12.2f}"
        )


def _parse_tiles(text: str) -> list[tuple[int, int]]:
    tiles = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            q_blocks, k_blocks = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserError(f"--score-tiles expects QxK pairs such as 2x2, got {part!r}") from None
        tiles.append((q_blocks, k_blocks))
    return tiles or [(1, 1)]


def _parse_splits(text: str) -> list[int | None]:
    splits = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "auto":
            splits.append(None)
            continue
        try:
            splits.append(int(part))
        except ValueError:
            raise UserError(f"--score-splits expects integers or auto, got {part!r}") from None
        if splits[-1] < 1:
            raise UserError(f"--score-splits must be at least 1, got {part!r}")
    return splits or [1]


def _op(op: str, impl: str, seq_len: int, args: argparse.Namespace, variant=None):
    """(function, its inputs, its work in FLOPs or bytes) for one measurement; `variant`:
    the block-score kernel's (tiles, splits)."""
    key = jax.random.key(seq_len)
    if op == "block_scores":
        key_q, key_k = jax.random.split(key)
        q = jax.random.normal(key_q, (1, seq_len, args.heads, args.head_dim), jnp.bfloat16)
        k = jax.random.normal(key_k, (1, seq_len, args.kv_heads, args.head_dim), jnp.bfloat16)
        extra = {} if variant is None else {"tiles": variant[0], "splits": variant[1]}
        function = jax.jit(
            lambda q, k: block_scores(
                q, k, block_size=args.block_size, causal=True, impl=impl, **extra
            )
        )
        return function, (q, k), args.heads * args.head_dim * seq_len**2
    num_blocks = max(1, seq_len // args.block_size)
    kept = max(1, round(args.keep * num_blocks)) * args.block_size
    key_h, key_ids, key_rows = jax.random.split(key, 3)
    h = jax.random.normal(key_h, (1, seq_len, args.model_dim), jnp.bfloat16)
    ids = jnp.sort(jax.random.choice(key_ids, seq_len, (1, kept), replace=False), axis=-1)
    ids = ids.astype(jnp.int32)
    element = jnp.dtype(jnp.bfloat16).itemsize
    if op == "selective_load":
        scale = jnp.ones((args.model_dim,), jnp.bfloat16)
        function = jax.jit(lambda h, ids, s: gather_rmsnorm(h, ids, s, eps=1e-5, impl=impl))
        return function, (h, ids, scale), 2 * kept * args.model_dim * element
    rows = jax.random.normal(key_rows, (1, kept, args.model_dim), jnp.bfloat16)
    add = jax.jit(lambda h, ids, r: scatter_add_rows(h, ids, r, impl=impl), donate_argnums=0)
    state = {"h": h}

    def threaded(ids, rows):  # each call consumes the previous result: in place every time
        state["h"] = add(state["h"], ids, rows)
        return state["h"]

    return threaded, (ids, rows), 3 * kept * args.model_dim * element


if __name__ == "__main__":
    run_cli(main)
