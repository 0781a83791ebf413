"""What does token elimination cost a model before any fine-tuning? Loss per LeMo schedule.

    python scripts/elimination_loss.py --config smollm2_accuracy --set train.seq_len=4096 \\
        --set model.rope_scaling=null --schedules paper_e2e,uniform:0.7 --windows 4

For each schedule (any `lemo.schedule` value), the mean next-token loss of the configuration's
model on validation windows with LeMo on (the configuration's scorer), beside the dense loss;
`--random-scorer` adds each schedule with untrained predictors as the scorer, a control for
how much the block choice matters. A large rise here is what fine-tuning has to absorb.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.data import prepare_data
from lemo_jax.errors import UserError, run_cli
from lemo_jax.lemo.budgets import elimination_plan, executed_budgets
from lemo_jax.lemo.calibrate import mean_window_loss
from lemo_jax.train.setup import attach_predictors, build_model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_run_config_arguments(parser)
    parser.add_argument("--schedules", default="paper_e2e", help="comma-separated schedules")
    parser.add_argument("--windows", type=int, default=4, help="validation windows")
    parser.add_argument("--random-scorer", action="store_true")
    args = parser.parse_args(argv)
    if args.windows < 1:
        raise UserError("--windows must be at least 1")
    config = run_config_from_args(args)
    schedules = [item.strip() for item in args.schedules.split(",") if item.strip()]
    for schedule in schedules:  # fail before loading the model
        try:
            dataclasses.replace(config.lemo, enabled=True, schedule=schedule)
        except ValueError as err:
            raise UserError(str(err)) from None
    seq_len = config.train.seq_len
    model, tokenizer = build_model(config.model, None, seq_len=seq_len, seed=config.train.seed)
    num_layers = model.config.num_layers
    _, validation = prepare_data(config.data, tokenizer, seq_len)
    count = min(args.windows, len(validation))
    windows = validation.batch([i * len(validation) // count for i in range(count)])  # [W, T]
    rows = [("dense", "-", None)]
    for schedule in schedules:
        scorers = ["oracle", "random"] if args.random_scorer else [config.lemo.scorer]
        rows += [(schedule, scorer, schedule) for scorer in scorers]
    print(f"{'schedule':<24} {'scorer':<8} {'kept':>6} {'loss':>8} {'rise':>8}")
    dense_loss = None
    for name, scorer, schedule in rows:
        lemo = dataclasses.replace(config.lemo, enabled=schedule is not None)
        if schedule is not None:
            lemo = dataclasses.replace(lemo, schedule=schedule, scorer="oracle")
        if scorer == "random":  # untrained predictors: an arbitrary but input-dependent choice
            lemo = dataclasses.replace(lemo, scorer="predictor", predictor_path="untrained")
            attach_predictors(model, lemo, random_seed=0)
        plan = elimination_plan(lemo, num_layers, seq_len)
        loss = mean_window_loss(model, windows, plan)
        kept = executed_budgets(lemo, num_layers, seq_len).kept_fraction()[1] if schedule else 1.0
        dense_loss = loss if dense_loss is None else dense_loss
        print(f"{name:<24} {scorer:<8} {kept:6.3f} {loss:8.4f} {loss - dense_loss:+8.4f}")
        sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
