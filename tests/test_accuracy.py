"""The quality experiment's pieces: passkey prompts and scoring, long-document windows, PEFT
adapters in, and scripts/accuracy.py end to end on a tiny pretrained-format model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import save_tiny_llama, save_tiny_tokenizer, tiny_llama_config
from run_scripts import load_script, run_script
from transformers import AutoTokenizer

from lemo_jax.configs.model import LoraConfig
from lemo_jax.configs.run import ModelSection
from lemo_jax.errors import UserError
from lemo_jax.eval.passkey import make_trials, score_trials
from lemo_jax.eval.perplexity import long_document_windows
from lemo_jax.io import load_pretrained, load_tokenizer
from lemo_jax.io.export import export_peft_adapter
from lemo_jax.io.peft_adapter import apply_peft_adapter, peft_lora_config
from lemo_jax.train.setup import build_model

TEXT = "def passkey(value):\n    return value + 1  # the grass is green. The sky is blue.\n" * 40


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    save_tiny_tokenizer(directory, [TEXT])
    vocab = len(AutoTokenizer.from_pretrained(directory))
    config = tiny_llama_config(num_kv_heads=2, vocab_size=vocab, num_layers=4)
    save_tiny_llama(directory, config)
    return directory


def test_passkey_trials_have_exact_length_key_and_depth(base_dir):
    tokenizer = load_tokenizer(base_dir)
    trials = make_trials(tokenizer, 2048, 4, seed=3)
    assert [t.depth for t in trials] == [0.125, 0.375, 0.625, 0.875]
    assert len({t.key for t in trials}) == 4
    for trial in trials:
        assert trial.token_ids.shape == (2048,)
        text = tokenizer.decode(trial.token_ids)
        assert text.endswith(f"The pass key is {trial.key}")
        needle = text.index(f"The pass key is {trial.key}. Remember it.")
        filler = text.index("there.") + 6, text.rindex("What is the pass key?")
        # The needle sits at its depth of the filler, up to one filler sentence.
        assert abs((needle - filler[0]) / (filler[1] - filler[0]) - trial.depth) < 0.05
        assert tokenizer.decode(trial.token_ids[trial.answer_start :]) == f" {trial.key}"
    again = make_trials(tokenizer, 2048, 4, seed=3)
    assert [t.key for t in again] == [t.key for t in trials]
    with pytest.raises(UserError, match="too short"):
        make_trials(tokenizer, 64, 1)


def test_score_trials_passes_only_correct_greedy_answers(base_dir):
    trials = make_trials(load_tokenizer(base_dir), 512, 5)

    def oracle(token_ids, answer_start):  # reads the answer: every trial passes
        return token_ids[:, answer_start:]

    def off_by_one(token_ids, answer_start):  # a wrong last digit fails every trial
        predicted = token_ids[:, answer_start:].copy()
        predicted[:, -1] += 1
        return predicted

    assert score_trials(oracle, trials, batch_size=2) == [True] * 5
    assert score_trials(off_by_one, trials, batch_size=2) == [False] * 5


def test_long_document_windows_stay_inside_documents():
    documents = [np.arange(10), np.arange(100, 125), np.arange(200, 203)]
    windows = long_document_windows(documents, 8, 4)
    # The longest document first (three whole windows, its tail dropped), then the next.
    starts = [100, 108, 116, 0]
    assert windows.tolist() == [list(range(start, start + 8)) for start in starts]
    assert len(long_document_windows(documents, 8, 2)) == 2
    with pytest.raises(UserError, match="no document has 64 tokens"):
        long_document_windows(documents, 64, 1)


def test_peft_adapter_round_trip(base_dir, tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    trained = load_pretrained(base_dir, lora=lora, compute_dtype="float32", seed=1)
    # Non-zero B, as after training (fresh adapters leave the output unchanged).
    for path, variable in nnx.to_flat_state(nnx.state(trained, nnx.LoRAParam)):
        key = jax.random.key(hash(path) % 1000)
        variable[...] = 0.1 * jax.random.normal(key, variable[...].shape)
    export_peft_adapter(trained, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    config = peft_lora_config(tmp_path / "adapter")
    assert (config.rank, config.alpha, set(config.targets)) == (4, 8.0, set(lora.targets))
    fresh = load_pretrained(base_dir, lora=config, compute_dtype="float32", seed=7)
    tokens = jax.numpy.arange(32)[None] % 50
    assert not np.allclose(fresh(tokens), trained(tokens))
    apply_peft_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(np.asarray(fresh(tokens)), np.asarray(trained(tokens)))
    other = load_pretrained(base_dir, lora=LoraConfig(rank=2), compute_dtype="float32")
    with pytest.raises(UserError, match="does not match the model's LoRA"):
        apply_peft_adapter(other, tmp_path / "adapter")


@pytest.mark.slow
def test_accuracy_script_end_to_end(base_dir, tmp_path):
    out = tmp_path / "acc"
    common = [
        "--set", f"model.path={base_dir}", "--set", "model.rope_scaling=linear",
        "--set", "model.rope_factor=4.0", "--set", "train.seq_len=1024", "--set", "train.steps=2",
        "--set", "checkpoint.every=1", "--set", "data.train=" + str(base_dir / "data.txt"),
        "--set", "data.validation=" + str(base_dir / "data.txt"),
        "--lengths", "512,1024", "--eval-tokens", "2048", "--passkey-trials", "3",
        "--batch-tokens", "2048", "--predictor-steps", "2", "--calibration-samples", "1",
        "--arms", "dense,lemo_predictor",
    ]  # fmt: skip
    # The recipe's 40 dense final steps do not fit in 2: refused before any stage runs.
    refused = r"lemo\.dense_final_steps=40 must be less than train\.steps=2"
    with pytest.raises(UserError, match=refused):
        load_script("accuracy").main([*common, "--out", str(tmp_path / "short")])
    assert not (tmp_path / "short").exists()
    # An assignment that an arm's training stage would get twice is refused up front too.
    twice = ["--set", "lemo.scorer=oracle", "--out", str(tmp_path / "twice")]
    with pytest.raises(UserError, match=r"lemo\.scorer is set twice"):
        load_script("accuracy").main([*common, *twice])
    assert not (tmp_path / "twice").exists()
    common += ["--set", "lemo.dense_final_steps=1", "--out", str(out)]
    (base_dir / "data.txt").write_text(TEXT * 8)
    result = run_script("accuracy.py", *common, "--jobs", "2", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    arms = ["base", "base_interpolated", "dense", "lemo_predictor"]
    assert sorted(results) == sorted(arms)
    for name in arms:
        assert results[name]["perplexity"]["512"]["predicted_tokens"] == 4 * 511
        assert 0 <= results[name]["passkey"]["512"]["accuracy"] <= 1
    # Fine-tuning changed the model; the interpolated base differs from the plain one.
    ppl = {name: results[name]["perplexity"]["1024"]["perplexity"] for name in arms}
    assert ppl["lemo_predictor"] != ppl["base_interpolated"] != ppl["base"]
    for arm in ("dense", "lemo_predictor"):
        assert (out / "adapters" / arm / "adapter_model.safetensors").is_file()
    assert "| lemo_predictor |" in (out / "accuracy.md").read_text()
    assert (out / "perplexity.png").stat().st_size > 1000
    commands = (out / "commands.txt").read_text().splitlines()
    # Calibration, predictors at its budgets, then per arm train + export, in dependency order
    # although two stages ran at once (each logged in logs/).
    order = ["calibrate_budgets", "train_predictor", "scorer=predictor"]
    assert len(commands) == 2 + 2 * 2
    where = [next(i for i, line in enumerate(commands) if text in line) for text in order]
    assert where == sorted(where), commands
    assert "lemo.predictor_architecture=heads" in commands[where[2]]
    logs = sorted(path.stem for path in (out / "logs").iterdir())
    assert logs == sorted(["calibrate", "predictors", "train_dense", "export_dense",
                           "train_lemo_predictor", "export_lemo_predictor"])  # fmt: skip
    assert json.loads((out / "timings.json").read_text())["jobs"] == 2
    assert "LeMo: dense from step 2 of 2" in (out / "logs" / "train_lemo_predictor.log").read_text()
    again = run_script("accuracy.py", *common, "--stages", "prepare,train,report", timeout=300)
    assert again.returncode == 0 and (out / "commands.txt").read_text().splitlines() == commands
    bad = run_script("accuracy.py", "--arms", "dense,sparse", "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")


DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_committed_adapters_fit_the_smollm2_shape():
    """docs/accuracy/adapters: every arm's PEFT adapter loads into a SmolLM2-135M-shaped model
    (random base weights: only names and shapes matter here) and is trained (B != 0)."""
    arms = sorted(path.name for path in (DOCS / "accuracy" / "adapters").iterdir())
    assert arms == ["dense", "lemo_calibrated", "lemo_oracle", "lemo_predictor"]
    section = ModelSection(init="random", preset="smollm2_135m", compute_dtype="float32")
    lora = peft_lora_config(DOCS / "accuracy" / "adapters" / arms[0])
    assert (lora.rank, len(lora.targets)) == (8, 7)
    model, _ = build_model(section, lora, seq_len=128, seed=0)
    for arm in arms:
        apply_peft_adapter(model, DOCS / "accuracy" / "adapters" / arm)
        assert float(jnp.abs(model.layers.attention.q_proj.lora_b[...]).max()) > 0, arm


def test_accuracy_doc_table_is_the_committed_results():
    """The Result table of docs/ACCURACY.md states docs/accuracy/results.json's numbers."""
    results = json.loads((DOCS / "accuracy" / "results.json").read_text())
    text = (DOCS / "ACCURACY.md").read_text()
    table = text[text.index("## Result") :].split("\n\n")[1].splitlines()
    rows = [line.split("|")[2:-1] for line in table[2:]]
    assert len(rows) == len(results)
    dense = results["dense"]["perplexity"]
    for cells, result in zip(rows, results.values(), strict=True):
        lengths = sorted(result["perplexity"], key=int)
        ppl = [result["perplexity"][n]["perplexity"] for n in lengths]
        passkey = [result["passkey"][n]["accuracy"] for n in lengths]
        assert [float(c) for c in cells[:4]] == [round(p, 3) for p in ppl]
        assert [c.strip() for c in cells[4:8]] == [f"{a:.0%}" for a in passkey]
        ratio = max(p / dense[n]["perplexity"] for p, n in zip(ppl, lengths, strict=True))
        stated = cells[8].strip().strip("*")
        assert float(stated) == round(ratio, len(stated.split(".")[1]))
