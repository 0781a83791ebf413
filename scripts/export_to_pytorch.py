"""Export a fine-tuning run's checkpoint as a Hugging Face model (or a PEFT LoRA adapter).

    python scripts/export_to_pytorch.py --checkpoint runs/smollm2_demo --out exported/demo
    python scripts/export_to_pytorch.py --checkpoint runs/llama_64k --adapter-only --out adapter

The full export merges LoRA into the weights and writes config.json (with the RoPE scaling used
in training), sharded safetensors with an index, and the tokenizer. `--adapter-only` writes a
PEFT adapter for the base model instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lemo_jax.errors import UserError, run_cli
from lemo_jax.io.export import export_hf, export_peft_adapter
from lemo_jax.train.restore import load_run_model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="the run directory")
    parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="new directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--adapter-only", action="store_true", help="write a PEFT adapter")
    args = parser.parse_args(argv)
    if args.out.exists():  # checked before the (slow) model load
        raise UserError(f"{args.out} already exists; choose a new --out directory")
    model, tokenizer, config, step = load_run_model(args.checkpoint, step=args.step)
    if args.adapter_only:
        if config.model.path is None:
            raise UserError(
                "--adapter-only needs a run fine-tuned from pretrained weights "
                "(this one started from random weights)"
            )
        export_peft_adapter(
            model, args.out, base_model_name_or_path=config.model.path, tokenizer=tokenizer
        )
        if config.model.rope_scaling is not None:
            print(
                f"note: the run trained with RoPE scaling {config.model.rope_scaling!r} x"
                f"{config.model.rope_factor:g}; set the same rope_parameters on the base "
                "model's config when applying this adapter"
            )
    else:
        export_hf(model, args.out, dtype=args.dtype, tokenizer=tokenizer)
    kind = "PEFT adapter" if args.adapter_only else "Hugging Face model"
    print(f"wrote the {kind} of {args.checkpoint} at step {step} to {args.out}")


if __name__ == "__main__":
    run_cli(main)
