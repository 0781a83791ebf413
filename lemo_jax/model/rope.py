"""Rotary position embeddings in the half-split ("rotate_half") layout of Hugging Face Llama.

Inverse frequencies are computed in float32 with the same operations as transformers'
`modeling_rope_utils`, because at 64K positions an error of one float32 ulp in a frequency
already moves the angle by ~1e-3 rad. Keeping the half-split layout (not interleaved pairs) means
Hugging Face q/k weights load with transposes only.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lemo_jax.configs.model import RopeConfig

f32 = np.float32


def _base_frequencies(theta: float, head_dim: int) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    return (f32(1.0) / (f32(theta) ** exponents)).astype(f32)


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    # Llama-3.1: long wavelengths are interpolated by `factor`, short ones kept, and the band in
    # between blended linearly in 1/wavelength.
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(rope.factor), inv_freq).astype(f32)
    smooth = (
        (old_context / wavelen - rope.low_freq_factor)
        / (rope.high_freq_factor - rope.low_freq_factor)
    ).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(rope.factor) + smooth * scaled).astype(f32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(f32)


def _yarn_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def mscale(scale: float, coefficient: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def _yarn(rope: RopeConfig, head_dim: int) -> np.ndarray:
    # YaRN (Peng et al. 2023): dimensions that rotate fewer than `beta_slow` times over the
    # original context are interpolated, those rotating more than `beta_fast` are extrapolated,
    # with a linear ramp between.
    original = rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    position_freqs = f32(rope.theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim))
    extrapolation = (f32(1.0) / position_freqs).astype(f32)
    interpolation = (f32(1.0) / (f32(rope.factor) * position_freqs)).astype(f32)
    ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
    extrapolation_weight = (f32(1.0) - ramp.astype(f32)).astype(f32)
    return (
        interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    ).astype(f32)


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Returns float32 [H/2] inverse frequencies and the factor applied to cos and sin."""
    if rope.scaling == "yarn":
        return _yarn(rope, head_dim), _yarn_attention_factor(rope)
    inv_freq = _base_frequencies(rope.theta, head_dim)
    if rope.scaling == "linear":
        inv_freq = (inv_freq / f32(rope.factor)).astype(f32)
    elif rope.scaling == "llama3":
        inv_freq = _llama3(rope, inv_freq)
    return inv_freq, 1.0


def rotary_angles(
    rope: RopeConfig, head_dim: int, positions: Int[Array, "B T"]
) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos and sin tables in float32 for the given positions (original positions under LeMo)."""
    inv_freq, attention_factor = inverse_frequencies(rope, head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rotary(
    x: Float[Array, "B T N H"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
) -> Float[Array, "B T N H"]:
    """x * cos + rotate_half(x) * sin, in float32, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
