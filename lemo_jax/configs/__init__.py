"""Configuration dataclasses and the registry of named presets."""

from lemo_jax.configs.model import LoraConfig, ModelConfig, RopeConfig
from lemo_jax.configs.registry import get_model_config, model_preset_names, register_model

__all__ = [
    "LoraConfig",
    "ModelConfig",
    "RopeConfig",
    "get_model_config",
    "model_preset_names",
    "register_model",
]
