"""Hugging Face `LlamaConfig` <-> `ModelConfig`."""

from __future__ import annotations

from typing import Any

from lemo_jax.configs.model import ModelConfig, RopeConfig
from lemo_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama",)


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
        for key in (
            "low_freq_factor",
            "high_freq_factor",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        )
        if params.get(key) is not None
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
