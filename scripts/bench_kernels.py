"""Time LeMo's sparse-path ops against the device's measured ceilings (GPU).

    python scripts/bench_kernels.py --seq-lens 16384,32768,65536 --impls xla,pallas

Llama-2-7B shapes (32 query heads, 32 KV heads unless --kv-heads, head dim 128, model dim
4096, bf16, batch 1). First the ceilings are measured in the same process: a bf16 matrix
product (8192^3) and a device copy. Then each op and implementation is timed and reported as a
fraction of its ceiling:

- `block_scores`: FLOPs of the causal q.k products for all heads (N * H * T^2), against the
  matmul ceiling.
- `selective_load` (gather + RMSNorm of the kept rows, R = --keep x T rounded to blocks):
  bytes read and written (2 * R * D elements), against the copy ceiling.
- `residual_add` (h[ids] += rows, h donated so the update is in place): bytes of the touched
  rows of h read and written plus the rows read (3 * R * D elements), against the copy ceiling.

Two clocks, both reported for every op and both ceilings; `--timing` picks the one the rates
and fractions use (device on a GPU, wall elsewhere), so a fraction compares like with like:

- wall: the best of --repeats synchronised calls after a warm-up (compile) call. For ops of
  tens to hundreds of microseconds this is mostly host dispatch and synchronisation.
- device: --repeats calls back to back under the JAX profiler, the time of every kernel in the
  trace summed (`lemo_jax.train.profile`) and divided by the calls. Every kernel the op
  launches counts (a copy of h before an aliased kernel, the XLA ops around a Pallas call);
  the gaps between kernels do not. The largest kernels per call are listed (`kernels_ms`).
  A CPU has no device trace: its XLA ops' host events are summed (`time_source: host`), good
  for smoke tests only.

Block-score kernel variants (`pallas_kernels.block_scores`), each list crossed with the
others, one measurement each: `--score-tiles`, `--score-splits`, `--score-warps`,
`--score-stages`. Labels name the choices that differ from the defaults, e.g.
`pallas:4x2/sauto/w4/st3`.

Each Pallas variant's first output is compared with the XLA implementation's on the same
inputs (`error_vs_xla`: relative Frobenius error; 0 for the residual add's exact addition), so
a sweep also checks what it times. `--budget-s` stops starting measurements after that many
seconds (the rest are listed as skipped), for runs under a time limit.

One JSON line per measurement (a variant that fails, e.g. out of shared memory, reports its
error and the sweep goes on), then a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lemo_jax.errors import UserError, run_cli
from lemo_jax.train.profile import profile_call
from pallas_kernels import block_scores, gather_rmsnorm, scatter_add_rows

OPS = ("block_scores", "selective_load", "residual_add")
IMPLS = ("xla", "pallas")
TIMINGS = ("device", "wall")
_TOP_KERNELS = 6  # kernels per measurement listed in its JSON line


class _Parser(argparse.ArgumentParser):
    """Bad flag values end as one `error: ...` line (through run_cli), not a usage screen."""

    def error(self, message: str):
        raise UserError(message)


def best_seconds(function: Callable, *args, repeats: int) -> float:
    """Best wall time of `repeats` synchronised calls after one warm-up (compile) call."""
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - started)
    return min(times)


def device_seconds(function: Callable, *args, calls: int) -> tuple[float, dict[str, float], str]:
    """Kernel time per call: after a warm-up call, `calls` calls back to back under the JAX
    profiler; every event of the trace's device, whatever launched it, summed and divided by
    `calls`. Returns (seconds, ms per call of the largest kernels by name, the trace's source:
    "device", or "host" on a CPU)."""
    jax.block_until_ready(function(*args))

    def calls_in_a_row():
        result = None
        for _ in range(calls):
            result = function(*args)
        return jax.block_until_ready(result)

    with tempfile.TemporaryDirectory() as directory:
        _, summary = profile_call(calls_in_a_row, directory, top=_TOP_KERNELS)
    kernels = {name: round(ms / calls, 4) for name, ms in summary["top_ops_ms"].items()}
    return summary["total_ms"] / 1e3 / calls, kernels, summary["source"]


def measure(function: Callable, *args, repeats: int, timing: str) -> dict:
    """Wall seconds per call, and device seconds too under `timing="device"` (None if the
    trace held no events)."""
    result = dict(wall_s=best_seconds(function, *args, repeats=repeats), device_s=None)
    if timing == "device":
        seconds, kernels, source = device_seconds(function, *args, calls=repeats)
        if source != "device" and jax.default_backend() == "gpu":
            seconds = 0.0  # a GPU trace without device events (no CUPTI?): host times are no use
        result.update(device_s=seconds if seconds > 0 else None, kernels=kernels, source=source)
    return result


def _matmul(n: int):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return jax.jit(jnp.matmul), (a, b), 2 * n**3


def _copy(n: int):
    x = jnp.ones((4 * n * n,), jnp.float32)  # 1 GiB for n = 8192
    return jax.jit(lambda v: v * 2.0), (x,), 2 * x.nbytes


def ceilings(repeats: int, n: int, timing: str) -> dict[str, dict[str, float]]:
    """The measured bf16 matmul rate (n x n x n, FLOP/s) and device copy bandwidth (bytes read
    + written per second over n * n * 4 floats) by each clock measured: {clock: {"matmul":
    ..., "copy": ...}}."""
    rates: dict[str, dict[str, float]] = {"wall": {}, "device": {}}
    for name, build in (("matmul", _matmul), ("copy", _copy)):
        function, inputs, work = build(n)
        timed = measure(function, *inputs, repeats=repeats, timing=timing)
        rates["wall"][name] = work / timed["wall_s"]
        if timed["device_s"]:
            rates["device"][name] = work / timed["device_s"]
    return rates if len(rates["device"]) == 2 else {"wall": rates["wall"]}


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} expects positive integers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(description=__doc__.strip().splitlines()[0])
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
    parser.add_argument(
        "--score-warps", default="auto", help="block_scores Triton num_warps, e.g. auto,4,8"
    )
    parser.add_argument("--score-stages", default="2", help="block_scores Triton num_stages")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--timing",
        default=None,
        help="device or wall: the clock of the rates and fractions (default: device on a GPU)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="start no measurement after this many seconds (0: no limit); the rest is skipped",
    )
    parser.add_argument(
        "--ceiling-size",
        type=int,
        default=8192,
        help="n of the n^3 matmul and n^2 * 4-float copy ceilings (smaller only for smoke tests)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    lengths = parse_ints(args.seq_lens, "--seq-lens")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if unknown := sorted(set(ops) - set(OPS)):
        raise UserError(f"--ops: unknown {unknown}; choose from {', '.join(OPS)}")
    if unknown := sorted(set(impls) - set(IMPLS)):
        raise UserError(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    if args.heads % args.kv_heads:
        raise UserError(f"--heads={args.heads} is not a multiple of --kv-heads={args.kv_heads}")
    if args.ceiling_size < 1:
        raise UserError(f"--ceiling-size must be positive, got {args.ceiling_size}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if not 0 < args.keep <= 1:
        raise UserError(f"--keep must be in (0, 1], got {args.keep}")
    timing = args.timing or ("device" if jax.default_backend() == "gpu" else "wall")
    if timing not in TIMINGS:
        raise UserError(f"--timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    # Bad input fails here, before the ceilings' minute.
    score_variants = _score_variants(args)

    device = jax.devices()[0].device_kind
    rates = ceilings(args.repeats, args.ceiling_size, timing)
    clock = timing if timing in rates else "wall"
    if clock != timing:
        print("note: the profiler's traces held no device events; timing by the wall clock")
    print(
        json.dumps(
            dict(
                device=device,
                timing=clock,
                matmul_tflops=rates[clock]["matmul"] / 1e12,
                copy_tbps=rates[clock]["copy"] / 1e12,
                wall_matmul_tflops=rates["wall"]["matmul"] / 1e12,
                wall_copy_tbps=rates["wall"]["copy"] / 1e12,
            )
        ),
        flush=True,
    )
    rows = []
    for seq_len in lengths:
        for op in ops:
            inputs = None  # drawn at the first measurement that is not skipped
            pallas_variants = score_variants if op == "block_scores" else [None]
            for impl in impls:
                for variant in pallas_variants if impl == "pallas" else [None]:
                    label = _label(impl, variant)
                    row = dict(op=op, impl=label, seq_len=seq_len)
                    if args.budget_s and time.perf_counter() - started > args.budget_s:
                        row["skipped"] = f"--budget-s {args.budget_s:g} spent"
                    else:
                        inputs = inputs or _inputs(op, seq_len, args)
                        row.update(_timed_row(op, impl, inputs, args, variant, rates, clock))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del inputs
    _print_table(device, clock, rates, rows)


def _timed_row(op, impl, inputs, args, variant, rates, clock) -> dict:
    """One measurement's fields: times, rate and fractions (or its error). A Pallas variant's
    first output is also compared with the XLA implementation's on the same inputs
    (`error_vs_xla`, relative; the residual add's first call is one exact addition)."""
    try:
        function, call_args, work = _op(op, impl, inputs, args, variant)
        checked = {}
        if impl == "pallas":
            if "reference" not in inputs:
                xla, xla_args, _ = _op(op, "xla", inputs, args)
                inputs["reference"] = jax.block_until_ready(xla(*xla_args))
                del xla, xla_args
            checked["error_vs_xla"] = _relative_error(function(*call_args), inputs["reference"])
        timed = measure(function, *call_args, repeats=args.repeats, timing=clock)
    except Exception as err:  # a variant that does not compile must not end the sweep
        return dict(error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
    ceiling = "matmul" if op == "block_scores" else "copy"
    seconds = timed["device_s"] if clock == "device" else timed["wall_s"]
    row = dict(
        ms=seconds * 1e3 if seconds else None,
        rate=work / seconds / 1e12 if seconds else None,
        unit="TFLOP/s" if op == "block_scores" else "TB/s",
        fraction_of_ceiling=work / seconds / rates[clock][ceiling] if seconds else None,
        timing=clock,
        wall_ms=timed["wall_s"] * 1e3,
        wall_fraction_of_ceiling=work / timed["wall_s"] / rates["wall"][ceiling],
    )
    if clock == "device":
        row.update(
            device_ms=timed["device_s"] * 1e3 if timed["device_s"] else None,
            time_source=timed["source"],
            kernels_ms=timed["kernels"],
        )
        # Kernels cannot take longer than the synchronised call that ran them. (A CPU's host
        # events nest, a loop's and its body's, so there the sum proves nothing either way.)
        device_s = timed["device_s"] or 0.0
        if timed["source"] == "device" and device_s > 1.1 * timed["wall_s"]:
            row["warning"] = "device time above wall time: the trace may count events twice"
    return row | checked


def _relative_error(actual: jax.Array, expected: jax.Array) -> float:
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    return float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))


