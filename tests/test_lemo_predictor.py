"""Block-score predictors (paper section 4.3): shapes, block causality, save/load."""

import dataclasses
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_scripts import run_script

from lemo_jax.configs import get_model_config
from lemo_jax.configs.model import LoraConfig
from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.configs.runs import get_run_config
from lemo_jax.data.pipeline import prepare_data
from lemo_jax.errors import UserError
from lemo_jax.lemo.budgets import layer_budgets
from lemo_jax.lemo.layer import EliminationPlan, GroupPlan, token_sparse_mlp, top_blocks
from lemo_jax.lemo.predictor import (
    BlockScorePredictor,
    PredictorConfig,
    block_chunks,
    head_block_scores,
    load_predictor,
    save_predictor,
)
from lemo_jax.lemo.predictor_training import (
    layer_recall,
    oracle_batch,
    select_heads,
    train_predictors,
)
from lemo_jax.model.llama import PROJECTIONS, Llama
from lemo_jax.model.rope import rotary_angles
from lemo_jax.train.setup import build_model, predictor_config_for
from pallas_kernels import block_scores

CONFIG = PredictorConfig(num_layers=3, model_dim=32, chunk_dim=8, block_size=16, rank=4)


def _input(batch=2, length=128, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, length, CONFIG.model_dim))


def test_block_chunks_join_each_blocks_rows_of_a_chunk():
    x = jnp.arange(2 * 32 * 32, dtype=jnp.float32).reshape(2, 32, 32)
    chunks = block_chunks(x, CONFIG)  # [B, M=2, C=4, 16 * 8]
    assert chunks.shape == (2, 2, 4, 128)
    # Block 1, chunk 2: rows 16..31, features 16..23, row after row.
    expected = x[1, 16:32, 16:24].reshape(-1)
    np.testing.assert_array_equal(chunks[1, 1, 2], expected)


CHUNKS = dataclasses.replace(CONFIG, architecture="chunks")


@pytest.mark.parametrize("config", [CONFIG, CHUNKS], ids=["pooled", "chunks"])
def test_scores_shape_and_block_causality(config):
    predictor = BlockScorePredictor(config, nnx.Rngs(0))
    x = _input()
    scores = predictor(1, x)
    assert scores.shape == (2, 8) and scores.dtype == jnp.float32
    # Changing block 5's input changes P[m, n] only where m or n is 5: key blocks after 5
    # (n = 6, 7) sum over query blocks m >= n, none of them block 5.
    changed = x.at[:, 5 * 16 : 6 * 16].add(3.0)
    new_scores = predictor(1, changed)
    np.testing.assert_array_equal(new_scores[:, 6:], scores[:, 6:])
    assert not np.allclose(new_scores[:, :6], scores[:, :6])
    # The last key block is seen only by itself: score[M-1] = P[M-1, M-1].
    layer = predictor.layer(1)
    if config.architecture == "chunks":
        blocks = block_chunks(x, config)
        q_hat, k_hat = layer.query(blocks[:, -1]), layer.key(blocks[:, -1])  # [B, C, r]
    else:  # the block's per-token embeddings, mean-pooled for queries, max-pooled for keys
        rows = x[:, -config.block_size :]
        q_hat, k_hat = layer.query(rows).mean(axis=1), layer.key(rows).max(axis=1)  # [B, r]
    expected = jnp.sum(q_hat * k_hat, axis=tuple(range(1, q_hat.ndim)))
    np.testing.assert_allclose(scores[:, -1], expected, rtol=1e-5)


def test_layers_are_independent_and_indexable_inside_a_scan():
    predictor = BlockScorePredictor(CONFIG, nnx.Rngs(0))
    x = _input()
    direct = [predictor(index, x) for index in range(CONFIG.num_layers)]
    assert not np.allclose(direct[0], direct[1])

    def body(carry, index):
        return carry, predictor(index, x)

    _, scanned = jax.lax.scan(body, 0, jnp.arange(CONFIG.num_layers))
    np.testing.assert_allclose(scanned, jnp.stack(direct), rtol=1e-6)


