"""The `--config NAME --set path=value ...` arguments that every run-based script shares."""

from __future__ import annotations

import argparse

from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.configs.run import RunConfig
from lemo_jax.configs.runs import get_run_config


def add_run_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--config",
        required=required,
        help="a named run configuration (scripts/finetune.py --list-configs)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field, e.g. --set train.steps=200 (repeatable)",
    )


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The named configuration with the `--set` overrides applied (type-checked)."""
    return apply_overrides(get_run_config(args.config), args.overrides)
