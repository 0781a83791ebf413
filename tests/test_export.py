"""Export to Hugging Face: merged models and PEFT adapters reload in transformers/PEFT and give
the JAX model's logits; configs invert `model_config_from_hf`; exports are atomic."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import save_tiny_llama, save_tiny_tokenizer, tiny_llama_config
from safetensors import safe_open
from safetensors.torch import load_file
from tolerances import HF_PARITY, TOLERANCES, relative_error
from transformers import AutoTokenizer, LlamaForCausalLM

from lemo_jax import load_pretrained
from lemo_jax.configs.model import LORA_TARGETS, LoraConfig, ModelConfig, RopeConfig
from lemo_jax.configs.registry import get_model_config, model_preset_names
from lemo_jax.errors import UserError
from lemo_jax.io.export import export_hf, export_peft_adapter, merged_state_dict
from lemo_jax.io.hf_config import hf_config_from_model_config, model_config_from_hf

TOKENS = np.random.default_rng(0).integers(0, 300, size=(2, 64))
LORA = LoraConfig(rank=4, alpha=8, targets=LORA_TARGETS)


def torch_logits(model, token_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(token_ids, dtype=torch.long)).logits.float().numpy()


def jax_logits(model, token_ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(token_ids, jnp.int32)))


def load_with_trained_lora(directory, lora: LoraConfig = LORA, **kwargs):
    """The checkpoint with adapters whose B is non-zero, so that merging changes the weights."""
    model = load_pretrained(directory, compute_dtype="float32", lora=lora, **kwargs)
    lora_state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lora_state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        leaf + 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def without_runtime_fields(config: ModelConfig, like: ModelConfig) -> ModelConfig:
    """`config` with the fields a Hugging Face config does not hold copied from `like`."""
    runtime = ("param_dtype", "compute_dtype", "attention_backend")
    return dataclasses.replace(config, **{name: getattr(like, name) for name in runtime})


ROPES = {
    "linear": RopeConfig(scaling="linear", factor=4.0),
    "llama3": RopeConfig(
        theta=500_000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192
    ),
    "yarn": RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=1024),
    "yarn-full": RopeConfig(
        scaling="yarn",
        factor=4.0,
        original_max_position_embeddings=1024,
        beta_fast=16.0,
        beta_slow=2.0,
        attention_factor=1.2,
        mscale=0.9,
        mscale_all_dim=0.8,
        truncate=False,
    ),
}


@pytest.mark.parametrize("name", model_preset_names())
def test_hf_config_inverts_model_config_for_presets(name):
    config = get_model_config(name)
    back = model_config_from_hf(hf_config_from_model_config(config))
    assert without_runtime_fields(back, config) == config


@pytest.mark.parametrize("rope", list(ROPES))
def test_hf_config_inverts_model_config_for_rope_scalings(rope):
    config = dataclasses.replace(
        get_model_config("tiny"), rope=ROPES[rope], max_position_embeddings=16_384
    )
    hf_config = hf_config_from_model_config(config, bos_token_id=1, eos_token_id=2)
    assert hf_config.rope_parameters["rope_type"] == ROPES[rope].scaling
    assert (hf_config.bos_token_id, hf_config.eos_token_id) == (1, 2)
    assert without_runtime_fields(model_config_from_hf(hf_config), config) == config


@pytest.mark.parametrize(
    ("num_kv_heads", "tie", "rope"),
    [(4, False, "default"), (2, True, "default"), (2, False, "linear")],
    ids=["mha-untied", "gqa-tied", "gqa-linear-rope"],
)
def test_merged_export_reloads_in_transformers(tmp_path, num_kv_heads, tie, rope):
    save_tiny_llama(
        tmp_path / "base", tiny_llama_config(num_kv_heads=num_kv_heads, tie=tie, rope=rope)
    )
    model = load_with_trained_lora(tmp_path / "base")
    export_hf(model, tmp_path / "out", dtype="float32", max_shard_size="100KB")

    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["rope_parameters"]["rope_type"] == rope
    assert config["tie_word_embeddings"] == tie
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) == (not tie)
    # Tensors are written in layer order, so a shard holds consecutive layers.
    shards = [
        {file for name, file in index["weight_map"].items() if f"layers.{layer}." in name}
        for layer in (0, 1)
    ]
    assert max(shards[0]) <= min(shards[1])

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = jax_logits(model, TOKENS)
    assert relative_error(torch_logits(reloaded, TOKENS), expected) <= HF_PARITY
    # Guards the test: the adapters must matter, or an export that drops them would pass.
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert relative_error(torch_logits(base, TOKENS), expected) > 100 * HF_PARITY


def test_peft_adapter_reloads_in_peft(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2))
    model = load_with_trained_lora(tmp_path / "base")
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert relative_error(torch_logits(adapted, TOKENS), jax_logits(model, TOKENS)) <= HF_PARITY
    # Our tensor names are exactly those PEFT itself would save for this adapter.
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(get_peft_model_state_dict(adapted))
        name = "base_model.model.model.layers.1.mlp.down_proj"
        assert saved.get_slice(f"{name}.lora_A.weight").get_shape() == [4, 96]
        assert saved.get_slice(f"{name}.lora_B.weight").get_shape() == [64, 4]


def test_export_without_lora_is_the_checkpoint(tmp_path):
    original = save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2, tie=True))
    model = load_pretrained(tmp_path / "base", compute_dtype="float32")
    save_tiny_tokenizer(tmp_path / "tokenizer", ["hello world", "long context fine-tuning"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    export_hf(model, tmp_path / "out", dtype="float32", tokenizer=tokenizer)

    exported = load_file(tmp_path / "out" / "model.safetensors")
    expected = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight"}
    assert set(merged_state_dict(model, dtype="float32")) == set(exported)
    assert set(exported) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded_tokenizer("hello world").input_ids == tokenizer("hello world").input_ids
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )


def test_bf16_export(tmp_path):
    save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2))
    model = load_with_trained_lora(tmp_path / "base")
    export_hf(model, tmp_path / "out")  # bfloat16 is the default

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as saved:
        names = saved.keys()
        assert {saved.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # Reloaded in fp32 so that only the weights' rounding to bf16 differs from the JAX model.
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tolerance = TOLERANCES[jnp.dtype(jnp.bfloat16)].forward
    assert relative_error(torch_logits(reloaded, TOKENS), jax_logits(model, TOKENS)) <= tolerance


def test_existing_out_dir_is_refused_and_untouched(tmp_path):
    save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2))
    model = load_pretrained(tmp_path / "base", compute_dtype="float32", lora=LORA)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for export in (
        lambda: export_hf(model, tmp_path / "out"),
        lambda: export_peft_adapter(model, tmp_path / "out", base_model_name_or_path="base"),
    ):
        with pytest.raises(UserError, match="already exists"):
            export()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_failed_export_leaves_nothing(tmp_path):
    save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2))
    model = load_pretrained(tmp_path / "base", compute_dtype="float32")

    class BrokenTokenizer:
        bos_token_id = eos_token_id = None

        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_adapter_export_errors(tmp_path):
    save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2))
    plain = load_pretrained(tmp_path / "base", compute_dtype="float32")
    with pytest.raises(UserError, match="no LoRA adapters"):
        export_peft_adapter(plain, tmp_path / "a", base_model_name_or_path="base")
    lora_plus = dataclasses.replace(LORA, train_embeddings_and_norms=True)
    model = load_pretrained(tmp_path / "base", compute_dtype="float32", lora=lora_plus)
    with pytest.raises(UserError, match="export the merged model"):
        export_peft_adapter(model, tmp_path / "b", base_model_name_or_path="base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_unknown_dtype_is_a_user_error(tmp_path):
    save_tiny_llama(tmp_path / "base", tiny_llama_config(num_kv_heads=2))
    model = load_pretrained(tmp_path / "base", compute_dtype="float32")
    with pytest.raises(UserError, match="float64"):
        export_hf(model, tmp_path / "out", dtype="float64")
    assert not (tmp_path / "out").exists()


def test_exported_files_follow_the_umask(tmp_path):
    import os

    from lemo_jax.io.export import atomic_directory

    with atomic_directory(tmp_path / "out") as staging:
        private = staging / "weights.bin"
        private.write_bytes(b"x")
        private.chmod(0o600)
    umask = os.umask(0)
    os.umask(umask)
    assert ((tmp_path / "out" / "weights.bin").stat().st_mode & 0o777) == 0o666 & ~umask