@pytest.mark.parametrize("config", [CONFIG, CHUNKS], ids=["pooled", "chunks"])
def test_save_load_round_trip(tmp_path, config):
    predictor = BlockScorePredictor(config, nnx.Rngs(3))
    save_predictor(predictor, tmp_path / "predictors")
    loaded = load_predictor(tmp_path / "predictors", expected=config)
    x = _input()
    np.testing.assert_array_equal(loaded(2, x), predictor(2, x))


def test_predictors_saved_before_the_architecture_choice_load_as_chunks(tmp_path):
    save_predictor(BlockScorePredictor(CHUNKS, nnx.Rngs(0)), tmp_path / "p")
    config_file = tmp_path / "p" / "predictor_config.json"
    fields = json.loads(config_file.read_text())
    del fields["architecture"]
    config_file.write_text(json.dumps(fields))
    assert load_predictor(tmp_path / "p", expected=CHUNKS).config == CHUNKS
    with pytest.raises(UserError, match="were made for"):
        load_predictor(tmp_path / "p", expected=CONFIG)


def test_missing_or_mismatched_predictors_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="holds no predictors") as error:
        load_predictor(tmp_path / "nothing", expected=CONFIG)
    assert "\n" not in str(error.value)
    save_predictor(BlockScorePredictor(CONFIG, nnx.Rngs(0)), tmp_path / "p")
    other = dataclasses.replace(CONFIG, num_layers=4)
    with pytest.raises(UserError, match="were made for") as error:
        load_predictor(tmp_path / "p", expected=other)
    assert "\n" not in str(error.value)


def test_config_errors():
    with pytest.raises(ValueError, match="must divide model_dim"):
        PredictorConfig(num_layers=1, model_dim=30, chunk_dim=8)
    with pytest.raises(ValueError, match="rank must be positive"):
        PredictorConfig(num_layers=1, model_dim=32, chunk_dim=8, rank=0)
    with pytest.raises(ValueError, match="unknown predictor architecture"):
        PredictorConfig(num_layers=1, model_dim=32, chunk_dim=8, architecture="dense")


TINY_ARGS = [
    "--config",
    "tiny",
    "--set",
    "train.seq_len=512",
    "--set",
    "lemo.block_size=16",
    "--set",
    "lemo.schedule=uniform:0.25",
]


def _run(script: str, tmp_path, *extra) -> subprocess.CompletedProcess:
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    return run_script(script, *TINY_ARGS, *cache, *extra, timeout=600)


def _train_script(tmp_path, *extra):
    return _run(
        "train_predictor.py",
        tmp_path,
        "--out",
        str(tmp_path / "predictors"),
        "--no-progress",
        *extra,
    )


def _random_scorer_recall(budgets, batch, keep_first) -> float:
    recalls = []
    for layer, kept in enumerate(budgets.attention_blocks):
        if kept >= budgets.num_blocks:
            continue
        noise = jax.random.uniform(jax.random.key(layer), batch.scores[layer].shape)
        chosen = top_blocks(noise, kept, keep_first)
        truth = top_blocks(batch.scores[layer], kept, keep_first)
        hits = jnp.sum(chosen[:, :, None] == truth[:, None, :], axis=(1, 2))
        recalls.append(float(jnp.mean(hits / kept)))
    return sum(recalls) / len(recalls)


