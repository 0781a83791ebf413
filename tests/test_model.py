"""Model behaviour: LoRA algebra, dropout, backends, dtypes, positions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import TOLERANCES, relative_error

from lemo_jax.configs import LoraConfig, get_model_config
from lemo_jax.model import Llama
from lemo_jax.model.layers import Linear

FP32 = TOLERANCES[jnp.dtype(jnp.float32)]
BF16 = TOLERANCES[jnp.dtype(jnp.bfloat16)]


def tiny(**fields):
    return dataclasses.replace(get_model_config("tiny"), **{"compute_dtype": "float32", **fields})


def tokens(batch=2, length=64, vocab=256, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def test_fresh_lora_leaves_output_unchanged():
    base = Llama(tiny(), rngs=nnx.Rngs(0))
    adapted = Llama(tiny(), lora=LoraConfig(rank=4), rngs=nnx.Rngs(0))
    nnx.update(adapted, nnx.state(base))  # same base weights
    # Exact on CPU; a GPU may pick other matmul algorithms for the two graphs.
    assert relative_error(adapted(tokens()), base(tokens())) <= FP32.forward


def test_lora_linear_is_w_plus_scaled_ba():
    lora = LoraConfig(rank=3, alpha=12.0)
    layer = Linear(
        8,
        5,
        axes=("embed", "mlp"),
        init_std=0.3,
        use_bias=True,
        lora=lora,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        rngs=nnx.Rngs(1),
    )
    layer.lora_b.set_value(jax.random.normal(jax.random.key(2), (3, 5)))
    layer.bias.set_value(jnp.arange(5.0))
    x = jax.random.normal(jax.random.key(3), (4, 8))
    w, b = np.asarray(layer.kernel.get_value()), np.arange(5.0)
    a, bb = np.asarray(layer.lora_a.get_value()), np.asarray(layer.lora_b.get_value())
    expected = np.asarray(x) @ w + b + (12.0 / 3) * (np.asarray(x) @ a @ bb)
    assert relative_error(layer(x), expected) <= FP32.forward


def test_lora_dropout_needs_a_key_and_is_reproducible():
    lora = LoraConfig(rank=4, dropout=0.5, targets=("q_proj", "v_proj", "down_proj"))
    model = Llama(tiny(), lora=lora, rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":  # non-zero B so that dropout on A's input is visible
            variable.set_value(0.1 * jnp.ones_like(variable.get_value()))
    x = tokens()
    deterministic = model(x)
    assert jnp.array_equal(deterministic, model(x))
    with_key = model(x, dropout_key=jax.random.key(7))
    assert jnp.array_equal(with_key, model(x, dropout_key=jax.random.key(7)))
    assert not jnp.allclose(with_key, deterministic)
    assert not jnp.allclose(with_key, model(x, dropout_key=jax.random.key(8)))


def test_lora_targets_select_projections():
    model = Llama(tiny(), lora=LoraConfig(targets=("gate_proj", "o_proj")), rngs=nnx.Rngs(0))
    paths = {path[:-1] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert paths == {("layers", "mlp", "gate_proj"), ("layers", "attention", "o_proj")}


def test_causality():
    model = Llama(tiny(), rngs=nnx.Rngs(0))
    x = tokens(batch=1)
    changed = x.at[0, 40].set((x[0, 40] + 1) % 256)
    before, after = model(x), model(changed)
    assert jnp.array_equal(before[:, :40], after[:, :40])
    assert not jnp.allclose(before[:, 40:], after[:, 40:])


def test_explicit_positions_equal_default_and_shift_changes_output():
    model = Llama(tiny(), rngs=nnx.Rngs(0))
    x = tokens(batch=1)
    positions = jnp.arange(64, dtype=jnp.int32)[None]
    assert jnp.array_equal(model(x, positions), model(x))
    assert not jnp.allclose(model(x, positions * 2), model(x))


@pytest.mark.parametrize("backend", ["pallas"])
def test_attention_backends_agree_with_xla(backend):
    reference = Llama(tiny(attention_backend="xla"), rngs=nnx.Rngs(0))
    other = Llama(tiny(attention_backend=backend), rngs=nnx.Rngs(0))
    x = tokens(length=128)
    assert relative_error(other(x), reference(x)) <= FP32.attention


@pytest.mark.gpu
def test_cudnn_backend_agrees_with_xla_in_bf16():
    reference = Llama(tiny(attention_backend="xla", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    cudnn = Llama(tiny(attention_backend="cudnn", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    x = tokens(length=512)
    assert relative_error(cudnn(x), reference(x)) <= BF16.attention


def test_bf16_compute_tracks_fp32():
    fp32 = Llama(tiny(), rngs=nnx.Rngs(0))
    bf16 = Llama(tiny(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    x = tokens()
    assert bf16(x).dtype == jnp.float32  # logits are accumulated and returned in fp32
    assert relative_error(bf16(x), fp32(x)) <= BF16.forward


def _param_dtypes(model, kind) -> set:
    return {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model, kind))}


def test_bf16_params_are_stored_in_bf16_and_adapters_in_float32():
    model = Llama(tiny(param_dtype="bfloat16"), lora=LoraConfig(), rngs=nnx.Rngs(0))
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    assert _param_dtypes(model, base) == {jnp.dtype(jnp.bfloat16)}
    assert _param_dtypes(model, nnx.LoRAParam) == {jnp.dtype(jnp.float32)}
    bf16_adapters = LoraConfig(param_dtype="bfloat16")
    model = Llama(tiny(param_dtype="bfloat16"), lora=bf16_adapters, rngs=nnx.Rngs(0))
    assert _param_dtypes(model, nnx.LoRAParam) == {jnp.dtype(jnp.bfloat16)}