def _print_table(device: str, clock: str, rates: dict, rows: list[dict]) -> None:
    def describe(which: str) -> str:
        return (
            f"matmul {rates[which]['matmul'] / 1e12:.0f} TFLOP/s, "
            f"copy {rates[which]['copy'] / 1e12:.2f} TB/s"
        )

    print(f"\nceilings on {device}: {clock} time {describe(clock)}", end="")
    print(f"; wall time {describe('wall')}" if clock != "wall" else "")
    print(
        f"{'op':<16}{'impl':<34}{'tokens':>8}{'wall ms':>10}{'device ms':>11}{'rate':>17}"
        f"{'of ceiling':>12}{'wall frac':>11}{'vs xla':>9}"
    )
    for row in rows:
        head = f"{row['op']:<16}{row['impl']:<34}{row['seq_len']:>8}"
        if "error" in row or "skipped" in row:
            print(f"{head}  {row.get('error') or 'skipped: ' + row['skipped']}")
            continue
        device_ms = f"{row['device_ms']:.3f}" if row.get("device_ms") else "-"
        rate = f"{row['rate']:.2f} {row['unit']}" if row["rate"] else "-"
        fraction = f"{row['fraction_of_ceiling']:.2f}" if row["fraction_of_ceiling"] else "-"
        error = f"{row['error_vs_xla']:.0e}" if "error_vs_xla" in row else "-"
        print(
            f"{head}{row['wall_ms']:>10.3f}{device_ms:>11}{rate:>17}{fraction:>12}"
            f"{row['wall_fraction_of_ceiling']:>11.2f}{error:>9}"
        )


