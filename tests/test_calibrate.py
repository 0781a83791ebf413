"""Budget calibration: per-layer oracle scores, the threshold rule, and the script end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_scripts import run_script
from tolerances import TOLERANCES, relative_error

from lemo_jax.configs import get_model_config
from lemo_jax.lemo import LemoConfig, layer_budgets, read_schedule_file
from lemo_jax.lemo.budgets import elimination_plan
from lemo_jax.lemo.calibrate import (
    calibrated_keep_ratios,
    layer_block_scores,
    loss_bounded_keep_ratios,
    mean_window_loss,
    single_layer_loss_rises,
)
from lemo_jax.lemo.layer import GroupPlan
from lemo_jax.model import Llama
from lemo_jax.model.rope import rotary_angles
from pallas_kernels.block_scores import block_scores_reference

FP32 = TOLERANCES[jnp.dtype(jnp.float32)]
CONFIG = dataclasses.replace(get_model_config("tiny"), num_layers=3, compute_dtype="float32")
TEXT = "\n".join(
    f"def function_{i}(value):\n    return value * {i} + {i % 7}\n" for i in range(500)
)


def test_layer_block_scores_match_layer_by_layer_reference():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    B, T, block = 2, 96, 32
    token_ids = jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)
    scores = layer_block_scores(model, token_ids, block_size=block)
    assert scores.shape == (CONFIG.num_layers, B, T // block) and scores.dtype == jnp.float32

    # Independent path: each layer merged out of the stack on its own, run eagerly, and scored
    # with the direct O(T * S) reference instead of the tiled kernel.
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rotary_angles(CONFIG.rope, CONFIG.head_dim, positions)
    graphdef, stacked = nnx.split(model.layers)
    h = model.embedding(token_ids)
    with jax.default_matmul_precision("highest"):
        for index in range(CONFIG.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda p, i=index: p[i], stacked))
            query, key = layer.attention.rotated_query_key(layer.attention_norm(h), cos, sin)
            expected = block_scores_reference(query, key, block_size=block, causal=True)
            assert relative_error(scores[index], expected) <= FP32.forward, index
            h = layer(h, cos, sin, None)
        # The layer-by-layer path is the model's own forward pass.
        assert relative_error(model.final_norm(h), model.hidden_states(token_ids)) <= FP32.forward


def test_ragged_last_block_counts_as_a_block():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    scores = layer_block_scores(model, np.zeros((1, 80), np.int32), block_size=32)
    assert scores.shape == (CONFIG.num_layers, 1, 3)


def ratios(scores, **options) -> list[float]:
    return calibrated_keep_ratios(
        np.asarray(scores, np.float32), use_dense_end_layers=False, **options
    )


def test_threshold_against_the_maximum_without_outliers():
    # 11 blocks, q=0.9: the reference is the floor(0.9 * 10) = 9th smallest (index 9 sorted),
    # so only the top block (the causal sink, 1000) is an outlier; the reference is 10.
    example = [1000, 10, 9, 5, 1, 0.99, 0.5, 3, 0, 2, 0.2]
    # tau=0.1: informative >= 1.0 -> 1000, 10, 9, 5, 1, 3, 2 = 7 of 11.
    assert ratios([[example]], outlier_quantile=0.9) == [7 / 11]
    # tau=0.5: >= 5 -> 1000, 10, 9, 5 = 4 of 11; tau=1: >= 10 -> 2 of 11.
    assert ratios([[example]], outlier_quantile=0.9, tau=0.5) == [4 / 11]
    assert ratios([[example]], outlier_quantile=0.9, tau=1.0) == [2 / 11]
    # Without outlier exclusion the sink sets the bar at 100: only itself passes.
    assert ratios([[example]], outlier_quantile=1.0) == [1 / 11]


def test_default_quantile_excludes_the_top_block_of_a_short_sequence():
    # 8 blocks, q=0.99: floor(0.99 * 7) = 6 -> the second largest (40) is the reference.
    example = [400, 40, 20, 4, 3.9, 8, 1, 0]
    assert ratios([[example]]) == [5 / 8]  # >= 4: 400, 40, 20, 4, 8


def test_mean_over_examples_per_layer_and_dense_end_layers():
    # Per layer, the ratio is the mean of the per-example fractions (q=0.75 of 5 blocks: the
    # 4th smallest, index 3 sorted, so one outlier per example).
    layer_scores = [
        [[50, 10, 1, 0.5, 2], [9, 8, 7, 6, 5]],  # ref 10 -> 4/5; ref 8 -> 5/5
        [[90, 10, 0.9, 0.1, 0], [50, 10, 0.9, 0.1, 0]],  # ref 10 -> 2/5 and 2/5
        [[0, 0, 0, 0, 0], [100, 0, 0, 0, 0]],  # all zero keeps all; ref 0 -> 5/5 too
        [[1, 1, 1, 1, 100], [100, 100, 100, 100, 100]],  # 5/5 and 5/5
    ]
    measured = ratios(layer_scores, outlier_quantile=0.75)
    assert measured == [0.9, 0.4, 1.0, 1.0]
    assert ratios(layer_scores, outlier_quantile=0.75, min_ratio=0.5)[1] == 0.5
    dense_ends = calibrated_keep_ratios(np.asarray(layer_scores[1:2] * 4), outlier_quantile=0.75)
    assert dense_ends == [1.0, 0.4, 0.4, 1.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(outlier_quantile=1.2), "outlier_quantile"),
        (dict(min_ratio=-0.1), "min_ratio"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        calibrated_keep_ratios(np.ones((2, 1, 4)), **options)


def test_invalid_scores():
    with pytest.raises(ValueError, match=r"\[L, B, M\]"):
        calibrated_keep_ratios(np.ones((2, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        calibrated_keep_ratios(-np.ones((2, 1, 4)))


def test_script_writes_a_usable_schedule(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "budgets.json"
    overrides = [
        f"data.train={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.seq_len=256",
        "lemo.block_size=32",
    ]
    set_args = [arg for override in overrides for arg in ("--set", override)]
    result = run_script(
        "calibrate_budgets.py", "--config", "tiny", *set_args, "--samples", "3", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    num_layers = get_model_config("tiny").num_layers
    ratios = read_schedule_file(str(out), "attention", num_layers)
    assert ratios[0] == ratios[-1] == 1.0  # dense end layers by default
    source = json.loads(out.read_text())["source"]
    assert source["config"] == "tiny" and source["samples"] == 3 and source["tau"] == 0.1
    assert source["seq_len"] == 256 and source["block_size"] == 32
    lemo = LemoConfig(enabled=True, schedule=f"file:{out}", block_size=32)
    budgets = layer_budgets(lemo, num_layers, 256)
    assert budgets.num_blocks == 8 and len(budgets.attention_blocks) == num_layers
    assert "layer  keep ratio" in result.stdout and f"file:{out}" in result.stdout

    # The measured end layers: real ratios in (0, 1] that budgets can also use.
    sparse = tmp_path / "sparse.json"
    result = run_script(
        "calibrate_budgets.py",
        *("--config", "tiny", *set_args, "--samples", "2", "--sparse-end-layers"),
        *("--out", str(sparse)),
    )
    assert result.returncode == 0, result.stderr
    measured = read_schedule_file(str(sparse), "attention", num_layers)
    assert all(0 < ratio <= 1 for ratio in measured)
    layer_budgets(dataclasses.replace(lemo, schedule=f"file:{sparse}"), num_layers, 256)

    # An existing --out is a one-line error and is left untouched.
    before = out.read_text()
    result = run_script("calibrate_budgets.py", "--config", "tiny", *set_args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0]
    assert out.read_text() == before


def test_single_layer_rises_match_a_plan_pruning_that_layer_alone():
    """One compilation serves every layer; each rise equals the loss of the model's own LeMo
    forward pass with a plan that prunes just that layer."""
    config = dataclasses.replace(CONFIG, num_layers=4)
    model = Llama(config, rngs=nnx.Rngs(0))
    windows = jax.random.randint(jax.random.key(3), (2, 256), 0, config.vocab_size)
    lemo = LemoConfig(enabled=True, schedule="uniform:0.5", block_size=32, merge_lone_layers=False)
    trial = elimination_plan(lemo, config.num_layers, 256)
    dense = mean_window_loss(model, windows, None)
    rises = single_layer_loss_rises(model, windows, num_blocks=4, plan=trial, dense_loss=dense)
    assert rises.shape == (4,) and np.all(rises != 0)
    for layer in range(config.num_layers):
        groups = [GroupPlan(layer, layer + 1, 4)]
        if layer:
            groups.insert(0, GroupPlan(0, layer))
        if layer < config.num_layers - 1:
            groups.append(GroupPlan(layer + 1, config.num_layers))
        plan = dataclasses.replace(trial, groups=tuple(groups))
        expected = mean_window_loss(model, windows, plan) - dense
        assert abs(rises[layer] - expected) <= FP32.forward * abs(dense), layer


def test_loss_bounded_ratios_take_the_least_harmful_layers_within_the_bound():
    single = [0.5, 0.01, 0.03, 0.2, 0.02, 0.9]  # layers 0 and 5 are end layers

    def joint(ratios):  # interactions: the joint rise exceeds the sum
        calls.append(ratios)
        return 2.0 * sum(rise for rise, ratio in zip(single, ratios, strict=True) if ratio < 1)

    calls = []
    result = loss_bounded_keep_ratios(single, max_rise=0.1, trial_ratio=0.4, joint_rise=joint)
    # Candidates by own rise, without the end layers and layer 3 (alone above the bound).
    assert result.order == [1, 4, 2]
    # 1 + 4 + 2 would be 0.06 summed but measures 0.12: only layers 1 and 4 are taken.
    assert result.ratios == [1.0, 0.4, 1.0, 1.0, 0.4, 1.0]
    assert result.rise == pytest.approx(0.06) and len(calls) == len(result.evaluated) <= 2
    everything = loss_bounded_keep_ratios(
        single, max_rise=5.0, trial_ratio=0.4, joint_rise=joint, use_dense_end_layers=False
    )
    assert everything.ratios == [0.4] * 6
    nothing = loss_bounded_keep_ratios(single, max_rise=0.001, trial_ratio=0.4, joint_rise=joint)
    assert nothing.ratios == [1.0] * 6 and nothing.rise == 0.0 and nothing.evaluated == []
    with pytest.raises(ValueError, match="max_rise"):
        loss_bounded_keep_ratios(single, max_rise=0.0, trial_ratio=0.4, joint_rise=joint)


def test_script_bounds_the_budgets_by_the_loss(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "loss.json"
    overrides = [
        f"data.train={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.seq_len=256",
        "lemo.block_size=32",
        "lemo.merge_lone_layers=false",
    ]
    set_args = [arg for override in overrides for arg in ("--set", override)]
    result = run_script(
        "calibrate_budgets.py",
        *("--config", "tiny", *set_args, "--samples", "2", "--max-loss-rise", "0.05"),
        *("--trial-ratio", "0.5", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    content = json.loads(out.read_text())
    source, ratios = content["source"], content["attention"]
    assert set(ratios) <= {0.5, 1.0} and ratios[0] == ratios[-1] == 1.0
    assert len(source["single_layer_rises"]) == len(ratios) and source["trial_blocks"] == 4
    assert source["loss_rise"] <= 0.05
    # The rise written is the one measured for exactly the layers taken.
    taken = sum(ratio < 1 for ratio in ratios)
    probes = {probe["layers"]: probe["rise"] for probe in source["joint_probes"]}
    assert taken == 0 or probes[taken] == source["loss_rise"]
    assert "of tokens kept" in result.stdout

    result = run_script(
        "calibrate_budgets.py",
        *("--config", "tiny", *set_args, "--max-loss-rise", "-1", "--out", str(tmp_path / "x")),
    )
    assert result.returncode == 2 and "--max-loss-rise must be positive" in result.stderr
