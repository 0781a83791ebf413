"""The Llama-family decoder in Flax NNX, with stacked (scanned) layers.

The L decoder layers are one `DecoderLayer` whose parameters have a leading [L] axis, run with
`lax.scan`: one layer is traced and compiled once, whatever the depth. Dropout keys are explicit
arguments rather than NNX RNG state, so the layer stays a pure function inside the scan.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lemo_jax.configs.model import LoraConfig, ModelConfig
from lemo_jax.lemo.layer import (
    EliminationPlan,
    GroupPlan,
    attention_token_ids,
    eliminated_attention,
    token_sparse_mlp,
)
from lemo_jax.model.attention import causal_attention, resolve_backend
from lemo_jax.model.batch_parallel import constrain_to_batch
from lemo_jax.model.layers import Embedding, Linear, RMSNorm, stacked_at
from lemo_jax.model.remat import checkpoint_name, remat
from lemo_jax.model.rope import apply_rotary, rotary_angles

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear(
    config: ModelConfig,
    lora: LoraConfig | None,
    name: str,
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    use_bias: bool,
    rngs: nnx.Rngs,
) -> Linear:
    use_lora = lora is not None and name in lora.targets
    return Linear(
        in_features,
        out_features,
        axes=axes,
        init_std=config.initializer_range,
        use_bias=use_bias,
        lora=lora if use_lora else None,
        param_dtype=config.param_jnp_dtype,
        compute_dtype=config.compute_jnp_dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; K/V heads are never repeated in memory."""

    def __init__(self, config: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
        D, N, K, H = config.model_dim, config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.use_attention_bias
        self.q_proj = _linear(config, lora, "q_proj", D, N * H, ("embed", "q_heads"), bias, rngs)
        self.k_proj = _linear(config, lora, "k_proj", D, K * H, ("embed", "kv_heads"), bias, rngs)
        self.v_proj = _linear(config, lora, "v_proj", D, K * H, ("embed", "kv_heads"), bias, rngs)
        self.o_proj = _linear(config, lora, "o_proj", N * H, D, ("q_heads", "embed"), bias, rngs)
        self.shape = (N, K, H)
        self.backend = resolve_backend(config.attention_backend, config.compute_jnp_dtype)

    def rotated_query_key(
        self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
    ) -> tuple[Float[Array, "B T N H"], Float[Array, "B T K H"]]:
        """Queries and keys after RoPE, without dropout (what the block scorer reads)."""
        N, K, H = self.shape
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, N, H)
        k = self.k_proj(x).reshape(B, T, K, H)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        cos: Float[Array, "B T H"],
        sin: Float[Array, "B T H"],
        keys: dict[str, jax.Array | None],
    ) -> Float[Array, "B T D"]:
        N, K, H = self.shape
        B, T, _ = x.shape
        q = self.q_proj(x, dropout_key=keys["q_proj"]).reshape(B, T, N, H)
        k = self.k_proj(x, dropout_key=keys["k_proj"]).reshape(B, T, K, H)
        v = self.v_proj(x, dropout_key=keys["v_proj"]).reshape(B, T, K, H)
        q = checkpoint_name(apply_rotary(q, cos, sin), "query")
        k = checkpoint_name(apply_rotary(k, cos, sin), "key")
        v = checkpoint_name(v, "value")
        out = causal_attention(q, k, v, backend=self.backend)  # [B, T, N, H]
        out = checkpoint_name(out, "attention_out")
        return self.o_proj(out.reshape(B, T, N * H), dropout_key=keys["o_proj"])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
        D, F, bias = config.model_dim, config.mlp_dim, config.use_mlp_bias
        self.gate_proj = _linear(config, lora, "gate_proj", D, F, ("embed", "mlp"), bias, rngs)
        self.up_proj = _linear(config, lora, "up_proj", D, F, ("embed", "mlp"), bias, rngs)
        self.down_proj = _linear(config, lora, "down_proj", F, D, ("mlp", "embed"), bias, rngs)

    def __call__(
        self, x: Float[Array, "B T D"], keys: dict[str, jax.Array | None]
    ) -> Float[Array, "B T D"]:
        gate = self.gate_proj(x, dropout_key=keys["gate_proj"])
        up = self.up_proj(x, dropout_key=keys["up_proj"])
        return self.down_proj(jax.nn.silu(gate) * up, dropout_key=keys["down_proj"])


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
        norm_args = dict(
            eps=config.norm_eps,
            param_dtype=config.param_jnp_dtype,
            compute_dtype=config.compute_jnp_dtype,
        )
        self.attention_norm = RMSNorm(config.model_dim, **norm_args)
        self.attention = Attention(config, lora, rngs)
        self.mlp_norm = RMSNorm(config.model_dim, **norm_args)
        self.mlp = MLP(config, lora, rngs)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        cos: Float[Array, "B T H"],
        sin: Float[Array, "B T H"],
        dropout_key: jax.Array | None,
        *,
        attention_token_ids: Int[Array, "B R"] | None = None,
        mlp_tokens: int | None = None,
        mlp_scorer=None,
        kernels: str = "xla",
    ) -> Float[Array, "B T D"]:
        """With `attention_token_ids`, attention runs on those tokens only; with `mlp_tokens`,
        the MLP runs on that many tokens, chosen by the oracle or by `mlp_scorer(x)` (LeMo
        token elimination, `lemo_jax.lemo.layer`)."""
        keys = _projection_keys(dropout_key)
        if attention_token_ids is None:
            h = x + self.attention(self.attention_norm(x), cos, sin, keys)
        else:
            h = eliminated_attention(self, x, attention_token_ids, cos, sin, keys, kernels)
        if mlp_tokens is None:
            return h + self.mlp(self.mlp_norm(h), keys)
        return token_sparse_mlp(self, h, mlp_tokens, keys, kernels, scorer=mlp_scorer)