def _parse_tiles(text: str) -> list[tuple[int, int]]:
    tiles = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            first, second = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserError(f"--score-tiles expects QxK pairs such as 2x2, got {part!r}") from None
        tiles.append((first, second))
    return tiles or [(1, 1)]


def _parse_int_or_auto(text: str, flag: str, *, power_of_two: bool = False) -> list[int | None]:
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "auto":
            values.append(None)
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise UserError(f"{flag} expects integers or auto, got {part!r}") from None
        if values[-1] < 1:
            raise UserError(f"{flag} must be at least 1, got {part!r}")
        if power_of_two and values[-1] & (values[-1] - 1):
            raise UserError(f"{flag} expects powers of two, got {part!r}")
    return values or [None]


def _parse_splits(text: str) -> list[int | None]:
    return _parse_int_or_auto(text, "--score-splits")


def _score_variants(args: argparse.Namespace) -> list[dict]:
    """The Pallas block-score kernel's keyword arguments, one dict per measurement."""
    tiles = _parse_tiles(args.score_tiles)
    for pair in tiles:
        if min(pair) < 1 or any(t & (t - 1) for t in pair):
            raise UserError(f"--score-tiles expects powers of two, got {pair[0]}x{pair[1]}")
    splits = _parse_splits(args.score_splits)
    warps = _parse_int_or_auto(args.score_warps, "--score-warps", power_of_two=True)
    stages = parse_ints(args.score_stages, "--score-stages")
    return [
        dict(tiles=t, splits=s, num_warps=w, num_stages=st)
        for t, s, w, st in itertools.product(tiles, splits, warps, stages)
    ]


