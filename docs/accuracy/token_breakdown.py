"""Which tokens pay for LeMo's elimination? The analysis behind docs/ACCURACY.md, "Why".

    python docs/accuracy/token_breakdown.py --seq-len 4096 --windows 2     # kept vs others
    python docs/accuracy/token_breakdown.py --seq-len 1024 --windows 1 --force-prefix

SmolLM2-135M at its native positions (no interpolation), `paper_e2e` with the oracle scorer, on
validation windows of the built-in corpus. Per window: the share of tokens whose block every
pruned layer kept, and the dense and LeMo next-token losses of those tokens and of the others.
`--force-prefix` replaces the selection by the first half of the blocks in every pruned layer:
the kept tokens then see exactly the dense model's context (later tokens cannot affect them
causally), so their losses must equal the dense model's exactly.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

import lemo_jax.lemo.layer as lemo_layer
from lemo_jax.configs.runs import get_run_config
from lemo_jax.data import prepare_data
from lemo_jax.lemo.budgets import elimination_plan
from lemo_jax.lemo.kept_blocks import kept_blocks
from lemo_jax.train.setup import build_model


def token_losses(logits, token_ids) -> np.ndarray:
    """[T - 1] next-token losses of the first sequence."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], token_ids[:, 1:])
    return np.asarray(losses)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--force-prefix", action="store_true")
    args = parser.parse_args()
    config = get_run_config("smollm2_accuracy")
    section = dataclasses.replace(config.model, rope_scaling=None)
    model, tokenizer = build_model(section, None, seq_len=args.seq_len, seed=0)
    _, validation = prepare_data(config.data, tokenizer, args.seq_len)
    lemo = dataclasses.replace(config.lemo, enabled=True, schedule="paper_e2e")
    plan = elimination_plan(lemo, model.config.num_layers, args.seq_len)
    if args.force_prefix:
        kept = next(g.attention_blocks for g in plan.groups if g.attention_blocks)

        def first_blocks(scores, num_kept, keep_first):
            return jnp.broadcast_to(jnp.arange(num_kept, dtype=jnp.int32), (len(scores), num_kept))

        lemo_layer.top_blocks = first_blocks  # the selection every pruned layer makes
    for window in range(args.windows):
        token_ids = jnp.asarray(validation.batch([window * len(validation) // args.windows]))
        dense = token_losses(model(token_ids), token_ids)
        result = kept_blocks(model, token_ids, plan)
        sparse = token_losses(model.logits(result.hidden), token_ids)
        if args.force_prefix:
            prefix = kept * plan.block_size - 1  # positions predicted from the kept prefix only
            print(
                f"window {window}: kept prefix max |loss difference| "
                f"{np.abs(sparse[:prefix] - dense[:prefix]).max():.3g}; dropped tokens "
                f"{dense[prefix:].mean():.3f} -> {sparse[prefix:].mean():.3f}"
            )
            continue
        blocks = np.asarray(result.kept)[:, 0]  # [L, M]
        always = blocks.all(axis=0).repeat(plan.block_size)[:-1]  # [T - 1]
        pruned = [g for g in plan.groups if g.attention_blocks is not None]
        layers = blocks[pruned[0].start : pruned[-1].stop]
        first_half = layers[:, : layers.shape[1] // 2].sum() / layers.sum()
        print(
            f"window {window}: kept in every pruned layer {always.mean():.2f} of the tokens, "
            f"loss {dense[always].mean():.3f} -> {sparse[always].mean():.3f}; the others "
            f"{dense[~always].mean():.3f} -> {sparse[~always].mean():.3f}; all "
            f"{dense.mean():.3f} -> {sparse.mean():.3f}; kept blocks in the first half "
            f"{first_half:.2f}"
        )


if __name__ == "__main__":
    main()
