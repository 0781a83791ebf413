"""scripts/eval_ppl.py end to end: a correct perplexity, and one-line errors for bad input."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from hf_models import save_tiny_llama, save_tiny_tokenizer, tiny_llama_config
from run_scripts import run_script
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

TEXT = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def test_perplexity_matches_transformers(tmp_path):
    model_dir, data = tmp_path / "model", tmp_path / "code.txt"
    data.write_text(TEXT)
    save_tiny_tokenizer(model_dir, [TEXT])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = save_tiny_llama(model_dir, tiny_llama_config(vocab_size=len(tokenizer)))
    out = tmp_path / "ppl.json"
    result = run_script(
        "eval_ppl.py",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--seq-len",
        "64",
        "--max-tokens",
        "640",
        "--compute-dtype",
        "float32",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["num_windows"] == 10 and record["predicted_tokens"] == 10 * 63

    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:640]
    windows = torch.as_tensor(np.asarray(ids).reshape(10, 64))
    with torch.no_grad():
        loss = reference(windows, labels=windows).loss.item()  # mean over 10 * 63 predictions
    assert record["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert "perplexity" in result.stdout


def test_unknown_model_name():
    assert_one_line_error(
        run_script("eval_ppl.py", "--model", "no-such-model"), "unknown model 'no-such-model'"
    )


def test_directory_without_weights(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    assert_one_line_error(run_script("eval_ppl.py", "--model", str(tmp_path)), "has no weights")


def test_non_llama_architecture(tmp_path):
    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=300, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, [TEXT])
    assert_one_line_error(
        run_script("eval_ppl.py", "--model", str(tmp_path)), "unsupported architecture 'gpt2'"
    )


def test_missing_data_path(tmp_path):
    missing = tmp_path / "nothing.jsonl"
    assert_one_line_error(
        run_script("eval_ppl.py", "--model", "smollm2-135m", "--data", str(missing)), str(missing)
    )
