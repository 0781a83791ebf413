"""Token elimination in the model: exactness against dense and masked-dense references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lora_training import activate_lora, mean_loss
from tolerances import TOLERANCES, relative_error

from lemo_jax.configs import LoraConfig, get_model_config
from lemo_jax.lemo.layer import (
    EliminationPlan,
    GroupPlan,
    attention_token_ids,
    eliminated_attention,
    gather_rows,
)
from lemo_jax.model import Llama, trainable_filter
from lemo_jax.model.rope import rotary_angles

FP32 = TOLERANCES[jnp.dtype(jnp.float32)]
CONFIG = dataclasses.replace(get_model_config("tiny"), num_layers=3, compute_dtype="float32")
LORA = LoraConfig(rank=4)
BLOCK = 16


def model_with_active_lora() -> Llama:
    model = Llama(CONFIG, lora=LORA, rngs=nnx.Rngs(0))
    activate_lora(model)
    return model


def loss_and_grads(model: Llama, token_ids, plan):
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(LORA), ...)
    loss = mean_loss(graphdef, remat_policy="full", loss_chunk_size=64, plan=plan)
    return jax.value_and_grad(loss)(trainable, frozen, token_ids)


@pytest.mark.parametrize("token_sparse_mlp", [False, True])
def test_keep_everything_through_the_elimination_path_equals_dense(token_sparse_mlp):
    model = model_with_active_lora()
    T = 128
    token_ids = jax.random.randint(jax.random.key(1), (2, T), 0, CONFIG.vocab_size)
    all_blocks = T // BLOCK
    mlp = all_blocks if token_sparse_mlp else None
    plan = EliminationPlan(BLOCK, (GroupPlan(0, 1), GroupPlan(1, 3, all_blocks, mlp)))
    assert relative_error(model(token_ids, plan=plan), model(token_ids)) <= FP32.forward
    (loss, grads), (dense_loss, dense_grads) = (
        loss_and_grads(model, token_ids, plan),
        loss_and_grads(model, token_ids, None),
    )
    assert relative_error(loss, dense_loss) <= FP32.forward
    for leaf, dense_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads), strict=True):
        assert relative_error(leaf, dense_leaf) <= FP32.forward


def masked_dense_attention(layer, h, kept, cos, sin):
    """Reference: full-length attention where kept rows see only kept, earlier rows."""
    B, T, _ = h.shape
    N, K, H = layer.attention.shape
    x = layer.attention_norm(h)
    q, k = layer.attention.rotated_query_key(x, cos, sin)
    v = layer.attention.v_proj(x).reshape(B, T, K, H)
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    causal = jnp.tril(jnp.ones((T, T), bool))
    mask = causal[None] & kept[:, None, :] & kept[:, :, None]  # [B, T, S]
    logits = jnp.where(mask[:, None], logits, -1e30)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
    update = layer.attention.o_proj(out.reshape(B, T, N * H))
    return h + jnp.where(kept[..., None], update, 0.0)


def test_hand_written_keep_set_matches_masked_dense_reference():
    model = model_with_active_lora()
    layer = model.layer(1)
    B, T, D = 2, 96, CONFIG.model_dim
    h = 0.5 * jax.random.normal(jax.random.key(2), (B, T, D))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rotary_angles(CONFIG.rope, CONFIG.head_dim, positions)
    keep_blocks = [[0, 2, 5], [1, 3, 4]]  # per example, sorted, in 16-token blocks
    token_ids = jnp.asarray(
        [np.concatenate([np.arange(b * 16, b * 16 + 16) for b in row]) for row in keep_blocks],
        jnp.int32,
    )
    kept = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], token_ids].set(True)
    keys = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"))
    probe = jax.random.normal(jax.random.key(3), (B, T, D))

    def ours(h):
        return jnp.sum(eliminated_attention(layer, h, token_ids, cos, sin, keys) * probe)

    def reference(h):
        return jnp.sum(masked_dense_attention(layer, h, kept, cos, sin) * probe)

    out = eliminated_attention(layer, h, token_ids, cos, sin, keys)
    expected = masked_dense_attention(layer, h, kept, cos, sin)
    assert relative_error(out, expected) <= FP32.forward
    assert jnp.array_equal(
        jnp.where(kept[..., None], 0.0, out), jnp.where(kept[..., None], 0.0, h)
    )  # eliminated rows unchanged
    assert relative_error(jax.grad(ours)(h), jax.grad(reference)(h)) <= FP32.forward
    # Eliminated tokens are not keys or values: changing them leaves every kept row unchanged.
    changed = h + jnp.where(kept[..., None], 0.0, 1.0)
    out_changed = eliminated_attention(layer, changed, token_ids, cos, sin, keys)
    assert jnp.array_equal(gather_rows(out_changed, token_ids), gather_rows(out, token_ids))


def test_mean_score_reduction_divides_by_the_visible_query_blocks():
    import pallas_kernels

    model = model_with_active_lora()
    layer = model.layer(0)
    B, T = 1, 128
    h = jax.random.normal(jax.random.key(4), (B, T, CONFIG.model_dim))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rotary_angles(CONFIG.rope, CONFIG.head_dim, positions)
    query, key = layer.attention.rotated_query_key(layer.attention_norm(h), cos, sin)
    scores = pallas_kernels.block_scores(query, key, block_size=BLOCK, causal=True)[0]
    num_blocks = T // BLOCK
    mean_scores = scores / (num_blocks - jnp.arange(num_blocks))
    # Guard: on this input the two reductions select different blocks.
    assert set(jax.lax.top_k(scores, 3)[1].tolist()) != set(
        jax.lax.top_k(mean_scores, 3)[1].tolist()
    )
    for reduction, expected_scores in [
        ("sum", scores),
        ("mean", mean_scores),
    ]:
        plan = EliminationPlan(
            BLOCK, (GroupPlan(0, 1, 3),), keep_first_blocks=0, score_reduction=reduction
        )
        token_ids = attention_token_ids(layer, h, cos, sin, num_blocks=3, plan=plan)
        expected_blocks = jnp.sort(jax.lax.top_k(expected_scores, 3)[1])
        assert jnp.array_equal(token_ids[0, ::BLOCK] // BLOCK, expected_blocks), reduction


def test_pallas_and_xla_kernels_select_the_same_tokens_and_give_the_same_step():
    """The model with the Pallas kernels (block scores, selective load, in-place add;
    interpreted on CPU) equals the XLA paths: the same kept blocks in every layer, so the same
    loss and gradients."""
    model = model_with_active_lora()
    T = 256
    token_ids = jax.random.randint(jax.random.key(3), (2, T), 0, CONFIG.vocab_size)
    groups = (GroupPlan(0, 1), GroupPlan(1, 3, 6, None))  # 6 of 16 blocks kept
    plans = [
        EliminationPlan(BLOCK, groups, kernels=kernels, row_kernels=kernels)
        for kernels in ("xla", "pallas")
    ]
    layer = model.layer(1)  # the first pruned layer
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    cos, sin = rotary_angles(CONFIG.rope, CONFIG.head_dim, positions)
    h = model.embedding(token_ids)
    xla_ids, pallas_ids = (
        attention_token_ids(layer, h, cos, sin, num_blocks=6, plan=plan) for plan in plans
    )
    np.testing.assert_array_equal(xla_ids, pallas_ids)
    (loss, grads), (kernel_loss, kernel_grads) = (
        loss_and_grads(model, token_ids, plan) for plan in plans
    )
    assert relative_error(kernel_loss, loss) <= FP32.forward
    for leaf, kernel_leaf in zip(
        jax.tree.leaves(grads), jax.tree.leaves(kernel_grads), strict=True
    ):
        assert relative_error(kernel_leaf, leaf) <= FP32.forward
