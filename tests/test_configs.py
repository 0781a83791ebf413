"""Every model preset builds, validates and shape-checks; full-size counts match the papers."""

import dataclasses

import jax
import pytest
from flax import nnx

from lemo_jax.configs import LoraConfig, ModelConfig, RopeConfig, get_model_config
from lemo_jax.configs.registry import model_preset_names
from lemo_jax.errors import UserError
from lemo_jax.model import Llama, count_params, trainable_filter
from lemo_jax.model.lora import frozen_filter


def abstract_model(config: ModelConfig, lora: LoraConfig | None) -> Llama:
    return nnx.eval_shape(lambda: Llama(config, lora=lora, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", model_preset_names())
def test_every_preset_eval_shapes_with_lora(name):
    config = get_model_config(name)
    model = abstract_model(config, LoraConfig())
    base = count_params(nnx.state(model, frozen_filter(LoraConfig())))
    assert base == config.num_params
    # Stacked layers: every per-layer parameter has a leading [L] axis named "layers".
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "layers":
            assert variable.get_value().shape[0] == config.num_layers, path
            assert variable.get_metadata()["out_sharding"][0] == "layers", path


@pytest.mark.parametrize("name", model_preset_names())
def test_every_preset_eval_shapes_logits(name):
    config = get_model_config(name)
    model = abstract_model(config, None)
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, 128), "int32")
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
    assert logits.shape == (1, 128, config.vocab_size)
    assert logits.dtype == "float32"


@pytest.mark.parametrize(
    ("name", "expected_billions", "lora_params"),
    [
        # Llama-2-7B: 6.74B; LoRA r=8 on q,k,v,o: 32 layers * 4 * (4096*8 + 8*4096).
        ("llama2_7b", 6.74, 32 * 4 * 2 * 4096 * 8),
        # Llama-3-8B: 8.03B; k and v project to 8 kv heads * 128 = 1024.
        ("llama3_8b", 8.03, 32 * 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024))),
    ],
)
def test_full_size_parameter_counts(name, expected_billions, lora_params):
    config = get_model_config(name)
    model = abstract_model(config, LoraConfig(rank=8, alpha=16))
    base = count_params(nnx.state(model, frozen_filter(LoraConfig())))
    assert round(base / 1e9, 2) == expected_billions
    assert count_params(nnx.state(model, trainable_filter(LoraConfig()))) == lora_params


def test_trainable_sets():
    config = get_model_config("tiny")
    plus = LoraConfig(train_embeddings_and_norms=True)
    model = abstract_model(config, plus)
    adapters = count_params(nnx.state(model, nnx.LoRAParam))
    D, V, L = config.model_dim, config.vocab_size, config.num_layers
    embeddings_and_norms = V * D + 2 * L * D + D
    assert count_params(nnx.state(model, trainable_filter(LoraConfig()))) == adapters
    assert count_params(nnx.state(model, trainable_filter(plus))) == adapters + embeddings_and_norms
    full = abstract_model(config, None)
    assert count_params(nnx.state(full, trainable_filter(None))) == config.num_params


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_kv_heads", 3, "multiple of"),
        ("param_dtype", "float64", "param_dtype"),
        ("attention_backend", "flash", "attention_backend"),
        ("head_dim", 15, "even"),
    ],
)
def test_invalid_model_config_is_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_model_config("tiny"), **{field: value})


def test_invalid_rope_and_lora_are_rejected():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeConfig(scaling="llama3", factor=8.0)
    with pytest.raises(ValueError, match="scaling"):
        RopeConfig(scaling="ntk")
    with pytest.raises(ValueError, match="unknown names"):
        LoraConfig(targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match=r"known presets: .*llama2_7b"):
        get_model_config("llama9")
