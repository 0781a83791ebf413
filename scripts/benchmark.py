"""Measure training steps of a run configuration, dense against LeMo.

    python scripts/benchmark.py --config llama_64k --set model.init=random \\
        --seq-lens 4096,8192 --modes dense,lemo --measure compiled-memory

Each measurement prints one JSON line per mode and length:

- `compiled-memory` compiles the training step on abstract shapes (no weights are allocated, so
  it runs on a CPU for any model size) and reports the compiled step's `memory_analysis()`
  figures in GiB and the compile time.
- `step-time` runs real steps on random weights of the configuration's shape (GPU): the best and
  median step time over `--steps` timed steps after one warm-up step, tokens/s, model TFLOP/s
  (the dense model's FLOPs, `lemo_jax.train.timing.model_flops_per_step`, over the median), the
  peak device memory and the compiled estimate; under LeMo also the token selection's (scorer's)
  time per step and its share of the step (`selection_share`); `--profile DIR` profiles one
  more step of each of our configurations (trace, per-op and per-category time: a table after
  the first one, and `profile_summary.json`). Each mode and length runs in its
  own process, so every peak is that configuration's alone; one that runs out of memory is
  reported as such.
  A Markdown table with each mode's median step time and peak against `hf_peft`'s and
  `dense`'s follows the JSON lines (and `--plot FILE.png` draws them against tokens).

- `max-context` finds, per mode, the longest sequence (a multiple of --context-step tokens, up to
  the largest of --seq-lens) whose training step runs. For our modes the compiled step's memory
  against the device's (or --memory-limit-gib) places the boundary first, by compiles only (it
  grows linearly in tokens: about four compiles); one real step in a fresh process then
  confirms it, and a step that runs out of memory moves it down. `hf_peft` bisects real steps.

Modes: `dense` and `lemo` are ours (LeMo off / on, everything else from the configuration);
`lemo_predictor` is LeMo with the predictor scorer (untrained predictors of the right shape
when `lemo.predictor_path` is not set: the same cost);
`hf_peft` is the peer users run today, transformers + PEFT with the same shape, LoRA, remat
(gradient checkpointing) and optimizer (`lemo_jax.train.peer`), step-time only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence

import jax

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.errors import UserError, run_cli
from lemo_jax.train.memory import compiled_step_memory
from lemo_jax.train.observe import device_memory_limit_gib
from lemo_jax.train.timing import model_flops_per_step

MODES = ("hf_peft", "dense", "lemo", "lemo_predictor")
OUT_OF_MEMORY = "out of memory"  # a probe's error when the step does not fit


def mode_config(base, mode: str, seq_len: int):
    """`base` at `seq_len` tokens with the mode's LeMo settings (hf_peft reads only the shape,
    LoRA, remat and optimizer)."""
    overrides = [f"train.seq_len={seq_len}", f"lemo.enabled={mode.startswith('lemo')}"]
    if mode == "lemo_predictor":
        overrides.append("lemo.scorer=predictor")
        if not base.lemo.predictor_path:
            # Speed and memory need only the predictors' shapes: without a path, untrained
            # ones are built (`attach_predictors(random_seed=...)`); the path is not read.
            overrides.append("lemo.predictor_path=(untrained)")
    return apply_overrides(base, overrides)


MEASURES = ("compiled-memory", "step-time", "max-context")


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seq-lens expects comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 2:
        raise UserError(f"--seq-lens expects lengths of at least 2 tokens, got {text!r}")
    return lengths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seq-lens", required=True, help="comma-separated, e.g. 4096,8192")
    parser.add_argument(
        "--modes", default="dense,lemo", help=f"comma-separated: {', '.join(MODES)}"
    )
    parser.add_argument("--measure", default="compiled-memory", choices=MEASURES)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (step-time)")
    parser.add_argument("--plot", help="step-time: write step time and peak against tokens (PNG)")
    parser.add_argument(
        "--profile",
        help="step-time: profile one more step of our modes; traces and summaries in "
        "PROFILE/MODE_TOKENS (TensorBoard or Perfetto)",
    )
    parser.add_argument("--context-step", type=int, default=4096, help="max-context granularity")
    parser.add_argument(
        "--memory-limit-gib", type=float, help="max-context: memory budget (default: the device's)"
    )
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    add_run_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UserError(f"--modes: unknown {unknown or modes}; choose from {', '.join(MODES)}")
    if args.measure == "compiled-memory" and "hf_peft" in modes:
        raise UserError("--modes hf_peft has no compiled program; use --measure step-time")
    if args.measure != "compiled-memory":
        # Peaks are per process and the peer needs the device too: JAX must not reserve 75% of
        # the device up front (this must happen before JAX first touches the GPU), and the
        # longest context may use nearly all of it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    if args.context_step < 64 or args.context_step % 64:
        raise UserError(
            f"--context-step must be a positive multiple of 64, got {args.context_step}"
        )
    base = run_config_from_args(args)
    if args.measure == "max-context" and not args.in_process:
        for mode in modes:
            row = dict(config=args.config, mode=mode, measure=args.measure)
            row.update(overrides=args.overrides, **_max_context(args, base, mode))
            print(json.dumps(row), flush=True)
        return
    lengths = parse_lengths(args.seq_lens)
    rows = []
    for seq_len in lengths:
        for mode in modes:
            config = mode_config(base, mode, seq_len)
            row = dict(
                config=args.config,
                mode=mode,
                seq_len=seq_len,
                measure=args.measure,
                overrides=args.overrides,
            )
            if args.measure == "compiled-memory":
                row.update(device=jax.devices()[0].device_kind, **compiled_step_memory(config))
                row.update(memory_limit_gib=device_memory_limit_gib())
            elif args.measure == "max-context":  # one probe, in its own process
                row.update(_measure_steps(config, mode, steps=1, warmup=0))
            elif args.in_process or len(lengths) * len(modes) == 1:
                profile_dir = None
                if args.profile and mode != "hf_peft":
                    profile_dir = os.path.join(args.profile, f"{mode}_{seq_len}")
                row.update(_measure_steps(config, mode, args.steps, profile_dir=profile_dir))
            else:
                row.update(_in_child_process(args, seq_len, mode))
            if args.measure == "step-time" and "median_step_s" in row:
                row["model_tflops"] = model_flops_per_step(config) / row["median_step_s"] / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.measure == "step-time":
        print("\n" + markdown_table(rows))
        if any("profile" in row for row in rows):
            print("\n" + profile_table(rows))
        if args.plot:
            print(f"plot: {plot_rows(rows, args.plot)}", file=sys.stderr)
    print(
        f"done: {len(modes)} modes x {len(parse_lengths(args.seq_lens))} lengths", file=sys.stderr
    )


def _measure_steps(
    config, mode: str, steps: int, warmup: int = 1, profile_dir: str | None = None
) -> dict:
    if mode == "hf_peft":
        from lemo_jax.train.peer import measure_hf_peft_step_time

        return measure_hf_peft_step_time(config, steps=steps, warmup=warmup)
    from lemo_jax.train.timing import measure_step_time

    measured = measure_step_time(config, steps=steps, warmup=warmup, profile_dir=profile_dir)
    return dict(device=jax.devices()[0].device_kind, **measured)


def _max_context(args: argparse.Namespace, base, mode: str) -> dict:
    """The longest multiple of --context-step (up to the largest --seq-lens) whose step runs.

    For our modes the compiled memory of the step, which grows linearly in tokens and is what
    the allocator must find, places the boundary first: compiles only, each guess interpolated
    from the two nearest compiled lengths, so a few compiles land on it. Then real steps confirm
    it from there downwards (one step when the compiled estimate was right; after an
    out-of-memory step, 1, 2, 4, ... units lower, then a bisection). Every compile and step runs
    in a fresh process: a compile's autotuning takes device memory that its process keeps, and
    which a real step in the same process would lack. `hf_peft` has no compiled program: a
    bisection of real steps. A probe that fails for any reason other than memory ends the
    search with its error."""
    unit, limit = args.context_step, args.memory_limit_gib
    top = max(parse_lengths(args.seq_lens)) // unit
    probes = []
    failure = {}

    def compiled(units: int) -> dict:
        result = _in_child_process(args, units * unit, mode, measure="compiled-memory")
        if "error" in result:
            failure.setdefault("error", f"{units * unit} tokens, compiling: {result['error']}")
        return result

    def compiled_gib(units: int) -> float:
        if failure:
            return math.inf
        estimate = compiled(units)["total_gib"] if units != top else first["total_gib"]
        probes.append(dict(seq_len=units * unit, fits=estimate <= limit, compiled_gib=estimate))
        _progress(f"{mode} {units * unit:,} tokens: compiled {estimate:.2f} of {limit:.2f} GiB")
        return estimate

    def runs(units: int) -> bool:
        if failure:
            return False
        result = _in_child_process(args, units * unit, mode)
        kept = {key: result[key] for key in ("peak_gib", "step_s", "error") if key in result}
        probes.append(dict(seq_len=units * unit, fits="error" not in result, **kept))
        _progress(f"{mode} {units * unit:,} tokens: step {json.dumps(kept) if kept else 'ran'}")
        if "error" in result and result["error"] != OUT_OF_MEMORY:
            failure.update(error=f"{units * unit} tokens: {result['error']}")
        return "error" not in result

    first = compiled(top) if mode != "hf_peft" and top > 0 else {}
    if limit is None:  # the device's allocator limit, as the compiling process saw it
        limit = first.get("memory_limit_gib")
    if failure:
        best = 0
    elif first and limit is not None:
        high = _largest_within(compiled_gib, limit, top)
        best = high if high == 0 or runs(high) else _largest_true_below(runs, high)
    else:
        best = _largest_true(runs, 0, top)
    return dict(
        **failure,
        max_tokens=best * unit,
        searched_up_to=top * unit,
        memory_limit_gib=limit,
        probes=probes,
    )


def _progress(text: str) -> None:
    """A probe's outcome as it comes (a search can take many minutes), on stderr."""
    print(f"max-context: {text}", file=sys.stderr, flush=True)


