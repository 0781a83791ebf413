"""A fine-tuning run's checkpoint exported to Hugging Face and PEFT gives the run's logits."""

import jax.numpy as jnp
import numpy as np
import torch
from hf_models import save_tiny_llama, save_tiny_tokenizer, tiny_llama_config
from peft import PeftModel
from run_scripts import load_script
from tolerances import HF_PARITY, relative_error
from transformers import AutoTokenizer, LlamaForCausalLM

from lemo_jax.train.restore import load_run_model

TEXT = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(600))


def test_exported_model_and_adapter_match_the_checkpoint(tmp_path):
    base, data, run = tmp_path / "base", tmp_path / "train.txt", tmp_path / "run"
    data.write_text(TEXT)
    save_tiny_tokenizer(base, [TEXT])
    vocab = len(AutoTokenizer.from_pretrained(base))
    save_tiny_llama(base, tiny_llama_config(num_kv_heads=2, rope="linear", vocab_size=vocab))
    sets = {
        "output_dir": run,
        "model.init": "pretrained",
        "model.path": base,
        "data.train": data,
        "data.cache_dir": tmp_path / "cache",
        "train.seq_len": 64,
        "train.steps": 4,
        "train.learning_rate": 0.05,
        "train.warmup_steps": 0,
        "lora.targets": "q_proj,v_proj,down_proj",
    }
    args = ["--config", "tiny", "--no-progress"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    load_script("finetune").main(args)

    export = load_script("export_to_pytorch")
    export.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    export.main(["--checkpoint", str(run), "--out", str(tmp_path / "adapter"), "--adapter-only"])

    model, _, _, step = load_run_model(run)
    assert step == 4
    tokens = np.random.default_rng(0).integers(0, vocab, size=(2, 96))
    expected = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    ids = torch.as_tensor(tokens)
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert exported.config.rope_parameters["rope_type"] == "linear"
    base_model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base_model(ids).logits.numpy()
        merged_logits = exported(ids).logits.numpy()
        adapter_logits = PeftModel.from_pretrained(base_model, tmp_path / "adapter")(ids).logits
    assert relative_error(expected, base_logits) > 1e-3  # training moved the adapters
    assert relative_error(merged_logits, expected) <= HF_PARITY
    assert relative_error(adapter_logits.numpy(), expected) <= HF_PARITY
