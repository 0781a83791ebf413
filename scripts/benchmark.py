"""Measure training steps of a run configuration, dense against LeMo.

    python scripts/benchmark.py --config llama_64k --set model.init=random \\
        --seq-lens 4096,8192 --modes dense,lemo --measure compiled-memory

`compiled-memory` compiles the training step on abstract shapes (no weights are allocated, so it
runs on a CPU for any model size) and prints one JSON line per mode and length with the
compiled step's `memory_analysis()` figures in GiB and the compile time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.errors import UserError, run_cli
from lemo_jax.train.memory import compiled_step_memory

MODES = ("dense", "lemo")


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
    parser.add_argument("--modes", default="dense,lemo", help="comma-separated: dense, lemo")
    parser.add_argument("--measure", default="compiled-memory", choices=["compiled-memory"])
    add_run_config_arguments(parser)
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UserError(f"--modes: unknown {unknown or modes}; choose from {', '.join(MODES)}")
    base = run_config_from_args(args)
    for seq_len in parse_lengths(args.seq_lens):
        for mode in modes:
            config = apply_overrides(
                base, [f"train.seq_len={seq_len}", f"lemo.enabled={mode == 'lemo'}"]
            )
            row = dict(
                config=args.config,
                mode=mode,
                seq_len=seq_len,
                measure=args.measure,
                device=jax.devices()[0].device_kind,
                overrides=args.overrides,
                **compiled_step_memory(config),
            )
            print(json.dumps(row), flush=True)
    print(
        f"done: {len(modes)} modes x {len(parse_lengths(args.seq_lens))} lengths", file=sys.stderr
    )


if __name__ == "__main__":
    run_cli(main)
