"""Train LeMo's block-score predictors for a run configuration (paper section 4.3).

    python scripts/train_predictor.py --config smollm2_demo --set train.seq_len=8192 \\
        --set lemo.schedule=paper_e2e --out runs/smollm2_predictors

The configuration's model is frozen and its data pipeline supplies the sequences; each step
fits every layer's predictor to the oracle block scores of one batch (SmoothL1). At the end the
predictors are saved in --out with `recall.json`: per layer that eliminates blocks (at the
budgets of the configuration's `lemo.schedule`), the fraction of the oracle's top-k blocks the
predictor's top-k also picks, on validation windows. Checkpoints go to --out/checkpoints;
running the same command again resumes. Fine-tune with the result:

    python scripts/finetune.py --config smollm2_demo --set lemo.enabled=true \\
        --set lemo.scorer=predictor --set lemo.predictor_path=runs/smollm2_predictors
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.errors import UserError, run_cli
from lemo_jax.lemo.predictor_training import train_predictors


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_run_config_arguments(parser)
    parser.add_argument("--out", help="output directory (default: OUTPUT_DIR/predictor)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (paper: ~400)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-batches", type=int, default=4, help="validation windows")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("steps", "eval_batches", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive, got {args.learning_rate}")
    config = run_config_from_args(args)
    out = Path(args.out) if args.out else Path(config.output_dir) / "predictor"
    result = train_predictors(
        config,
        out=out,
        steps=args.steps,
        learning_rate=args.learning_rate,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
        show_progress=not args.no_progress,
    )
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}", file=sys.stderr)
    per_layer = " ".join(f"{layer}:{value:.2f}" for layer, value in result.recall.items())
    mean = (
        "n/a (no layer eliminates blocks)"
        if result.mean_recall is None
        else (f"{result.mean_recall:.3f}")
    )
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"step {result.step} | loss {loss} | mean recall {mean} | per layer {per_layer}")
    if result.mlp_recall:
        per_layer = " ".join(f"{layer}:{value:.2f}" for layer, value in result.mlp_recall.items())
        print(f"MLP token recall: mean {result.mean_mlp_recall:.3f} | per layer {per_layer}")
    print(f"predictors in {result.directory} (recall.json)")


if __name__ == "__main__":
    run_cli(main)
