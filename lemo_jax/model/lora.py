"""Which parameters train: LoRA adapters, LoRA plus embeddings and norms, or everything."""

from __future__ import annotations

import math

import jax
from flax import nnx

from lemo_jax.configs.model import LoraConfig

NORM_MODULES = ("attention_norm", "mlp_norm", "final_norm")


def trainable_filter(lora: LoraConfig | None) -> nnx.filterlib.Filter:
    """An NNX filter selecting the trained parameters.

    Without LoRA every `nnx.Param` trains (full fine-tuning). With LoRA only the adapters train
    (`nnx.LoRAParam` subclasses `nnx.Param`, so frozen weights are `All(Param, Not(LoRAParam))`),
    plus embeddings and RMSNorm scales when `lora.train_embeddings_and_norms` is set.
    """
    if lora is None:
        return nnx.Param
    if not lora.train_embeddings_and_norms:
        return nnx.LoRAParam
    extra = [nnx.PathContains(name) for name in ("embedding", *NORM_MODULES)]
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.Any(*extra)))


def frozen_filter(lora: LoraConfig | None) -> nnx.filterlib.Filter:
    """The complement of `trainable_filter` among parameters."""
    return nnx.All(nnx.Param, nnx.Not(trainable_filter(lora)))


def count_params(state: nnx.State) -> int:
    """Number of scalars in a state (works on abstract `ShapeDtypeStruct` leaves too)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
