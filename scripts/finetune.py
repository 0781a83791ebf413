"""Fine-tune a Llama-family model on long sequences.

    python scripts/finetune.py --config smollm2_demo
    python scripts/finetune.py --config llama_64k --set model.path=/models/Llama-2-7b-hf
    python scripts/finetune.py --list-configs

Re-running the same command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from lemo_jax.configs.cli import add_run_config_arguments, run_config_from_args
from lemo_jax.configs.runs import get_run_config, run_names
from lemo_jax.errors import run_cli
from lemo_jax.train.distributed import initialize_distributed
from lemo_jax.train.loop import run_training


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.strip().splitlines()[1:]),
    )
    parser.add_argument("--list-configs", action="store_true", help="list configurations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_run_config_arguments(parser, required=False)
    args = parser.parse_args(argv)
    if not args.list_configs and not args.config:
        parser.error("--config is required (see --list-configs)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list_configs:
        for name in run_names():
            config = get_run_config(name)
            model = config.model
            if model.path:
                weights = model.path
            elif model.init == "random":
                weights = f"random {model.preset}"
            else:
                weights = f"{model.preset} (--set model.path=DIR, or model.init=random)"
            print(f"{name:16s} {config.train.seq_len:>7,} tokens  {weights}")
        return
    config = run_config_from_args(args)
    initialize_distributed()  # before anything touches a device; nothing on a single host
    hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
    print(
        f"{config.name}: {jax.device_count()} x {jax.devices()[0].device_kind}{hosts}, "
        f"output in {config.output_dir}",
        file=sys.stderr,
    )
    result = run_training(config, show_progress=not args.no_progress)
    if result.stop_signal is not None:
        print(
            f"stopped at step {result.step}; checkpoint saved in {result.directory}. "
            "Run the same command to resume."
        )
        sys.exit(128 + result.stop_signal)
    summary = [f"step {result.step}/{config.train.steps}"]
    if result.validation_loss is not None:
        summary.append(f"validation loss {result.validation_loss:.4f}")
    if result.perplexity_before is not None and result.perplexity_after is not None:
        summary.append(
            f"validation perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}"
        )
    if result.exported_to is not None:
        summary.append(f"Hugging Face model in {result.exported_to}")
    print(" | ".join(summary))


if __name__ == "__main__":
    run_cli(main)
