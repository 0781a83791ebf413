"""Hugging Face checkpoints load into lemo-jax and give transformers' logits (fp32)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import ROPE_VARIANTS, save_tiny_llama, tiny_llama_config
from tolerances import HF_PARITY, relative_error
from transformers import LlamaForCausalLM

from lemo_jax import Llama, load_pretrained
from lemo_jax.configs import RopeConfig
from lemo_jax.io.hf_config import model_config_from_hf
from lemo_jax.io.hf_names import hf_tensors_for


def torch_logits(model, token_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(token_ids, dtype=torch.long)).logits.float().numpy()


def jax_logits(model, token_ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(token_ids, jnp.int32)))


TOKENS = np.random.default_rng(0).integers(0, 300, size=(2, 200))


@pytest.mark.parametrize("rope", list(ROPE_VARIANTS))
@pytest.mark.parametrize(
    ("num_kv_heads", "tie"),
    [(4, False), (2, True), (1, False)],
    ids=["mha-untied", "gqa-tied", "mqa-untied"],
)
def test_logits_match_transformers(tmp_path, rope, num_kv_heads, tie):
    config = tiny_llama_config(num_kv_heads=num_kv_heads, tie=tie, rope=rope)
    reference = save_tiny_llama(tmp_path, config)
    model = load_pretrained(tmp_path, compute_dtype="float32")
    assert model.config.rope.scaling == rope
    assert relative_error(jax_logits(model, TOKENS), torch_logits(reference, TOKENS)) <= HF_PARITY


def test_rope_scaling_changes_logits(tmp_path):
    """Guards the parity test: a scaling type that is read but ignored would still match."""
    save_tiny_llama(tmp_path, tiny_llama_config(rope="default"))
    plain = load_pretrained(tmp_path, compute_dtype="float32")
    interpolated = load_pretrained(
        tmp_path, compute_dtype="float32", rope=RopeConfig(scaling="linear", factor=4.0)
    )
    assert relative_error(jax_logits(interpolated, TOKENS), jax_logits(plain, TOKENS)) > 0.1


def test_sharded_checkpoint_with_index(tmp_path):
    config = tiny_llama_config(num_kv_heads=2)
    reference = save_tiny_llama(tmp_path, config, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_pretrained(tmp_path, compute_dtype="float32")
    assert relative_error(jax_logits(model, TOKENS), torch_logits(reference, TOKENS)) <= HF_PARITY


def test_attention_and_mlp_biases(tmp_path):
    config = dataclasses.replace(tiny_llama_config(num_kv_heads=2), mlp_bias=True)
    config.attention_bias = True
    reference = save_tiny_llama(tmp_path, config)
    model = load_pretrained(tmp_path, compute_dtype="float32")
    assert model.config.use_attention_bias and model.config.use_mlp_bias
    assert relative_error(jax_logits(model, TOKENS), torch_logits(reference, TOKENS)) <= HF_PARITY


def test_bf16_checkpoint_into_bf16_params(tmp_path):
    save_tiny_llama(tmp_path, tiny_llama_config(num_kv_heads=2), dtype=torch.bfloat16)
    model = load_pretrained(tmp_path, dtype="bfloat16", compute_dtype="float32")
    assert model.layers.attention.q_proj.kernel.get_value().dtype == jnp.bfloat16
    # The reference is reloaded in fp32 (same bf16-valued weights): casting the saved torch model
    # with .float() would keep its RoPE frequencies rounded to bf16.
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = torch_logits(reference, TOKENS)
    assert relative_error(jax_logits(model, TOKENS), expected) <= HF_PARITY


@pytest.mark.parametrize(("tie", "bias"), [(False, False), (True, True)])
def test_name_table_covers_transformers_state_dict(tie, bias):
    """Every lemo-jax parameter maps to exactly the tensors transformers' model has."""
    config = tiny_llama_config(num_kv_heads=2, tie=tie, attention_bias=bias)
    config.mlp_bias = bias
    expected = set(LlamaForCausalLM(config).state_dict())
    if tie:
        expected.discard("lm_head.weight")  # tied: the embedding table is the head
    model_config = model_config_from_hf(config)
    abstract = nnx.eval_shape(lambda: Llama(model_config, rngs=nnx.Rngs(0)))
    names = [
        tensor.name
        for path, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
        for tensor in hf_tensors_for(tuple(map(str, path)), model_config.num_layers)
    ]
    assert len(names) == len(set(names))
    assert set(names) == expected
