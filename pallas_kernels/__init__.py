"""Pallas kernels for lemo-jax, one op per file, each with a plain-jnp `..._reference`.

The kernels are written Triton-style (`pl.pallas_call` with Triton compiler params): they compile
to Triton on a GPU and run in Pallas' interpreter elsewhere, so CPU tests exercise the same code.
This package never imports `lemo_jax`; the model reaches each kernel through one dispatch point.

- `flash_attention`: causal / non-causal GQA attention, layout BTNH, fused forward and backward.
- `block_scores`: LeMo's key-block scores (paper eq. 2) for token elimination, tiled over query
  blocks (XLA path; the Pallas kernel comes later).
"""

from pallas_kernels.block_scores import block_scores, block_scores_reference
from pallas_kernels.flash_attention import (
    MASK_VALUE,
    AttentionBlockSizes,
    flash_attention,
    flash_attention_reference,
)

__all__ = [
    "MASK_VALUE",
    "AttentionBlockSizes",
    "block_scores",
    "block_scores_reference",
    "flash_attention",
    "flash_attention_reference",
]