def test_trained_predictor_beats_a_random_scorer_and_resumes(tmp_path):
    result = _train_script(tmp_path, "--steps", "120", "--checkpoint-every", "60")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "predictors" / "recall.json").read_text())
    assert report["step"] == 120 and set(report["per_layer"]) == {"0", "1"}
    # The random scorer on the same validation windows, at the same budgets.
    config = apply_overrides(get_run_config("tiny"), [a for a in TINY_ARGS[3::2]])
    model, tokenizer = build_model(config.model, None, seq_len=512, seed=config.train.seed)
    _, validation = prepare_data(config.data, tokenizer, 512)
    budgets = layer_budgets(config.lemo, model.config.num_layers, 512)
    batch = oracle_batch(model, jnp.asarray(validation.batch([0])), block_size=16, kernels="xla")
    random_recall = _random_scorer_recall(budgets, batch, config.lemo.keep_first_blocks)
    assert report["mean_recall"] > random_recall + 0.2, (report, random_recall)
    # The saved predictors are what the report measured.
    predictor = load_predictor(
        tmp_path / "predictors", expected=predictor_config_for(model.config, config.lemo)
    )
    windows = range(report["validation_windows"])
    recalls = [
        layer_recall(
            predictor,
            oracle_batch(model, jnp.asarray(validation.batch([i])), block_size=16, kernels="xla"),
            budgets,
            config.lemo.keep_first_blocks,
        )
        for i in windows
    ]
    for layer in (0, 1):
        mean = sum(recall[layer] for recall in recalls) / len(recalls)
        assert mean == pytest.approx(report["per_layer"][str(layer)], abs=1e-6)
    # Asking for more steps resumes from the last checkpoint.
    result = _train_script(tmp_path, "--steps", "130")
    assert result.returncode == 0, result.stderr
    assert "resumed from step 120" in result.stderr
    assert json.loads((tmp_path / "predictors" / "recall.json").read_text())["step"] == 130

    # Fine-tuning with the predictors runs; missing or mismatched ones are one-line errors.
    predictors = tmp_path / "predictors"
    finetune = ["--set", "lemo.enabled=true", "--set", "lemo.scorer=predictor"]
    finetune += ["--set", "train.steps=2", "--set", "export_after=false"]
    ok = _run(
        "finetune.py",
        tmp_path,
        *finetune,
        "--set",
        f"lemo.predictor_path={predictors}",
        "--set",
        f"output_dir={tmp_path / 'run'}",
    )
    assert ok.returncode == 0, ok.stderr
    other_model = tmp_path / "other_model"  # predictors of a 4-layer model
    other_model.mkdir()
    saved = json.loads((predictors / "predictor_config.json").read_text())
    (other_model / "predictor_config.json").write_text(json.dumps(dict(saved, num_layers=4)))
    (other_model / "predictor.safetensors").write_bytes(
        (predictors / "predictor.safetensors").read_bytes()
    )
    for index, (overrides, message) in enumerate(
        [
            ([f"lemo.predictor_path={tmp_path / 'nothing'}"], "holds no predictors"),
            ([f"lemo.predictor_path={other_model}"], "were made for"),
        ]
    ):
        sets = [part for override in overrides for part in ("--set", override)]
        output = ["--set", f"output_dir={tmp_path / f'failed{index}'}"]
        failed = _run("finetune.py", tmp_path, *finetune, *sets, *output)
        assert failed.returncode == 2, failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last


MLP_ARGS = ["--set", "lemo.mlp=token_sparse", "--set", "lemo.mlp_schedule=uniform:0.5"]


def test_mlp_token_scorers_beat_random_and_drive_token_sparse_finetuning(tmp_path):
    """With token-sparse MLPs the predictors also fit a per-token MLP scorer to the oracle's
    ||silu(gate) * up||: recall above a random choice's (0.5 at half the tokens kept), reported
    per layer, and fine-tuning uses it."""
    result = _train_script(tmp_path, "--steps", "60", *MLP_ARGS)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "predictors" / "recall.json").read_text())
    assert set(report["mlp_per_layer"]) == {"0", "1"}
    assert report["mlp_mean_recall"] > 0.65, report
    assert "MLP token recall: mean" in result.stdout
    run = _run(
        "finetune.py",
        tmp_path,
        *MLP_ARGS,
        *("--set", "lemo.enabled=true", "--set", "lemo.scorer=predictor"),
        *("--set", f"lemo.predictor_path={tmp_path / 'predictors'}"),
        *("--set", "train.steps=2", "--set", "export_after=false"),
        *("--set", f"output_dir={tmp_path / 'run'}"),
    )
    assert run.returncode == 0, run.stderr


