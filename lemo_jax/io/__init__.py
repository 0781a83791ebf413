"""Checkpoint and Hugging Face IO. The rest of lemo-jax never touches file formats directly."""

from lemo_jax.io.load import load_pretrained, load_tokenizer
from lemo_jax.io.sources import BUILTIN_MODELS, resolve_source

__all__ = ["BUILTIN_MODELS", "load_pretrained", "load_tokenizer", "resolve_source"]
