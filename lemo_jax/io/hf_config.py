"""Hugging Face `LlamaConfig` <-> `ModelConfig`: `model_config_from_hf` and its inverse."""

from __future__ import annotations

from typing import Any

import transformers

from lemo_jax.configs.model import ModelConfig, RopeConfig
from lemo_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama",)


# The keys transformers' RoPE validation accepts for each scaling type, beyond type and theta.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}


def _rope_from_hf(hf_config: Any) -> RopeConfig:
    # transformers 5 keeps RoPE settings in `rope_parameters`; older configs use `rope_scaling`
    # plus a top-level `rope_theta`. Read both.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = dict(getattr(hf_config, "rope_scaling", None) or {})
    for key, value in legacy.items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10_000.0))
    scaling = params.get("rope_type", params.get("type", "default"))
    if scaling not in ("default", "linear", "llama3", "yarn"):
        raise UserError(f"unsupported RoPE scaling type {scaling!r} in the model config")
    original = params.get("original_max_position_embeddings")
    if scaling == "yarn" and original is None:
        original = hf_config.max_position_embeddings
    optional = {
        key: params[key]
        for key in _ROPE_KEYS[scaling]
        if key not in ("factor", "original_max_position_embeddings") and params.get(key) is not None
    }
    return RopeConfig(
        theta=float(theta),
        scaling=scaling,
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=original,
        **optional,
    )


def model_config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a transformers config object; `overrides` replace fields."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported architecture {model_type!r}: lemo-jax loads Llama-family models "
            f"(model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))})"
        )
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    fields = dict(
        vocab_size=hf_config.vocab_size,
        model_dim=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        mlp_dim=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=float(hf_config.rms_norm_eps),
        rope=_rope_from_hf(hf_config),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        use_attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        use_mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise UserError(f"invalid model config: {err}") from None


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    # transformers 5 `rope_parameters`; unset optional fields (None) are left out so that
    # transformers applies its own defaults, as `_rope_from_hf` does when reading.
    params: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling}
    for key in _ROPE_KEYS[rope.scaling]:
        value = getattr(rope, key)
        if value is not None:
            params[key] = value
    return params


def hf_config_from_model_config(
    config: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> transformers.LlamaConfig:
    """The `LlamaConfig` describing `config`: the inverse of `model_config_from_hf`.

    Dtypes and the attention backend are not architecture and are not written; the caller sets
    `dtype` for the tensors it saves.
    """
    try:
        return transformers.LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.model_dim,
            intermediate_size=config.mlp_dim,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.norm_eps,
            rope_parameters=_rope_to_hf(config.rope),
            tie_word_embeddings=config.tie_embeddings,
            attention_bias=config.use_attention_bias,
            mlp_bias=config.use_mlp_bias,
            initializer_range=config.initializer_range,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"the model config has no Hugging Face Llama equivalent: {err}") from None
