"""Named model presets: `get_model_config("llama2_7b")`.

Presets are plain functions returning a `ModelConfig`, registered by name. Random-weight
presets of real shapes (Llama-2-7B, Llama-3-8B) are what speed and memory work runs on; `tiny`
is for tests; `smollm2_135m` matches the packaged SmolLM2 checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lemo_jax.configs.model import ModelConfig, RopeConfig
from lemo_jax.errors import UserError

_MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_model(name: str):
    """Decorator adding a zero-argument `ModelConfig` factory to the registry under `name`."""

    def decorate(factory: Callable[[], ModelConfig]):
        if name in _MODEL_PRESETS:
            raise ValueError(f"model preset {name!r} is registered twice")
        _MODEL_PRESETS[name] = factory
        return factory

    return decorate


def model_preset_names() -> list[str]:
    return sorted(_MODEL_PRESETS)


def get_model_config(name: str) -> ModelConfig:
    try:
        factory = _MODEL_PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown model preset {name!r}; known presets: {', '.join(model_preset_names())}"
        ) from None
    return factory()


@register_model("tiny")
def tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=512,  # room for the 384-token byte tokenizer used with random weights
        model_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        max_position_embeddings=4096,
    )


@register_model("smollm2_135m")
def smollm2_135m() -> ModelConfig:
    return ModelConfig(
        vocab_size=49_152,
        model_dim=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        mlp_dim=1536,
        max_position_embeddings=8192,
        rope=RopeConfig(theta=100_000.0),
        tie_embeddings=True,
        initializer_range=0.041666666666666664,
    )


@register_model("llama2_7b")
def llama2_7b() -> ModelConfig:
    return ModelConfig(
        vocab_size=32_000,
        model_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        mlp_dim=11_008,
        max_position_embeddings=4096,
    )


@register_model("llama3_8b")
def llama3_8b() -> ModelConfig:
    return ModelConfig(
        vocab_size=128_256,
        model_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14_336,
        max_position_embeddings=8192,
        rope=RopeConfig(theta=500_000.0),
    )


@register_model("llama3_1_8b")
def llama3_1_8b() -> ModelConfig:
    """Llama-3.1-8B: the Llama-3 shape with "llama3" RoPE scaling to 128K positions."""
    rope = RopeConfig(
        theta=500_000.0,
        scaling="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    return dataclasses.replace(llama3_8b(), max_position_embeddings=131_072, rope=rope)