def _kept_rows(seq_len: int, args: argparse.Namespace) -> int:
    num_blocks = max(1, seq_len // args.block_size)
    return max(1, round(args.keep * num_blocks)) * args.block_size


def _label(impl: str, variant) -> str:
    """`impl`, plus the block-score kernel's choices where they are not its defaults."""
    if variant is None:
        return impl
    parts = []
    if variant["splits"] != 1:
        parts.append(f"/s{'auto' if variant['splits'] is None else variant['splits']}")
    if variant["num_warps"] is not None:
        parts.append(f"/w{variant['num_warps']}")
    if variant["num_stages"] != 2:
        parts.append(f"/st{variant['num_stages']}")
    if variant["tiles"] == (1, 1) and not parts:
        return impl
    q_blocks, k_blocks = variant["tiles"]
    return f"{impl}:{q_blocks}x{k_blocks}" + "".join(parts)


def _inputs(op: str, seq_len: int, args: argparse.Namespace) -> dict:
    """The op's arrays at this length, drawn once for all its measurements."""
    key = jax.random.key(seq_len)
    if op == "block_scores":
        key_q, key_k = jax.random.split(key)
        q = jax.random.normal(key_q, (1, seq_len, args.heads, args.head_dim), jnp.bfloat16)
        k = jax.random.normal(key_k, (1, seq_len, args.kv_heads, args.head_dim), jnp.bfloat16)
        return dict(q=q, k=k)
    kept = _kept_rows(seq_len, args)
    key_h, key_ids, key_rows = jax.random.split(key, 3)
    h = jax.random.normal(key_h, (1, seq_len, args.model_dim), jnp.bfloat16)
    ids = jnp.sort(jax.random.choice(key_ids, seq_len, (1, kept), replace=False), axis=-1)
    inputs = dict(h=h, ids=ids.astype(jnp.int32), kept=kept)
    if op == "selective_load":
        inputs["scale"] = jnp.ones((args.model_dim,), jnp.bfloat16)
    else:
        inputs["rows"] = jax.random.normal(key_rows, (1, kept, args.model_dim), jnp.bfloat16)
    return inputs


def _op(op: str, impl: str, inputs: dict, args: argparse.Namespace, variant=None):
    """(function, its inputs, its work in FLOPs or bytes) for one measurement; `variant`: the
    block-score kernel's keyword arguments."""
    extra = variant or {}
    if op == "block_scores":
        function = jax.jit(
            lambda q, k: block_scores(
                q, k, block_size=args.block_size, causal=True, impl=impl, **extra
            )
        )
        seq_len = inputs["q"].shape[1]
        return function, (inputs["q"], inputs["k"]), args.heads * args.head_dim * seq_len**2
    element = jnp.dtype(jnp.bfloat16).itemsize
    row_bytes = inputs["kept"] * args.model_dim * element
    if op == "selective_load":
        function = jax.jit(lambda h, ids, s: gather_rmsnorm(h, ids, s, eps=1e-5, impl=impl))
        return function, (inputs["h"], inputs["ids"], inputs["scale"]), 2 * row_bytes
    add = jax.jit(lambda h, ids, r: scatter_add_rows(h, ids, r, impl=impl), donate_argnums=0)
    state = {"h": jnp.copy(inputs["h"])}  # donated from here on: the shared input stays whole

    def threaded(ids, rows):  # each call consumes the previous result: in place every time
        state["h"] = add(state["h"], ids, rows)
        return state["h"]

    return threaded, (inputs["ids"], inputs["rows"]), 3 * row_bytes


if __name__ == "__main__":
    run_cli(main)
