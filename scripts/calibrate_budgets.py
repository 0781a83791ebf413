"""Calibrate per-layer LeMo keep ratios on validation windows and write a schedule file.

    python scripts/calibrate_budgets.py --config smollm2_demo --out budgets.json
    python scripts/calibrate_budgets.py --config llama_64k --set model.path=/models/Llama-2-7b-hf \\
        --set train.seq_len=16384 --samples 4 --out llama2_16k.json
    python scripts/finetune.py --config llama_64k --set lemo.schedule=file:llama2_16k.json

The frozen model (no LoRA) scores each layer's 64-token blocks (paper eq. 2); a block counts as
informative when its score is at least tau times the layer's maximum, outliers excluded (paper
section 2), and each layer keeps the mean informative fraction over the samples.

With --max-loss-rise NATS the budgets are bounded by the loss instead: each layer's own loss
rise when it alone keeps --trial-ratio of its blocks is measured on the samples, then the most
layers, least harmful first, that together raise the loss by at most NATS keep that ratio (the
rest stay dense). The probes run the plan training will run, so pass the run's lemo settings;
with `--set lemo.merge_lone_layers=false` a lone pruned layer is not paired with a dense one.

    python scripts/calibrate_budgets.py --config smollm2_accuracy --max-loss-rise 0.05 \
        --set lemo.merge_lone_layers=false --out budgets.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.configs.run import RunConfig
from lemo_jax.data.pipeline import prepare_data
from lemo_jax.errors import UserError, run_cli
from lemo_jax.lemo.budgets import (
    elimination_plan,
    executed_budgets,
    layer_budgets,
    write_schedule_file,
)
from lemo_jax.lemo.calibrate import (
    calibrated_keep_ratios,
    layer_block_scores,
    loss_bounded_keep_ratios,
    mean_window_loss,
    single_layer_loss_rises,
)
from lemo_jax.lemo.config import LemoConfig
from lemo_jax.train.setup import build_model

OUTLIER_QUANTILE = 0.99


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]),
    )
    parser.add_argument("--samples", type=int, default=8, help="validation windows (default 8)")
    parser.add_argument("--tau", type=float, default=0.1, help="threshold fraction (default 0.1)")
    parser.add_argument(
        "--sparse-end-layers",
        action="store_true",
        help="use the measured ratios for the first and last layers too (default: keep them dense)",
    )
    parser.add_argument(
        "--max-loss-rise",
        type=float,
        help="bound the budgets by the loss: the most layers keeping --trial-ratio whose joint "
        "loss rise on the samples is at most this many nats (default: the score threshold)",
    )
    parser.add_argument(
        "--trial-ratio",
        type=float,
        default=0.5,
        help="with --max-loss-rise: the keep ratio of the layers taken (default 0.5)",
    )
    parser.add_argument("--out", type=Path, required=True, help="schedule file to write (new)")
    add_run_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    if not 0 < args.tau <= 1:
        raise UserError(f"--tau must be in (0, 1], got {args.tau}")
    if args.max_loss_rise is not None and not args.max_loss_rise > 0:
        raise UserError(f"--max-loss-rise must be positive, got {args.max_loss_rise}")
    if not 0 < args.trial_ratio < 1:
        raise UserError(f"--trial-ratio must be in (0, 1), got {args.trial_ratio}")
    _check_new_file(args.out)
    return args


def _check_new_file(path: Path) -> None:
    if path.expanduser().exists():
        raise UserError(f"--out {path} already exists; choose another file or remove it")


def sample_windows(config: RunConfig, tokenizer, samples: int) -> tuple[np.ndarray, list[int]]:
    """int32 [K, T] validation windows spread evenly over the split (neighbouring windows often
    come from one document), and their indices."""
    _, validation = prepare_data(config.data, tokenizer, config.train.seq_len)
    count = min(samples, len(validation))
    if count < samples:
        print(f"validation has only {count} windows; using them all", file=sys.stderr)
    indices = [index * len(validation) // count for index in range(count)]
    return validation.batch(indices), indices


def loss_bounded_ratios(
    config: RunConfig, model, windows: np.ndarray, args: argparse.Namespace
) -> tuple[list[float], dict]:
    """Per-layer ratios bounded by the loss rise (`loss_bounded_keep_ratios`), selecting
    blocks with the oracle scorer, and what was measured on the way."""
    lemo = dataclasses.replace(config.lemo, enabled=True, scorer="oracle")
    num_layers, seq_len = model.config.num_layers, config.train.seq_len
    trial_lemo = dataclasses.replace(lemo, schedule=f"uniform:{args.trial_ratio}")
    trial = elimination_plan(trial_lemo, num_layers, seq_len)
    if trial is None:
        raise UserError(
            f"--trial-ratio {args.trial_ratio} keeps every block at {seq_len} tokens; "
            "choose a smaller ratio or a longer train.seq_len"
        )
    num_blocks = layer_budgets(trial_lemo, num_layers, seq_len).attention_blocks[0]
    dense_loss = mean_window_loss(model, windows, None)
    print(f"dense loss {dense_loss:.4f}; each layer alone at {num_blocks} blocks", file=sys.stderr)
    rises = single_layer_loss_rises(
        model, windows, num_blocks=num_blocks, plan=trial, dense_loss=dense_loss
    )
    print("single-layer rises: " + " ".join(f"{rise:+.3f}" for rise in rises), file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        probe = f"{folder}/probe.json"

        def joint_rise(ratios: list[float]) -> float:
            write_schedule_file(probe, attention=ratios)
            probe_lemo = dataclasses.replace(lemo, schedule=f"file:{probe}")
            plan = elimination_plan(probe_lemo, num_layers, seq_len)
            rise = mean_window_loss(model, windows, plan) - dense_loss
            kept = executed_budgets(probe_lemo, num_layers, seq_len).kept_fraction()[1]
            pruned = sum(ratio < 1 for ratio in ratios)
            print(f"{pruned} layers: rise {rise:+.4f}, kept {kept:.3f}", file=sys.stderr)
            return rise

        result = loss_bounded_keep_ratios(
            rises,
            max_rise=args.max_loss_rise,
            trial_ratio=args.trial_ratio,
            joint_rise=joint_rise,
            use_dense_end_layers=not args.sparse_end_layers,
        )
    measured = dict(
        max_loss_rise=args.max_loss_rise,
        trial_ratio=args.trial_ratio,
        trial_blocks=num_blocks,
        dense_loss=dense_loss,
        single_layer_rises=[float(rise) for rise in rises],
        layer_order=result.order,
        joint_probes=[dict(layers=count, rise=rise) for count, rise in result.evaluated],
        loss_rise=result.rise,
    )
    return result.ratios, measured


def print_table(ratios: list[float], out: Path, config: RunConfig) -> None:
    lemo = LemoConfig(
        enabled=True,
        schedule=f"file:{out}",
        block_size=config.lemo.block_size,
        bucket_blocks=config.lemo.bucket_blocks,
    )
    budgets = layer_budgets(lemo, len(ratios), config.train.seq_len)
    print(f"layer  keep ratio  budget (blocks of {lemo.block_size})")
    for layer, (ratio, blocks) in enumerate(zip(ratios, budgets.attention_blocks, strict=True)):
        print(f"{layer:5d}  {ratio:10.3f}  {blocks:6d} / {budgets.num_blocks}")
    print(budgets.summary())
    run_lemo = dataclasses.replace(config.lemo, enabled=True, schedule=f"file:{out}")
    executed = executed_budgets(run_lemo, len(ratios), config.train.seq_len)
    print(f"as this run's settings execute it: {executed.kept_fraction()[1]:.3f} of tokens kept")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = run_config_from_args(args)
    seq_len, block_size = config.train.seq_len, config.lemo.block_size
    if seq_len % block_size:  # fail before loading anything
        raise UserError(
            f"train.seq_len={seq_len} is not a multiple of lemo.block_size={block_size}"
        )
    print(
        f"{config.name}: calibrating on {jax.device_count()} x {jax.devices()[0].device_kind}",
        file=sys.stderr,
    )
    model, tokenizer = build_model(config.model, None, seq_len=seq_len, seed=config.train.seed)
    windows, indices = sample_windows(config, tokenizer, args.samples)
    if args.max_loss_rise is not None:
        ratios, method_fields = loss_bounded_ratios(config, model, windows, args)
        method = "lemo_jax.lemo.calibrate.loss_bounded_keep_ratios"
    else:
        # One window at a time: memory of a single long sequence, one compiled shape.
        scores = np.concatenate(
            [layer_block_scores(model, window[None], block_size=block_size) for window in windows],
            axis=1,
        )  # [L, K, M]
        ratios = calibrated_keep_ratios(
            scores,
            tau=args.tau,
            outlier_quantile=OUTLIER_QUANTILE,
            use_dense_end_layers=not args.sparse_end_layers,
        )
        method = "lemo_jax.lemo.calibrate"
        method_fields = dict(tau=args.tau, outlier_quantile=OUTLIER_QUANTILE)
    _check_new_file(args.out)  # again: never overwrite a file created meanwhile
    source = dict(
        method=method,
        config=config.name,
        overrides=list(args.overrides),
        model=config.model.path or f"random {config.model.preset}",
        data=config.data.train,
        validation_windows=indices,
        samples=len(indices),
        seq_len=seq_len,
        block_size=block_size,
        dense_end_layers=not args.sparse_end_layers,
        **method_fields,
    )
    write_schedule_file(str(args.out), attention=ratios, source=source)
    print_table(ratios, args.out, config)
    print(f"wrote {args.out}: use --set lemo.schedule=file:{args.out}")


if __name__ == "__main__":
    run_cli(main)
