"""Pallas kernels for lemo-jax, one op per file, each with a plain-jnp `..._reference`.

The kernels are written Triton-style (`pl.pallas_call` with Triton compiler params): they compile
to Triton on a GPU and run in Pallas' interpreter elsewhere, so CPU tests exercise the same code.
This package never imports `lemo_jax`; the model reaches each kernel through one dispatch point.

- `flash_attention`: causal / non-causal GQA attention, layout BTNH, fused forward and backward.
- `block_scores`: LeMo's key-block scores (paper eq. 2) for token elimination: a fused kernel
  (no logits in memory) and a tiled XLA path.
- `gather_rmsnorm`: selective load, the kept rows of the residual stream gathered and
  RMS-normalised in one pass.
- `scatter_add_rows`: in-place residual addition of a compacted sublayer's output.
"""

from pallas_kernels.block_scores import block_scores, block_scores_reference
from pallas_kernels.flash_attention import (
    MASK_VALUE,
    AttentionBlockSizes,
    flash_attention,
    flash_attention_reference,
)
from pallas_kernels.residual_add import scatter_add_rows, scatter_add_rows_reference
from pallas_kernels.selective_load import gather_rmsnorm, gather_rmsnorm_reference

__all__ = [
    "MASK_VALUE",
    "AttentionBlockSizes",
    "block_scores",
    "block_scores_reference",
    "flash_attention",
    "flash_attention_reference",
    "gather_rmsnorm",
    "gather_rmsnorm_reference",
    "scatter_add_rows",
    "scatter_add_rows_reference",
]
