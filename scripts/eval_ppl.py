"""Dense perplexity of a model on the built-in corpus or local text files.

python scripts/eval_ppl.py --model smollm2-135m --seq-len 2048 --max-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from lemo_jax.data import corpus_fingerprint, load_documents, make_windows, tokenize_documents
from lemo_jax.errors import UserError, run_cli
from lemo_jax.eval.perplexity import evaluate_perplexity
from lemo_jax.io import load_pretrained, load_tokenizer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face directory, .gguf file, or built-in name (smollm2-135m)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=["default"],
        help="'default' (built-in corpus) or .txt/.jsonl/.parquet files or globs",
    )
    parser.add_argument(
        "--split",
        default="validation",
        choices=["train", "validation"],
        help="built-in corpus split (default: validation)",
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=16384,
        help="evaluate at most this many tokens (whole windows)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="parameter dtype")
    parser.add_argument(
        "--compute-dtype",
        default=None,
        help="matmul dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_tokens < args.seq_len:
        raise UserError(
            f"--max-tokens ({args.max_tokens}) is smaller than one window "
            f"(--seq-len {args.seq_len})"
        )
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    documents = load_documents(args.data, split=args.split)  # fail on bad paths before loading
    compute_dtype = args.compute_dtype or (
        "bfloat16" if jax.default_backend() == "gpu" else "float32"
    )
    tokenizer = load_tokenizer(args.model)
    model = load_pretrained(args.model, dtype=args.dtype, compute_dtype=compute_dtype)
    tokens = tokenize_documents(documents, tokenizer, max_tokens=args.max_tokens)
    windows = make_windows(tokens, args.seq_len)
    result = evaluate_perplexity(model, windows, batch_size=args.batch_size)
    builtin = args.data == ["default"] or args.data[0].lower() in ("default", "builtin")
    data_name = (
        f"builtin:{args.split} ({corpus_fingerprint()})" if builtin else ", ".join(args.data)
    )
    elapsed = time.perf_counter() - started
    print(
        f"perplexity {result.perplexity:.3f} (mean NLL {result.mean_nll:.4f}) over "
        f"{result.predicted_tokens:,} predicted tokens in {result.num_windows} windows of "
        f"{result.seq_len} | model {args.model} | data {data_name} | {elapsed:.0f} s"
    )
    if args.json:
        record = dict(
            model=str(args.model),
            data=data_name,
            seq_len=result.seq_len,
            num_windows=result.num_windows,
            predicted_tokens=result.predicted_tokens,
            mean_nll=result.mean_nll,
            perplexity=result.perplexity,
            param_dtype=args.dtype,
            compute_dtype=compute_dtype,
            backend=jax.default_backend(),
            seconds=round(elapsed, 1),
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