def _projection_keys(key: jax.Array | None) -> dict[str, jax.Array | None]:
    if key is None:
        return dict.fromkeys(PROJECTIONS)
    return dict(zip(PROJECTIONS, jax.random.split(key, len(PROJECTIONS)), strict=True))


def matmul_precision(compute_dtype) -> contextlib.AbstractContextManager:
    """float32 compute means float32 matmuls: on GPUs XLA's default may use TF32 (10-bit
    mantissa), which is neither what `compute_dtype="float32"` promises nor close enough for
    parity with a float32 reference."""
    if jnp.dtype(compute_dtype) == jnp.dtype(jnp.float32):
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


class Llama(nnx.Module):
    """Llama decoder: `model(input_ids)` returns float32 logits [B, T, V]."""

    def __init__(self, config: ModelConfig, *, lora: LoraConfig | None = None, rngs: nnx.Rngs):
        self.config = config
        self.lora = lora
        dtypes = dict(param_dtype=config.param_jnp_dtype, compute_dtype=config.compute_jnp_dtype)
        self.embedding = Embedding(
            config.vocab_size,
            config.model_dim,
            init_std=config.initializer_range,
            rngs=rngs,
            **dtypes,
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, lora, layer_rngs)

        self.layers = make_layers(rngs)
        # LeMo's block-score predictors (`lemo_jax.lemo.predictor`), when a run uses them.
        self.block_predictor = nnx.data(None)
        self.final_norm = RMSNorm(config.model_dim, eps=config.norm_eps, **dtypes)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Linear(
                config.model_dim,
                config.vocab_size,
                axes=("embed", "vocab"),
                init_std=config.initializer_range,
                use_bias=False,
                lora=None,
                rngs=rngs,
                **dtypes,
            )
        )

    def hidden_states(
        self,
        input_ids: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        *,
        dropout_key: jax.Array | None = None,
        remat_policy: str = "none",
        plan: EliminationPlan | None = None,
    ) -> Float[Array, "B T D"]:
        """The final-norm output, before the LM head; `remat_policy` names what each layer
        saves for the backward pass (see `lemo_jax.model.remat`)."""
        with matmul_precision(self.config.compute_jnp_dtype):
            hidden, _ = self._hidden_states(input_ids, positions, dropout_key, remat_policy, plan)
        return hidden

    def hidden_states_and_kept_tokens(
        self, input_ids: Int[Array, "B T"], *, plan: EliminationPlan
    ) -> tuple[Float[Array, "B T D"], tuple[Int[Array, "layers B R"] | None, ...]]:
        """The LeMo forward pass under `plan` (no dropout, no remat) and, per group of the plan,
        the token ids each of its layers kept for attention (None for attention-dense groups),
        which the training step computes and drops (`lemo_jax.lemo.kept_blocks`)."""
        with matmul_precision(self.config.compute_jnp_dtype):
            return self._hidden_states(input_ids, None, None, "none", plan)

    def layer(self, index) -> DecoderLayer:
        """Layer `index` of the [L] stack (`index` may be traced, as inside a scan)."""
        return stacked_at(self.layers, index)

    def select_attention_tokens(
        self, h, cos, sin, index, *, num_blocks: int, plan: EliminationPlan
    ) -> Int[Array, "B R"]:
        """The token ids layer `index` keeps for attention (`lemo_jax.lemo.layer`), by the
        oracle or by the attached predictors, as `plan.scorer` says."""
        return attention_token_ids(
            self.layer(index),
            h,
            cos,
            sin,
            num_blocks=num_blocks,
            plan=plan,
            predictor=self.block_predictor,
            index=index,
        )

    def _run_group(
        self,
        h,
        group: GroupPlan,
        plan: EliminationPlan | None,
        cos,
        sin,
        layer_keys,
        remat_policy: str,
    ):
        """One `lax.scan` over layers [start, stop), which share static token budgets.

        Each step reads its layer's parameters from the [L] stack by index, so groups never copy
        slices of the stack. The token selection runs outside the remat region: its int32
        indices are all the backward pass keeps of it. Returns h and the kept ids per layer.
        """
        mlp_tokens = None if group.mlp_blocks is None else group.mlp_blocks * plan.block_size
        kernels = "xla" if plan is None else plan.row_kernels

        # Under predictors the MLP's tokens come from the layer's token scorer (cheap enough to
        # recompute with the layer: the MLP input exists only inside the layer's update).
        predicts_mlp = mlp_tokens is not None and plan.scorer == "predictor"

        def update(h, index, key, token_ids):
            mlp_scorer = None
            if predicts_mlp:
                mlp_scorer = functools.partial(self.block_predictor.token_scores, index)
            return self.layer(index)(
                h,
                cos,
                sin,
                key,
                attention_token_ids=token_ids,
                mlp_tokens=mlp_tokens,
                mlp_scorer=mlp_scorer,
                kernels=kernels,
            )

        is_pruned = group.attention_blocks is not None or group.mlp_blocks is not None
        if is_pruned and plan.pruned_remat is not None:
            remat_policy = plan.pruned_remat
        update = remat(update, remat_policy, scan_length=group.stop - group.start)

        def body(h, xs):
            index, key = xs
            h = constrain_to_batch(h)  # FSDP: gather weights, never split activations on D
            token_ids = None
            if group.attention_blocks is not None:
                token_ids = self.select_attention_tokens(
                    h, cos, sin, index, num_blocks=group.attention_blocks, plan=plan
                )
            return constrain_to_batch(update(h, index, key, token_ids)), token_ids

        indices = jnp.arange(group.start, group.stop)
        keys = None if layer_keys is None else layer_keys[group.start : group.stop]
        # The kept ids ([layers, B, R] int32) are for inspection; unused, the compiler drops them.
        return jax.lax.scan(body, h, (indices, keys))

    def _hidden_states(self, input_ids, positions, dropout_key, remat_policy, plan):
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rotary_angles(self.config.rope, self.config.head_dim, positions)
        cos, sin = constrain_to_batch(cos), constrain_to_batch(sin)
        h = constrain_to_batch(self.embedding(input_ids))
        layer_keys = (
            None if dropout_key is None else jax.random.split(dropout_key, self.config.num_layers)
        )
        groups = plan.groups if plan is not None else (GroupPlan(0, self.config.num_layers),)
        kept = []
        for group in groups:
            h, group_kept = self._run_group(h, group, plan, cos, sin, layer_keys, remat_policy)
            kept.append(group_kept)
        return self.final_norm(h), tuple(kept)

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """LM head in the compute dtype with float32 accumulation and output."""
        with matmul_precision(self.config.compute_jnp_dtype):
            if self.lm_head is None:
                return self.embedding.attend(hidden)
            kernel = self.lm_head.kernel[...].astype(hidden.dtype)
            return jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        *,
        dropout_key: jax.Array | None = None,
        plan: EliminationPlan | None = None,
    ) -> Float[Array, "B T V"]:
        hidden = self.hidden_states(input_ids, positions, dropout_key=dropout_key, plan=plan)
        return self.logits(hidden)