def _largest_true_below(predicate, high: int) -> int:
    """The largest n < high with predicate(n) (0 when none), for a predicate true up to some
    point, false at `high`, and likely true close below it: probes high - 1, high - 2,
    high - 4, ... until one is true, then bisects the gap above it."""
    failed, step = high, 1
    while True:
        n = high - step
        if n <= 0:
            return _largest_true(predicate, 0, failed - 1)
        if predicate(n):
            return _largest_true(predicate, n, failed - 1)
        failed, step = n, step * 2


def _largest_true(predicate, low: int, high: int) -> int:
    """The largest n in [low, high] with predicate(n), for a predicate true up to some point
    and false after it; `low` is assumed true (0 trivially). The first probe is `high`."""
    if high > low and predicate(high):
        return high
    high -= 1
    while low < high:
        middle = (low + high + 1) // 2
        if predicate(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _largest_within(value, limit: float, top: int) -> int:
    """The largest n in [0, top] with value(n) <= limit (0 when none), for value increasing and
    close to linear in n. Each probe follows the line through the nearest known values on
    either side of the boundary, or through the two nearest above it while none is known below;
    a halving step when only one value is known or when probes keep landing below (the line
    creeping up a convex value), so a linear value takes about four probes whatever the range."""
    if top == 0:
        return 0
    known = {top: value(top)}
    if known[top] <= limit:
        return top
    low, high, landed_below = 0, top, 0
    while high - low > 1:
        a, b = (low, high) if low in known else sorted(known)[:2] if len(known) > 1 else (0, 0)
        interpolate = a != b and known[b] > known[a] and landed_below < 3
        if interpolate:  # 1e-9: a boundary the line hits exactly is not lost to rounding
            guess = a + math.floor((limit - known[a]) * (b - a) / (known[b] - known[a]) + 1e-9)
        else:
            guess = (low + high) // 2
        guess = min(max(guess, low + 1), high - 1)
        known[guess] = value(guess)
        if known[guess] <= limit:
            low, landed_below = guess, landed_below + interpolate
        else:
            high, landed_below = guess, 0
    return low


def markdown_table(rows: list[dict]) -> str:
    """Median step time, tokens/s and peak per (length, mode), with ratios to `hf_peft`'s time
    and to `dense`'s peak and activation memory (peak minus the training state) at the same
    length where those were measured."""

    def value(row, key):
        return None if "error" in row else row.get(key)

    lines = [
        "| tokens | mode | median step (s) | tokens/s | model TFLOP/s | peak (GiB) | compile (s) "
        "| selection share | time / hf_peft | peak / dense | activations / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = {r["mode"]: r for r in rows if r["seq_len"] == row["seq_len"]}
        step, peak = value(row, "median_step_s"), value(row, "peak_gib")
        peer_step = value(same["hf_peft"], "median_step_s") if "hf_peft" in same else None
        dense_peak = value(same["dense"], "peak_gib") if "dense" in same else None
        activations = _activation_gib(row) if "error" not in row else None
        dense_activations = _activation_gib(same["dense"]) if "dense" in same else None

        def fmt(number, pattern):
            return "-" if number is None else pattern.format(number)

        time_ratio = step / peer_step if step and peer_step else None
        peak_ratio = peak / dense_peak if peak and dense_peak else None
        activation_ratio = (
            activations / dense_activations if activations and dense_activations else None
        )
        tokens_per_step = value(row, "tokens_per_s") and row["tokens_per_s"] * row["step_s"]
        tokens = tokens_per_step / step if step and tokens_per_step else None
        lines.append(
            f"| {row['seq_len']:,} | {row['mode']} | "
            + (
                f"{row['error']} | - | - | - | - | - | - | - | - |"
                if "error" in row
                else f"{fmt(step, '{:.3f}')} | {fmt(tokens, '{:,.0f}')} | "
                f"{fmt(value(row, 'model_tflops'), '{:.1f}')} | {fmt(peak, '{:.2f}')} | "
                f"{fmt(value(row, 'compile_s'), '{:.1f}')} | "
                f"{fmt(value(row, 'selection_share'), '{:.1%}')} | {fmt(time_ratio, '{:.2f}')} | "
                f"{fmt(peak_ratio, '{:.2f}')} | {fmt(activation_ratio, '{:.2f}')} |"
            )
        )
    return "\n".join(lines)


def _activation_gib(row: dict) -> float | None:
    """Peak minus the training state (weights, adapters, optimizer state): what the step's
    activations and temporaries took. None where either is unknown (hf_peft, errors)."""
    if "error" in row or row.get("peak_gib") is None or row.get("state_gib") is None:
        return None
    return row["peak_gib"] - row["state_gib"]


def profile_table(rows: list[dict]) -> str:
    """Per profiled (length, mode): the profiled step's op time by category, in ms."""
    profiled = [row for row in rows if "profile" in row]
    names = list(dict.fromkeys(c for row in profiled for c in row["profile"]["categories_ms"]))
    lines = [
        "| tokens | mode | ops total (ms) | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in profiled:
        profile = row["profile"]
        cells = [f"{profile['categories_ms'].get(name, 0.0):.1f}" for name in names]
        lines.append(
            f"| {row['seq_len']:,} | {row['mode']} | {profile['total_ms']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str) -> str:
    """Median step time and peak memory against tokens, one line per mode (PNG at `path`)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(row["mode"] for row in rows):
        measured = [r for r in rows if r["mode"] == mode and "error" not in r]
        tokens = [r["seq_len"] for r in measured]
        time_axis.plot(tokens, [r["median_step_s"] for r in measured], marker="o", label=mode)
        memory = [r.get("peak_gib") or r.get("compiled_gib") for r in measured]
        points = [(t, m) for t, m in zip(tokens, memory, strict=True) if m is not None]
        if points:
            memory_axis.plot(*zip(*points, strict=True), marker="o", label=mode)
    device = next((r["device"] for r in rows if "device" in r), "")
    measured_peaks = any(r.get("peak_gib") for r in rows)
    memory_label = "peak memory (GiB)" if measured_peaks else "compiled memory estimate (GiB)"
    for axis, label in ((time_axis, "median step time (s)"), (memory_axis, memory_label)):
        axis.set_xlabel("tokens per sequence")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(f"{rows[0]['config']} on {device}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _in_child_process(
    args: argparse.Namespace, seq_len: int, mode: str, measure: str | None = None
) -> dict:
    """One measurement (`measure`, by default --measure's) in a fresh process: the device's peak
    memory is per process."""
    measure = measure or args.measure
    command = [sys.executable, __file__, "--config", args.config, "--measure", measure]
    command += ["--seq-lens", str(seq_len), "--modes", mode, "--steps", str(args.steps)]
    if measure == "max-context":
        command.append("--in-process")
    if args.profile:
        command += ["--profile", args.profile]
    for override in args.overrides:
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        row = json.loads(lines[-1])
        return {key: row[key] for key in row if key not in ("config", "mode", "seq_len")}
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]] or lines or ["failed"]
    out_of_memory = (
        "RESOURCE_EXHAUSTED" in result.stderr or "out of memory" in result.stderr.lower()
    )
    return dict(error=OUT_OF_MEMORY if out_of_memory else errors[-1][:500])


if __name__ == "__main__":
    run_cli(main)
