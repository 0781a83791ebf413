"""Building blocks: parameters with logical axis names, RMSNorm, embedding, LoRA-capable linear.

Every parameter carries logical axis names (`embed`, `q_heads`, `kv_heads`, `mlp`, `vocab`,
`lora_rank`, and `layers` for the stacked decoder) as NNX sharding metadata. A mesh later maps
these names to devices (FSDP, data, context) without touching the model. Eager sharding is off so
models build without a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lemo_jax.configs.model import LoraConfig


def param(value: jax.Array, axes: tuple[str | None, ...], kind=nnx.Param) -> nnx.Variable:
    """A parameter tagged with logical axis names (one per dimension)."""
    if len(axes) != value.ndim:
        raise ValueError(f"{axes=} does not match {value.shape=}")
    return kind(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 as transformers does."""

    def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype):
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        # Mean of squares in fp32: bf16 sums over D=4096 would lose ~3 significant bits.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.compute_dtype) * self.scale[...].astype(self.compute_dtype)


class Embedding(nnx.Module):
    """Token embedding table [V, D]; `attend` reuses it as a tied LM head."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        init_std: float,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
    ):
        table = init_std * jax.random.normal(rngs.params(), (vocab_size, dim), param_dtype)
        self.table = param(table, ("vocab", "embed"))
        self.compute_dtype = compute_dtype

    def __call__(self, token_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        return jnp.take(self.table[...], token_ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        table = self.table[...].astype(self.compute_dtype)
        return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Linear(nnx.Module):
    """y = x W (+ b), plus an optional LoRA update (alpha / r) * dropout(x) A B.

    W is [in, out] (Hugging Face stores [out, in]; conversion transposes). A starts with PEFT's
    Kaiming-uniform init and B with zeros, so a fresh adapter leaves the output unchanged.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        init_std: float,
        use_bias: bool,
        lora: LoraConfig | None,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
    ):
        kernel = init_std * jax.random.normal(
            rngs.params(), (in_features, out_features), param_dtype
        )
        self.kernel = param(kernel, axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.compute_dtype = compute_dtype
        self.lora_scale = lora.scale if lora else 0.0
        self.lora_dropout = lora.dropout if lora else 0.0
        if lora is None:
            self.lora_a = self.lora_b = None
            return
        # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in] gives bound 1/sqrt(in).
        bound = 1.0 / math.sqrt(in_features)
        lora_a = jax.random.uniform(
            rngs.params(), (in_features, lora.rank), lora.param_jnp_dtype, -bound, bound
        )
        self.lora_a = param(lora_a, (axes[0], "lora_rank"), kind=nnx.LoRAParam)
        self.lora_b = param(
            jnp.zeros((lora.rank, out_features), lora.param_jnp_dtype),
            ("lora_rank", axes[1]),
            kind=nnx.LoRAParam,
        )

    def __call__(
        self, x: Float[Array, "... I"], *, dropout_key: jax.Array | None = None
    ) -> Float[Array, "... O"]:
        dtype = self.compute_dtype
        x = x.astype(dtype)
        y = jnp.dot(x, self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.lora_a is not None:
            x_in = _dropout(x, self.lora_dropout, dropout_key)
            down = jnp.dot(x_in, self.lora_a[...].astype(dtype))
            y = y + self.lora_scale * jnp.dot(down, self.lora_b[...].astype(dtype))
        return y


def stacked_at(stacked: nnx.Module, index) -> nnx.Module:
    """Element `index` of a module whose parameters are stacked on a leading axis (made with
    `nnx.vmap`), read by index: `index` may be traced, as inside a scan, and no slice of the
    stack is copied."""
    graphdef, state = nnx.split(stacked)
    state = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, index, 0, False), state)
    return nnx.merge(graphdef, state)
