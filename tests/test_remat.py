"""Remat policies: same loss and gradients, less compiled memory than saving everything."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from lora_training import activate_lora, mean_loss
from tolerances import TOLERANCES, relative_error

from lemo_jax.configs import LoraConfig, get_model_config
from lemo_jax.model import Llama, trainable_filter
from lemo_jax.model.remat import REMAT_POLICIES

CONFIG = dataclasses.replace(
    get_model_config("tiny"), num_layers=4, model_dim=128, mlp_dim=384, compute_dtype="float32"
)
LORA = LoraConfig(rank=4)


def loss_and_grad(policy: str):
    model = Llama(CONFIG, lora=LORA, rngs=nnx.Rngs(0))
    activate_lora(model)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(LORA), ...)
    loss = mean_loss(graphdef, remat_policy=policy, loss_chunk_size=256)
    step = jax.jit(jax.value_and_grad(loss))
    token_ids = jax.random.randint(jax.random.key(1), (1, 512), 0, CONFIG.vocab_size)
    compiled = step.lower(trainable, frozen, token_ids).compile()
    value, grads = compiled(trainable, frozen, token_ids)
    return value, grads, compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def results():
    return {policy: loss_and_grad(policy) for policy in REMAT_POLICIES}


def test_policies_compute_the_same_loss_and_gradients(results):
    tolerance = TOLERANCES[jnp.dtype(jnp.float32)]
    value, grads, _ = results["none"]
    for policy in REMAT_POLICIES:
        other_value, other_grads, _ = results[policy]
        assert relative_error(other_value, value) <= tolerance.forward, policy
        for leaf, other in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads), strict=True):
            assert relative_error(other, leaf) <= tolerance.gradient, policy


def test_recomputation_lowers_compiled_memory(results):
    memory = {policy: temp for policy, (_, _, temp) in results.items()}
    assert memory["full"] < 0.5 * memory["none"]
    for policy in ("dots", "dots_no_batch", "save_attention"):
        assert memory["full"] <= memory[policy] <= memory["none"], memory
