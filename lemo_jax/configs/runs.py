"""Named fine-tuning runs: `scripts/finetune.py --config NAME`.

Each entry is a function returning a `RunConfig`; `--set a.b=value` then overrides fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lemo_jax.configs.model import LORA_TARGETS, LoraConfig
from lemo_jax.configs.run import (
    CheckpointSection,
    DataSection,
    ModelSection,
    RunConfig,
    TrainSection,
)
from lemo_jax.errors import UserError
from lemo_jax.lemo.config import LemoConfig

_RUNS: dict[str, Callable[[], RunConfig]] = {}


def register_run(factory: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    name = factory.__name__
    if name in _RUNS:
        raise ValueError(f"run config {name!r} is registered twice")
    _RUNS[name] = factory
    return factory


def run_names() -> list[str]:
    return sorted(_RUNS)


def get_run_config(name: str) -> RunConfig:
    if name not in _RUNS:
        raise UserError(f"unknown config {name!r}; available: {', '.join(run_names())}")
    return _RUNS[name]()


@register_run
def tiny() -> RunConfig:
    """Random tiny model, byte tokens, seconds on a CPU (used by the tests)."""
    return RunConfig(
        name="tiny",
        output_dir="runs/tiny",
        model=ModelSection(init="random", preset="tiny", compute_dtype="float32"),
        lora=LoraConfig(rank=4, alpha=8.0),
        train=TrainSection(
            seq_len=128, steps=20, learning_rate=3e-3, warmup_steps=2, eval_every=10, eval_batches=2
        ),
        checkpoint=CheckpointSection(every=10, keep=2),
    )


@register_run
def smollm2_demo() -> RunConfig:
    """Real SmolLM2-135M, LoRA on the built-in corpus; under 10 minutes on a 2-core CPU.

    A higher learning rate than the paper's 2e-5, so that 24 steps visibly lower the validation
    perplexity.
    """
    return RunConfig(
        name="smollm2_demo",
        output_dir="runs/smollm2_demo",
        model=ModelSection(path="smollm2-135m"),
        lora=LoraConfig(rank=8, alpha=16.0),
        train=TrainSection(
            seq_len=1024, steps=24, learning_rate=1e-3, warmup_steps=4, eval_batches=4
        ),
        checkpoint=CheckpointSection(every=8, keep=2),
        export_after=True,
        perplexity_before_after=True,
    )


@register_run
def smollm2_32k() -> RunConfig:
    """SmolLM2-135M extended from 8K to 32K tokens by linear position interpolation (GPU)."""
    return RunConfig(
        name="smollm2_32k",
        output_dir="runs/smollm2_32k",
        model=ModelSection(path="smollm2-135m", rope_scaling="linear", rope_factor=4.0),
        lora=LoraConfig(rank=8, alpha=16.0, train_embeddings_and_norms=True),
        train=TrainSection(
            seq_len=32_768,
            steps=200,
            learning_rate=2e-5,
            warmup_steps=20,
            eval_every=50,
            eval_batches=4,
        ),
        checkpoint=CheckpointSection(every=50, keep=2),
        export_after=True,
        perplexity_before_after=True,
    )


@register_run
def smollm2_accuracy() -> RunConfig:
    """The quality experiment's shared recipe (scripts/accuracy.py, docs/ACCURACY.md):
    SmolLM2-135M from 8K to 32K tokens by linear position interpolation, plain LoRA r=8 on all
    seven projections (so every arm's adapter exports as a small PEFT adapter), 400 steps of 32K
    tokens at a learning rate of 1e-3. The first recipe (q, k, v, o only, 1e-4, 200 steps) left
    dense LoRA at perplexity 14 at 4K against the base model's 6.3 (docs/ACCURACY.md)."""
    base = smollm2_32k()
    return dataclasses.replace(
        base,
        name="smollm2_accuracy",
        output_dir="runs/smollm2_accuracy",
        lora=LoraConfig(rank=8, alpha=16.0, targets=LORA_TARGETS),
        train=dataclasses.replace(
            base.train,
            learning_rate=1e-3,
            steps=400,
            eval_every=0,
            remat="save_attention_output",
        ),
        checkpoint=CheckpointSection(every=100, keep=1),
        # LeMo arms end with 40 dense steps (10%), so their adapters end on the dense forward
        # pass they are evaluated with (docs/ACCURACY.md measures both).
        lemo=dataclasses.replace(base.lemo, dense_final_steps=40),
        export_after=False,
        perplexity_before_after=False,
    )


def _paper_recipe(name: str, preset: str, *, rope_scaling: str, rope_factor: float) -> RunConfig:
    """The paper's fine-tuning recipe: LoRA r=8 alpha=16 on q,k,v,o; AdamW (0.9, 0.95); lr 2e-5,
    20 warm-up steps then constant; batch 1; 65,536 tokens; recomputation of all but attention;
    LeMo with the end-to-end rule of the paper's runs (`paper_e2e`). The frozen base weights are
    bfloat16 (as in the paper and in PEFT fine-tuning); the adapters and optimizer state stay
    float32."""
    return RunConfig(
        name=name,
        output_dir=f"runs/{name}",
        model=ModelSection(
            init="pretrained",
            path=None,
            preset=preset,
            param_dtype="bfloat16",
            rope_scaling=rope_scaling,
            rope_factor=rope_factor,
        ),
        lora=LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        train=TrainSection(
            seq_len=65_536,
            steps=1000,
            learning_rate=2e-5,
            warmup_steps=20,
            adam_b1=0.9,
            adam_b2=0.95,
            # Recompute each layer except its flash-attention output and statistics: the
            # backward never reruns attention (the costliest op at 64K). On the H200 at 64K
            # tokens: dense 11.0 s against 13.0 s with "full". Use "full" for the longest
            # contexts (it keeps only each layer's input).
            remat="save_attention_output",
            eval_every=250,
            eval_batches=2,
        ),
        checkpoint=CheckpointSection(every=100, keep=2),
        data=DataSection(),
        lemo=LemoConfig(enabled=True, schedule="paper_e2e"),
    )


@register_run
def llama2_7b_64k() -> RunConfig:
    """Llama-2-7B at 64K tokens, position interpolation factor 16 (4K -> 64K)."""
    return _paper_recipe("llama2_7b_64k", "llama2_7b", rope_scaling="linear", rope_factor=16.0)


@register_run
def llama_64k() -> RunConfig:
    """The same as `llama2_7b_64k` (the name the README uses)."""
    return dataclasses.replace(llama2_7b_64k(), name="llama_64k", output_dir="runs/llama_64k")


@register_run
def llama3_8b_64k() -> RunConfig:
    """Llama-3-8B at 64K tokens with Llama-3.1's "llama3" RoPE scaling (factor 8 over 8K)."""
    return _paper_recipe("llama3_8b_64k", "llama3_8b", rope_scaling="llama3", rope_factor=8.0)
