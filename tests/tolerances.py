"""Relative-error tolerances for every numerical test, in one place, keyed by dtype.

Compare with `relative_error(actual, expected) = ||actual - expected|| / ||expected||`
(Frobenius, in fp32) against a reference computed in fp32, using small input scales (about
0.5 * normal) so the tests measure the algorithm rather than the rounding of large values.
Gradients are looser than activations: they go through more roundings (bf16 probabilities and
score gradients in a kernel's backward). Never 1e-1: that hides real bugs.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    forward: float  # activations of ordinary layers
    gradient: float  # gradients of ordinary layers
    # Fused attention kernels vs reference (online softmax over tiles: another summation order).
    # fp32 assumes full-fp32 matmuls in both ("highest", no TF32): measured 1e-7..6e-7 forward and
    # 4e-7..3e-6 gradients (CPU interpret and H200, T <= 4096). A TF32 path would need ~1e-3.
    attention: float
    attention_gradient: float


TOLERANCES: dict[jnp.dtype, Tolerance] = {
    jnp.dtype(jnp.float32): Tolerance(
        forward=1e-5, gradient=1e-4, attention=1e-5, attention_gradient=5e-5
    ),
    jnp.dtype(jnp.bfloat16): Tolerance(
        forward=2e-2, gradient=3e-2, attention=2e-2, attention_gradient=3e-2
    ),
}


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, Frobenius norm, computed in fp32."""
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# Hugging Face parity, fp32: lemo-jax against transformers on the same weights (issue spec).
HF_PARITY = 1e-4
# SmolLM2 from GGUF against transformers' dequantised model: logits and mean loss (absolute).
GGUF_PARITY = 1e-3
GGUF_LOSS_PARITY = 1e-4
