"""Typed model configuration: architecture, RoPE scaling and LoRA.

All configs are frozen dataclasses whose invariants are checked in `__post_init__`, so a bad value
fails where it is written, with a message that names the field. Dtypes are stored as names
("float32", "bfloat16") so that `--set model.param_dtype=bfloat16` overrides stay plain strings.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "pallas")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_dtype(field: str, name: str) -> None:
    _check(name in DTYPES, f"{field}={name!r} is not one of {sorted(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding with the scaling types of Hugging Face transformers.

    `linear` is position interpolation (positions divided by `factor`); `llama3` is Llama-3.1's
    wavelength-dependent interpolation; `yarn` blends interpolated and extrapolated frequencies
    and scales cos/sin by an attention factor. Field names follow transformers' `rope_parameters`.
    """

    theta: float = 10_000.0
    scaling: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _check(self.theta > 0, f"rope.theta must be positive, got {self.theta}")
        _check(
            self.scaling in ROPE_SCALINGS,
            f"rope.scaling={self.scaling!r} is not one of {ROPE_SCALINGS}",
        )
        _check(self.factor > 0, f"rope.factor must be positive, got {self.factor}")
        if self.scaling in ("llama3", "yarn"):
            _check(
                self.original_max_position_embeddings is not None,
                f"rope.scaling={self.scaling!r} needs rope.original_max_position_embeddings",
            )
        if self.scaling == "llama3":
            _check(
                self.high_freq_factor > self.low_freq_factor,
                "rope.high_freq_factor must be larger than rope.low_freq_factor",
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

    vocab_size: int
    model_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_embeddings: bool = False
    use_attention_bias: bool = False
    use_mlp_bias: bool = False
    # Parameters may be stored in fp32 (exact optimizer updates) while matmuls run in bf16.
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # "auto": cuDNN flash attention on a GPU with a 16-bit compute dtype, XLA otherwise.
    attention_backend: str = "auto"
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive")
        _check(self.head_dim > 0 and self.head_dim % 2 == 0, "model.head_dim must be even")
        _check(self.mlp_dim > 0, "model.mlp_dim must be positive")
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads={self.num_heads} must be a multiple of "
            f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention)",
        )
        _check(self.norm_eps > 0, "model.norm_eps must be positive")
        _check_dtype("model.param_dtype", self.param_dtype)
        _check_dtype("model.compute_dtype", self.compute_dtype)
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"model.attention_backend={self.attention_backend!r} is not one of "
            f"{ATTENTION_BACKENDS}",
        )

    @property
    def num_params(self) -> int:
        """Base parameter count (no LoRA), computed from the shapes."""
        attention = self.model_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.use_attention_bias:
            attention += self.head_dim * (self.num_heads + 2 * self.num_kv_heads) + self.model_dim
        mlp = 3 * self.model_dim * self.mlp_dim
        if self.use_mlp_bias:
            mlp += 2 * self.mlp_dim + self.model_dim
        per_layer = attention + mlp + 2 * self.model_dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.model_dim
        return (
            self.num_layers * per_layer + self.vocab_size * self.model_dim + head + self.model_dim
        )

    @property
    def param_jnp_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def compute_jnp_dtype(self):
        return DTYPES[self.compute_dtype]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) as PEFT defines them: W x + (alpha / rank) B A x.

    `train_embeddings_and_norms` also trains the embedding table and every RMSNorm scale, which
    LongLoRA ("LoRA+") found necessary for context extension. The adapters are stored in
    `param_dtype` (float32 by default, as PEFT does) whatever the base weights' dtype: AdamW steps
    of 2e-5 would round away in bfloat16 weights.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_embeddings_and_norms: bool = False
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_dtype("lora.param_dtype", self.param_dtype)
        _check(self.rank > 0, f"lora.rank must be positive, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.targets) > 0, "lora.targets must name at least one projection")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        _check(not unknown, f"lora.targets has unknown names {unknown}; known: {LORA_TARGETS}")
        _check(math.isfinite(self.alpha), "lora.alpha must be finite")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def param_jnp_dtype(self):
        return DTYPES[self.param_dtype]
