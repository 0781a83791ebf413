"""Remat policies: same loss and gradients, less compiled memory than saving everything."""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import ad_checkpoint
from jax._src.ad_checkpoint import saved_residuals
from lora_training import activate_lora, mean_loss
from tolerances import TOLERANCES, relative_error

from lemo_jax.configs import LoraConfig, get_model_config
from lemo_jax.lemo.layer import EliminationPlan, GroupPlan
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


def _step_residuals(policy: str, backend: str, dtype: str):
    """The training step's saved residuals (shape, dtype) and its compiled HLO text."""
    config = dataclasses.replace(
        CONFIG, num_layers=2, attention_backend=backend, compute_dtype=dtype, param_dtype=dtype
    )
    model = Llama(config, lora=LORA, rngs=nnx.Rngs(0))
    activate_lora(model)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(LORA), ...)
    loss = mean_loss(graphdef, remat_policy=policy, loss_chunk_size=128)
    token_ids = jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # one line per residual: "f32[2,1,4,128] ..."
        ad_checkpoint.print_saved_residuals(loss, trainable, frozen, token_ids)
    hlo = jax.jit(jax.grad(loss)).lower(trainable, frozen, token_ids).compile().as_text()
    return [line.split(" ", 1)[0] for line in printed.getvalue().splitlines()], hlo


def _softmax_statistics(residuals: list[str]) -> list[str]:
    """Saved float32 arrays [layers, B, N, T(, 1)]: flash attention's softmax statistics."""
    prefix = f"f32[2,1,{CONFIG.num_heads},128"
    return [r for r in residuals if r in (prefix + "]", prefix + ",1]")]


@pytest.mark.parametrize(
    "backend, dtype",
    [
        ("pallas", "float32"),
        pytest.param("cudnn", "bfloat16", marks=pytest.mark.gpu),
    ],
)
def test_save_attention_output_keeps_the_kernels_statistics(backend, dtype):
    """Under `save_attention_output` the step keeps each layer's attention output and softmax
    statistics, so the backward never reruns the attention forward; under `full` it keeps
    neither. On the GPU, the compiled step holds one cuDNN forward call site instead of two."""
    full, full_hlo = _step_residuals("full", backend, dtype)
    saved, saved_hlo = _step_residuals("save_attention_output", backend, dtype)
    assert _softmax_statistics(full) == []
    assert len(_softmax_statistics(saved)) == 1, saved
    if backend == "cudnn":
        forward = '"__cudnn$fmhaSoftmax"'
        assert (full_hlo.count(forward), saved_hlo.count(forward)) == (2, 1)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_none_saves_activations_but_no_copy_of_the_weights(param_dtype):
    """Under `none` a step split into layer groups (as LeMo's plans are) saves every activation
    but neither the layers' weights as read from the stack nor their casts to the compute
    dtype: saved, each group's would be stacked into a copy of its weights. Upcasts of saved
    tensors are not kept either. Gradients are unchanged (the first test covers one group)."""
    config = dataclasses.replace(CONFIG, compute_dtype="bfloat16", param_dtype=param_dtype)
    plan = EliminationPlan(block_size=64, groups=(GroupPlan(0, 2), GroupPlan(2, 4, 4, 4)))
    model = Llama(config, lora=LORA, rngs=nnx.Rngs(0))
    activate_lora(model)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(LORA), ...)
    loss = mean_loss(graphdef, remat_policy="none", loss_chunk_size=256, plan=plan)
    token_ids = jax.random.randint(jax.random.key(1), (1, 512), 0, config.vocab_size)
    # What the layer scans save ([layers, ...] each); the weights themselves are arguments.
    saved = saved_residuals(loss, trainable, frozen, token_ids)
    residuals = [aval for aval, why in saved if "scan" in why]
    shapes = [aval.shape for aval in residuals]
    D, F = config.model_dim, config.mlp_dim
    weight_shapes = {(2, D, F), (2, F, D), (2, D, D), (D, F), (F, D), (D, D)}
    assert not weight_shapes & set(shapes), shapes
    # Activations are saved: the MLP's [layers, B, tokens, F] intermediates of both groups
    # (the pruned group's over its 256 kept tokens), and no float32 copy of a bf16 activation.
    assert (2, 1, 512, F) in shapes and (2, 1, 256, F) in shapes
    assert not [a for a in residuals if a.dtype == jnp.float32 and a.shape[-1:] in ((D,), (F,))]
    reference = jax.grad(mean_loss(graphdef, remat_policy="full", loss_chunk_size=256, plan=plan))
    grads = jax.grad(loss)(trainable, frozen, token_ids)
    expected = reference(trainable, frozen, token_ids)
    for leaf, other in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        assert relative_error(leaf, other) <= TOLERANCES[jnp.dtype(jnp.bfloat16)].gradient
