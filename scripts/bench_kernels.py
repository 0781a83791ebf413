"""Time LeMo's sparse-path ops against the device's measured ceilings (GPU).

    python scripts/bench_kernels.py --seq-lens 16384,32768,65536 --impls xla,pallas

Llama-2-7B shapes (32 query heads, 32 KV heads unless --kv-heads, head dim 128, model dim
4096, bf16, batch 1). First the ceilings are measured in the same process: a bf16 matrix
product (8192^3) and a device copy. Then each op and implementation is timed (best of
--repeats after a warm-up) and reported as a fraction of its ceiling:

- `block_scores`: FLOPs of the causal q.k products for all heads (N * H * T^2), against the
  matmul ceiling.

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
from pallas_kernels import block_scores

OPS = ("block_scores",)


def best_seconds(function: Callable, *args, repeats: int) -> float:
    """Best wall time of `repeats` synchronised calls after one warm-up (compile) call."""
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_ceiling(repeats: int) -> float:
    """Measured bf16 matrix-product rate, FLOP/s."""
    n = 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    seconds = best_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * n**3 / seconds


def copy_ceiling(repeats: int) -> float:
    """Measured device copy bandwidth (bytes read + written per second)."""
    x = jnp.ones((2**28,), jnp.float32)  # 1 GiB
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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    lengths = parse_ints(args.seq_lens, "--seq-lens")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if unknown := sorted(set(ops) - set(OPS)):
        raise UserError(f"--ops: unknown {unknown}; choose from {', '.join(OPS)}")
    if args.heads % args.kv_heads:
        raise UserError(f"--heads={args.heads} is not a multiple of --kv-heads={args.kv_heads}")

    device = jax.devices()[0].device_kind
    flops_ceiling = matmul_ceiling(args.repeats)
    bytes_ceiling = copy_ceiling(args.repeats)
    print(
        json.dumps(
            dict(device=device, matmul_tflops=flops_ceiling / 1e12, copy_tbps=bytes_ceiling / 1e12)
        ),
        flush=True,
    )
    rows = []
    for seq_len in lengths:
        key_q, key_k = jax.random.split(jax.random.key(seq_len))
        q = jax.random.normal(key_q, (1, seq_len, args.heads, args.head_dim), jnp.bfloat16)
        k = jax.random.normal(key_k, (1, seq_len, args.kv_heads, args.head_dim), jnp.bfloat16)
        for op in ops:
            for impl in impls:
                function = jax.jit(
                    lambda q, k, impl=impl: block_scores(
                        q, k, block_size=args.block_size, causal=True, impl=impl
                    )
                )
                try:
                    seconds = best_seconds(function, q, k, repeats=args.repeats)
                except NotImplementedError as error:
                    print(json.dumps(dict(op=op, impl=impl, seq_len=seq_len, error=str(error))))
                    continue
                flops = args.heads * args.head_dim * seq_len**2
                row = dict(
                    op=op,
                    impl=impl,
                    seq_len=seq_len,
                    ms=seconds * 1e3,
                    tflops=flops / seconds / 1e12,
                    fraction_of_ceiling=flops / seconds / flops_ceiling,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\nceilings on {device}: matmul {flops_ceiling / 1e12:.0f} TFLOP/s, "
        f"copy {bytes_ceiling / 1e12:.2f} TB/s"
    )
    print(f"{'op':<14}{'impl':<8}{'tokens':>8}{'ms':>10}{'TFLOP/s':>10}{'of ceiling':>12}")
    for row in rows:
        print(
            f"{row['op']:<14}{row['impl']:<8}{row['seq_len']:>8}{row['ms']:>10.2f}"
            f"{row['tflops']:>10.1f}{row['fraction_of_ceiling']:>12.2f}"
        )


if __name__ == "__main__":
    run_cli(main)
