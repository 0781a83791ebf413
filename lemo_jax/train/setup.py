"""Turning a `RunConfig` into the things a run needs: model, tokenizer, run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from lemo_jax.configs.model import LoraConfig, ModelConfig, RopeConfig
from lemo_jax.configs.overrides import config_differences, config_from_dict, config_to_dict
from lemo_jax.configs.registry import get_model_config
from lemo_jax.configs.run import ModelSection, RunConfig
from lemo_jax.errors import UserError
from lemo_jax.files import is_temporary, write_text_atomically
from lemo_jax.io.load import load_pretrained, load_tokenizer, pretrained_config
from lemo_jax.lemo.config import LemoConfig
from lemo_jax.lemo.predictor import BlockScorePredictor, PredictorConfig, load_predictor
from lemo_jax.model.llama import Llama
from lemo_jax.train.sharding import build_sharded

RUN_CONFIG_FILE = "run_config.json"
# Fields that may change when a run is resumed: where it lives, how long it runs and how it
# reports, not what its steps so far computed.
RESUMABLE_CHANGES = (
    "output_dir",  # a run directory may be moved or copied and resumed there
    "train.steps",
    "lemo.dense_final_steps",  # like train.steps, it only decides the steps still to run
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "checkpoint",
    "mesh",  # checkpoints restore under any mesh
    "export_after",
    "perplexity_before_after",
    "name",
)


def resolve_compute_dtype(section: ModelSection) -> str:
    if section.compute_dtype != "auto":
        return section.compute_dtype
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def _scaled_rope(base: ModelConfig, section: ModelSection) -> tuple[RopeConfig, int]:
    """The RoPE the run trains with, and the context length it targets."""
    if section.rope_scaling is None:
        return base.rope, base.max_position_embeddings
    rope = RopeConfig(
        theta=base.rope.theta,
        scaling=section.rope_scaling,
        factor=section.rope_factor,
        original_max_position_embeddings=base.max_position_embeddings,
    )
    return rope, int(base.max_position_embeddings * section.rope_factor)


def model_config_for(section: ModelSection, *, seq_len: int) -> ModelConfig:
    """The architecture a run trains (the checkpoint's or the preset's), with the run's dtypes,
    attention backend and RoPE scaling; reads no weights."""
    if section.init == "pretrained" and section.path is None:
        raise UserError(
            "no model weights given: --set model.path=DIR (a Hugging Face "
            "directory or .gguf file) or --set model.init=random"
        )
    if section.init == "random" and section.preset is None:
        raise UserError("model.init=random needs model.preset (a model shape such as llama2_7b)")
    pretrained = section.init == "pretrained"
    base = pretrained_config(section.path) if pretrained else get_model_config(section.preset)
    rope, context = _scaled_rope(base, section)
    return dataclasses.replace(
        base,
        param_dtype=section.param_dtype,
        compute_dtype=resolve_compute_dtype(section),
        rope=rope,
        attention_backend=section.attention_backend,
        max_position_embeddings=max(context, seq_len),
    )


def build_model(
    section: ModelSection,
    lora: LoraConfig | None,
    *,
    seq_len: int,
    seed: int,
    mesh: Mesh | None = None,
) -> tuple[Llama, object]:
    """The model to fine-tune (LoRA adapters fresh) and its tokenizer. With `mesh`, every
    parameter is created (or loaded) straight onto its sharding, so the whole model never sits
    on one device; random weights are the same under any mesh."""
    config = model_config_for(section, seq_len=seq_len)
    if section.init == "pretrained":
        model = load_pretrained(
            section.path,
            dtype=config.param_dtype,
            compute_dtype=config.compute_dtype,
            lora=lora,
            rope=config.rope,
            attention_backend=config.attention_backend,
            max_position_embeddings=config.max_position_embeddings,
            seed=seed,
            mesh=mesh,
        )
        return model, load_tokenizer(section.path)
    if mesh is None:
        model = Llama(config, lora=lora, rngs=nnx.Rngs(seed))
    else:
        model = build_sharded(lambda: Llama(config, lora=lora, rngs=nnx.Rngs(seed)), mesh)
    tokenizer = load_tokenizer(section.path) if section.path else _byte_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but model.preset="
            f"{section.preset} has a vocabulary of {config.vocab_size}"
        )
    return model, tokenizer


def predictor_config_for(model_config: ModelConfig, lemo: LemoConfig) -> PredictorConfig:
    """The predictor shapes a model needs: head-dim chunks of the model dim, LeMo's blocks,
    and for the `heads` architecture `lemo.predictor_heads` of the model's query heads."""
    heads = PredictorConfig.heads  # only the `heads` architecture reads it
    if lemo.predictor_architecture == "heads":
        heads = lemo.predictor_heads
        if heads > model_config.num_heads:
            raise UserError(
                f"lemo.predictor_heads={heads} is more than the model's "
                f"{model_config.num_heads} query heads"
            )
    return PredictorConfig(
        num_layers=model_config.num_layers,
        model_dim=model_config.model_dim,
        chunk_dim=model_config.head_dim,
        block_size=lemo.block_size,
        architecture=lemo.predictor_architecture,
        mlp=lemo.mlp == "token_sparse",
        heads=heads,
    )


def attach_predictors(model: Llama, lemo: LemoConfig, *, random_seed: int | None = None) -> None:
    """Gives `model` the block-score predictors a LeMo run with `lemo.scorer=predictor` needs:
    those saved in `lemo.predictor_path`, or (with `random_seed`, for speed and memory work)
    untrained ones of the right shape. Nothing for other runs."""
    if not (lemo.enabled and lemo.scorer == "predictor"):
        return
    expected = predictor_config_for(model.config, lemo)
    if random_seed is not None:
        model.block_predictor = BlockScorePredictor(expected, nnx.Rngs(random_seed))
    else:
        model.block_predictor = load_predictor(lemo.predictor_path, expected=expected)


def _byte_tokenizer():
    # Random weights have no tokenizer of their own; UTF-8 bytes need no vocabulary file.
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def check_run_directory(config: RunConfig) -> Path:
    """The run directory, after checking that it is new, empty, or holds this same run.

    Nothing is written: the directory and its `run_config.json` are created by
    `write_run_config` once the model and data have loaded, so a run that fails on bad input
    leaves nothing behind.
    """
    directory = Path(config.output_dir).expanduser()
    saved = directory / RUN_CONFIG_FILE
    if saved.is_file():
        try:
            previous = config_from_dict(RunConfig, json.loads(saved.read_text()))
        except (ValueError, UserError) as err:
            raise UserError(f"{saved} is unreadable ({err}); use another output_dir") from None
        differences = config_differences(previous, config, ignore=RESUMABLE_CHANGES)
        if differences:
            raise UserError(
                f"{directory} holds a different run (differs in "
                f"{', '.join(differences)}); set another output_dir or remove it"
            )
    elif directory.exists() and (
        not directory.is_dir() or any(not is_temporary(entry) for entry in directory.iterdir())
    ):
        raise UserError(
            f"{directory} exists and is not a lemo-jax run directory; set another output_dir"
        )
    return directory


def write_run_config(directory: Path, config: RunConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config_to_dict(config), indent=2) + "\n"
    write_text_atomically(directory / RUN_CONFIG_FILE, text)  # never a half-written config