def test_token_sparse_mlp_keeps_the_scorers_top_tokens():
    config = get_model_config("tiny")
    model = Llama(config, rngs=nnx.Rngs(0))
    layer = model.layer(0)
    h = jax.random.normal(jax.random.key(1), (1, 64, config.model_dim))

    def scorer(x):  # prefers the last tokens
        return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.float32), x.shape[:2])

    keys = dict.fromkeys(PROJECTIONS)
    out = token_sparse_mlp(layer, h, 16, keys, scorer=scorer)
    np.testing.assert_array_equal(out[:, :48], h[:, :48])  # not chosen: passed through
    assert np.all(np.any(out[:, 48:] != h[:, 48:], axis=-1))  # each chosen row updated


# The `heads` predictors: the oracle over a few chosen heads, from the model's own projections.


def _tiny_attention(length=128, lora=None):
    """A tiny model's layer-0 attention with a random normalised input and its RoPE tables."""
    config = get_model_config("tiny")
    model = Llama(config, lora=lora, rngs=nnx.Rngs(0))
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    cos, sin = rotary_angles(config.rope, config.head_dim, positions)
    x = jax.random.normal(jax.random.key(2), (2, length, config.model_dim))
    heads_config = PredictorConfig(
        num_layers=config.num_layers,
        model_dim=config.model_dim,
        chunk_dim=config.head_dim,
        block_size=16,
        architecture="heads",
        heads=2,
    )
    return model, x, cos, sin, heads_config


