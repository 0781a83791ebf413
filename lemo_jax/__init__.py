"""lemo-jax: long-context fine-tuning of Llama-family models in JAX with contextual token sparsity.

Public entry points:
    load_pretrained(path_or_name, *, dtype=...)  -> Llama
    load_tokenizer(path_or_name)
    get_model_config(name)                        -> ModelConfig
"""

from lemo_jax.configs import LoraConfig, ModelConfig, RopeConfig, get_model_config
from lemo_jax.errors import UserError
from lemo_jax.io import load_pretrained, load_tokenizer
from lemo_jax.model import Llama

__all__ = [
    "Llama",
    "LoraConfig",
    "ModelConfig",
    "RopeConfig",
    "UserError",
    "get_model_config",
    "load_pretrained",
    "load_tokenizer",
]
__version__ = "0.1.0"
