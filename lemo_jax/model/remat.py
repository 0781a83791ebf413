"""Rematerialisation (activation checkpointing) policies for the decoder layer, by name.

The scan over layers always keeps each layer's input (the carry). The policy decides what else a
layer saves for the backward pass instead of recomputing it:

- `none`: every activation (no recomputation; the paper's "without recomputation" setting).
  Not saved, because the backward pass gets them again for free: the layer's parameters as
  read from the [L] stack and cast to the compute dtype (saved, each read would be stacked
  into a scan output: a copy of the group's weights, which the compiler elides only for one
  scan over the whole stack; 12 GiB for Llama-2-7B split into LeMo's layer groups), and
  upcasts (an fp32 copy of a bf16 tensor that is saved anyway).
- `full`: nothing; the whole layer is recomputed (lowest memory).
- `dots`: every matmul output; elementwise work is recomputed.
- `dots_no_batch`: matmul outputs without batch dimensions (the projections, not attention).
- `save_attention`: the named tensors `query`, `key`, `value` and `attention_out`, so the
  backward pass recomputes the cheap projections but not the attention inputs and output.
- `save_attention_output`: what a flash-attention kernel's backward needs besides q, k, v (its
  output and softmax statistics: cuDNN's forward outputs, or the Pallas kernel's named
  residuals), so the backward pass recomputes the projections, norms and MLP but never the
  attention forward, the costliest op at long context. One [B, T, N, H] output per layer plus
  [B, N, T] fp32 statistics. With XLA attention nothing is kept (it has no such kernel) and
  the layer is recomputed as under `full`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.flash_attention import RESIDUAL_NAMES as PALLAS_ATTENTION_RESIDUALS

ATTENTION_NAMES = ("query", "key", "value", "attention_out")

# cuDNN flash attention's forward primitive (jax._src.cudnn.fused_attention_stablehlo); its
# outputs are the attention output and the softmax statistics.
_CUDNN_ATTENTION_FORWARD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")
# Not the layer's `attention_out` too: that is the same values under another name, and a layer
# scan stacks each saved variable into its own [L, ...] buffer, so saving both kept every output
# twice (measured on the H200 at 64K tokens: 68.7 GiB against 38.8 GiB with `full`).
_save_pallas_residuals = jax.checkpoint_policies.save_only_these_names(*PALLAS_ATTENTION_RESIDUALS)


def _save_activations(prim, *avals, **params) -> bool:
    """The `none` policy: not reads of one layer from a parameter stack (`stacked_at`: a
    dynamic_slice of one leading row, then a squeeze), nor casts of parameters (at most 2-D:
    every activation has batch and token axes) or upcasts; everything else."""
    if prim.name == "squeeze":
        return False
    if prim.name == "dynamic_slice":
        operand = avals[0]
        return tuple(params["slice_sizes"]) != (1, *operand.shape[1:])
    if prim.name == "convert_element_type":
        operand = avals[0]
        upcast = np.dtype(params["new_dtype"]).itemsize > np.dtype(operand.dtype).itemsize
        return not (upcast or operand.ndim <= 2)
    return True


def _save_attention_output(prim, *avals, **params) -> bool:
    return prim.name in _CUDNN_ATTENTION_FORWARD or _save_pallas_residuals(prim, *avals, **params)


_POLICIES = {
    "none": _save_activations,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES),
    "save_attention_output": _save_attention_output,
}
REMAT_POLICIES = tuple(_POLICIES)


def remat(function: Callable, policy: str, *, scan_length: int) -> Callable:
    """`function` wrapped in `jax.checkpoint` with the named policy.

    `scan_length` is the trip count of the `lax.scan` whose body this is. A loop already keeps
    XLA from merging the backward pass's recomputation with the forward pass (CSE), so the
    barrier is dropped there; but XLA inlines a loop of one trip, and without the barrier the
    recomputation would be merged away and every activation kept (measured: 8 one-layer groups
    used 5.9x the memory of one 8-layer group).
    """
    if policy not in _POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {REMAT_POLICIES}")
    return jax.checkpoint(function, policy=_POLICIES[policy], prevent_cse=scan_length == 1)


__all__ = ["ATTENTION_NAMES", "REMAT_POLICIES", "checkpoint_name", "remat"]