def test_heads_scores_shape_causality_and_the_oracle_over_all_heads():
    model, x, cos, sin, config = _tiny_attention()
    attention = model.layer(1).attention
    predictor = BlockScorePredictor(config, nnx.Rngs(0))
    scores = predictor(1, x, attention, cos, sin)
    assert scores.shape == (2, 8) and scores.dtype == jnp.float32
    changed = x.at[:, 5 * 16 : 6 * 16].add(3.0)  # only key blocks <= 5 can see block 5
    new_scores = predictor(1, changed, attention, cos, sin)
    np.testing.assert_array_equal(new_scores[:, 6:], scores[:, 6:])
    assert not np.allclose(new_scores[:, :6], scores[:, :6])
    # Over all heads it is the oracle itself; over two, the oracle of those heads' q and k.
    query, key = attention.rotated_query_key(x, cos, sin)
    num_heads = query.shape[2]
    everything = head_block_scores(attention, x, cos, sin, jnp.arange(num_heads), 16)
    np.testing.assert_allclose(everything, block_scores(query, key, block_size=16), rtol=1e-5)
    group = num_heads // key.shape[2]
    heads = jnp.array([0, num_heads - 1])
    expected = block_scores(query[:, :, heads], key[:, :, heads // group], block_size=16)
    np.testing.assert_allclose(
        head_block_scores(attention, x, cos, sin, heads, 16), expected, rtol=1e-5
    )
    with pytest.raises(ValueError, match="read the layer's own q / k weights"):
        predictor(1, x)


def test_heads_read_the_lora_adapted_projections():
    model, x, cos, sin, _ = _tiny_attention(lora=LoraConfig(rank=2, alpha=4.0))
    attention = model.layer(0).attention
    attention.q_proj.lora_b.set_value(jnp.ones_like(attention.q_proj.lora_b[...]))
    query, key = attention.rotated_query_key(x, cos, sin)
    heads = jnp.array([1])
    group = query.shape[2] // key.shape[2]
    expected = block_scores(query[:, :, heads], key[:, :, heads // group], block_size=16)
    actual = head_block_scores(attention, x, cos, sin, heads, 16)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_heads_save_load_round_trip_and_selection(tmp_path):
    model, x, cos, sin, config = _tiny_attention()
    predictor = BlockScorePredictor(config, nnx.Rngs(0))
    head_recall = jnp.array([[0.1, 0.9, 0.5, 0.7]] * config.num_layers)[:, : model.config.num_heads]
    chosen = select_heads(head_recall, 2)
    assert chosen.dtype == jnp.int32 and chosen.shape == (config.num_layers, 2)
    np.testing.assert_array_equal(chosen[0], np.sort(np.argsort(-head_recall[0])[:2]))
    predictor.layers.heads.set_value(chosen)
    save_predictor(predictor, tmp_path / "heads")
    # The selection keeps its own head count whatever lemo.predictor_heads says now.
    loaded = load_predictor(tmp_path / "heads", expected=dataclasses.replace(config, heads=3))
    assert loaded.config == config
    np.testing.assert_array_equal(loaded.layers.heads[...], chosen)
    attention = model.layer(0).attention
    np.testing.assert_array_equal(
        loaded(0, x, attention, cos, sin), predictor(0, x, attention, cos, sin)
    )


def test_heads_selected_on_training_windows_beat_a_random_scorer(tmp_path):
    config = apply_overrides(
        get_run_config("tiny"),
        [a for a in TINY_ARGS[3::2]]
        + ["lemo.predictor_architecture=heads", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    result = train_predictors(
        config, out=tmp_path / "heads", steps=2, eval_batches=1, show_progress=False
    )
    model, tokenizer = build_model(config.model, None, seq_len=512, seed=config.train.seed)
    _, validation = prepare_data(config.data, tokenizer, 512)
    budgets = layer_budgets(config.lemo, model.config.num_layers, 512)
    batch = oracle_batch(model, jnp.asarray(validation.batch([0])), block_size=16, kernels="xla")
    random_recall = _random_scorer_recall(budgets, batch, config.lemo.keep_first_blocks)
    assert set(result.recall) == {0, 1}
    assert result.mean_recall > random_recall + 0.2, (result.recall, random_recall)
    loaded = load_predictor(
        tmp_path / "heads", expected=predictor_config_for(model.config, config.lemo)
    )
    again = layer_recall(loaded, batch, budgets, config.lemo.keep_first_blocks, model)
    assert again == pytest.approx(result.recall, abs=1e-6)


def test_heads_over_all_heads_select_the_oracles_tokens_in_the_model():
    """Through the model's own selection (`Llama.select_attention_tokens`, the training step's
    path): `heads` predictors holding every head keep exactly the oracle's blocks."""
    model, _, cos, sin, config = _tiny_attention()
    num_heads = model.config.num_heads
    predictor = BlockScorePredictor(dataclasses.replace(config, heads=num_heads), nnx.Rngs(0))
    predictor.layers.heads.set_value(
        jnp.broadcast_to(jnp.arange(num_heads, dtype=jnp.int32), (config.num_layers, num_heads))
    )
    model.block_predictor = predictor
    h = jax.random.normal(jax.random.key(3), (2, 128, model.config.model_dim))
    plan = EliminationPlan(block_size=16, groups=(GroupPlan(0, 2, 3),), scorer="oracle")
    oracle = model.select_attention_tokens(h, cos, sin, 1, num_blocks=3, plan=plan)
    predicted = model.select_attention_tokens(
        h, cos, sin, 1, num_blocks=3, plan=dataclasses.replace(plan, scorer="predictor")
    )
    np.testing.assert_array_equal(predicted, oracle)


def test_predictor_heads_sets_the_untrained_and_selected_head_count():
    """`lemo.predictor_heads` reaches every `heads` predictor built for a model (untrained ones
    for benchmarks too); more heads than the model has is a one-line error."""
    model_config = get_model_config("tiny")
    lemo = apply_overrides(
        get_run_config("tiny"), ["lemo.predictor_architecture=heads", "lemo.predictor_heads=3"]
    ).lemo
    config = predictor_config_for(model_config, lemo)
    assert config.heads == 3
    assert BlockScorePredictor(config, nnx.Rngs(0)).layers.heads[...].shape == (
        model_config.num_layers,
        3,
    )
    # Other architectures ignore it (and keep loading predictors saved with the default).
    pooled = dataclasses.replace(lemo, predictor_architecture="pooled")
    assert predictor_config_for(model_config, pooled).heads == PredictorConfig.heads
    too_many = dataclasses.replace(lemo, predictor_heads=model_config.num_heads + 1)
    with pytest.raises(UserError, match="more than the model's"):
        predictor_config_for(model_config, too_many)
