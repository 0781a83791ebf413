"""Times the model's forward pass per attention backend (random weights of a preset's shape).

    python scripts/bench_forward.py --config llama2_7b --seq-len 8192 --backends cudnn,pallas,xla

Prints a Markdown table: best-of-N forward time, first-call (compile) time, and the compiled
program's temporary memory, which is exact per configuration (the runtime peak is per process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lemo_jax.configs import get_model_config
from lemo_jax.configs.model import ATTENTION_BACKENDS
from lemo_jax.errors import UserError, run_cli
from lemo_jax.model import Llama


def measure(config, seq_len: int, repeats: int) -> dict:
    model = Llama(config, rngs=nnx.Rngs(0))
    token_ids = jax.random.randint(jax.random.key(1), (1, seq_len), 0, config.vocab_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, token_ids):  # the mean keeps [T, D] from being an output
        return nnx.merge(graphdef, state).hidden_states(token_ids).astype(jnp.float32).mean()

    started = time.perf_counter()
    compiled = forward.lower(state, token_ids).compile()
    float(compiled(state, token_ids))
    first_call = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        float(compiled(state, token_ids))
        times.append(time.perf_counter() - started)
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    return dict(forward_s=min(times), first_call_s=first_call, temp_gib=temp_bytes / 2**30)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="llama2_7b", help="model preset")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--backends", default="cudnn,pallas,xla")
    parser.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(ATTENTION_BACKENDS))
    if unknown:
        raise UserError(f"unknown backends {unknown}; choose from {ATTENTION_BACKENDS}")
    rows = []
    for backend in backends:
        config = dataclasses.replace(
            get_model_config(args.config),
            param_dtype=args.dtype,
            compute_dtype=args.dtype,
            attention_backend=backend,
        )
        row = dict(
            config=args.config,
            seq_len=args.seq_len,
            backend=backend,
            device=jax.devices()[0].device_kind,
            **measure(config, args.seq_len, args.repeats),
        )
        rows.append(row)
    if args.json:
        with open(args.json, "w") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in rows)
    print("| backend | tokens | forward (s) | first call (s) | compiled temp memory (GiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['seq_len']} | {row['forward_s']:.3f} | "
            f"{row['first_call_s']:.1f} | {row['temp_gib']:.1f} |"
        )


if __name__ == "__main__":
    run_cli(main)
