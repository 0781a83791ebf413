"""The one dispatch point for dense causal attention.

Backends:
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, materialises [B, N, T, S] logits;
  the CPU default and the reference the others are tested against.
- `cudnn`: cuDNN flash attention through the same JAX call; the fastest dense attention on the
  H200 (see BUILD.md), GQA-native, bf16/fp16 only.
- `pallas`: the Triton-lowered Pallas flash attention in `pallas_kernels` (interpret mode on CPU).
  Under a mesh it runs on each device's own sequences (`on_each_device`): a Pallas kernel is
  opaque to XLA's partitioner, which would otherwise gather the whole batch onto every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lemo_jax.model.batch_parallel import on_each_device


def has_ampere_gpu() -> bool:
    """Whether JAX's default device is a GPU of compute capability 8.0 or newer (Ampere,
    Hopper, ...): cuDNN's fused attention and the Pallas kernels' bfloat16 dots need it, so
    "auto" choices fall back to XLA on older GPUs such as the T4 (7.5)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    try:
        return float(device.compute_capability) >= 8.0
    except (AttributeError, TypeError, ValueError):  # not reported: assume a current GPU
        return True


def resolve_backend(backend: str, compute_dtype) -> str:
    """Maps "auto" to a concrete backend for the current device and compute dtype."""
    if backend != "auto":
        return backend
    is_half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if is_half and has_ampere_gpu() else "xla"


def causal_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K H"],
    *,
    backend: str,
) -> Float[Array, "B T N H"]:
    """Causal softmax(q k^T / sqrt(H)) v with grouped-query heads (N a multiple of K)."""
    if backend in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            query, key, value, is_causal=True, implementation=backend
        )
    if backend == "pallas":
        return _pallas_attention(query, key, value)
    raise ValueError(f"unknown attention backend {backend!r}")


@functools.partial(jax.named_call, name="pallas_flash_attention")
def _pallas_attention(query, key, value):
    # Imported here so that plain model use never loads the Pallas/Triton machinery.
    from pallas_kernels import flash_attention

    return on_each_device(functools.partial(flash_attention, causal=True), query, key, value)
