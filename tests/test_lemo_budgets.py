"""LeMo configs and static per-layer budgets: exact schedules, bucketing, groups, schedule files."""

import json
import math

import jax
import pytest

from lemo_jax.errors import UserError
from lemo_jax.lemo import (
    LemoConfig,
    attention_keep_ratios,
    layer_budgets,
    mlp_keep_ratios,
    read_schedule_file,
    write_schedule_file,
)
from lemo_jax.lemo.budgets import (
    PAPER_ATTENTION_TABLE,
    PAPER_MLP_TABLE,
    elimination_plan,
    executed_budgets,
)


def test_default_config_is_disabled_and_valid():
    config = LemoConfig()
    assert not config.enabled
    assert (config.block_size, config.schedule, config.mlp) == (64, "paper_e2e", "dense")


def test_paper_tables_match_the_paper_means():
    # Paper section 2: 38.2% of attention and 51.1% of MLP blocks eliminated on average (the
    # printed MLP table averages 51.0%, a rounding difference in the paper).
    assert 1 - sum(PAPER_ATTENTION_TABLE) / 32 == pytest.approx(0.382, abs=5e-4)
    assert 1 - sum(PAPER_MLP_TABLE) / 32 == pytest.approx(0.511, abs=2e-3)


def test_paper_e2e_at_32_layers_is_the_papers_rule():
    ratios = attention_keep_ratios(LemoConfig(), 32)
    assert ratios == [1.0] * 15 + [0.4] * 16 + [1.0]


def test_paper_e2e_generalises_by_proportion():
    # round(15/32 * 30) = 14 dense layers, then 15 sparse and the dense last layer: half the
    # layers are sparse, as in the 32-layer rule (SmolLM2 has 30 layers).
    assert attention_keep_ratios(LemoConfig(), 30) == [1.0] * 14 + [0.4] * 15 + [1.0]
    assert attention_keep_ratios(LemoConfig(), 64) == [1.0] * 30 + [0.4] * 33 + [1.0]
    assert attention_keep_ratios(LemoConfig(), 2) == [1.0, 1.0]
    assert attention_keep_ratios(LemoConfig(), 1) == [1.0]


def test_paper_table_at_32_layers_is_exact():
    config = LemoConfig(schedule="paper_table", mlp="token_sparse")
    assert attention_keep_ratios(config, 32) == list(PAPER_ATTENTION_TABLE)
    assert mlp_keep_ratios(config, 32) == list(PAPER_MLP_TABLE)


@pytest.mark.parametrize("num_layers", [8, 64])
def test_paper_table_interpolates_over_relative_depth(num_layers):
    table = PAPER_ATTENTION_TABLE
    ratios = attention_keep_ratios(LemoConfig(schedule="paper_table"), num_layers)
    assert len(ratios) == num_layers
    assert (ratios[0], ratios[-1]) == (table[0], table[-1])
    for layer, ratio in enumerate(ratios):
        position = layer * 31 / (num_layers - 1)
        low, high = table[math.floor(position)], table[math.ceil(position)]
        assert min(low, high) - 1e-12 <= ratio <= max(low, high) + 1e-12
    # Table layers 0..5 never increase, so neither do the layers interpolated among them.
    early = [ratio for layer, ratio in enumerate(ratios) if layer * 31 / (num_layers - 1) <= 5]
    assert early == sorted(early, reverse=True) and len(early) >= 2


def test_paper_table_at_8_layers_values():
    ratios = attention_keep_ratios(LemoConfig(schedule="paper_table"), 8)
    # Layer 1 sits at table position 31/7 = 4.43, between 0.92 (4) and 0.88 (5).
    assert ratios[1] == pytest.approx(0.92 + (0.88 - 0.92) * (31 / 7 - 4))


def test_uniform_and_dense_mlp_ratios():
    config = LemoConfig(schedule="uniform:0.25")
    assert attention_keep_ratios(config, 3) == [0.25] * 3
    assert mlp_keep_ratios(config, 3) == [1.0] * 3
    sparse = LemoConfig(mlp="token_sparse", mlp_schedule="uniform:0.5")
    assert mlp_keep_ratios(sparse, 2) == [0.5, 0.5]


def test_budgets_round_up_to_buckets():
    budgets = layer_budgets(LemoConfig(), 32, 65536)
    assert budgets.num_blocks == 1024
    # 0.4 * 1024 = 409.6 -> 410 blocks -> 412, the next multiple of 4.
    assert budgets.attention_blocks == (1024,) * 15 + (412,) * 16 + (1024,)
    assert budgets.mlp_blocks == (None,) * 32


def test_budget_rounding_ignores_floating_point_noise():
    # 0.3 * 10 is 3.0000000000000004; the budget is 3 blocks, not 4.
    budgets = layer_budgets(LemoConfig(schedule="uniform:0.3", bucket_blocks=1), 1, 640)
    assert budgets.attention_blocks == (3,)


def test_budgets_are_clamped():
    tiny = layer_budgets(LemoConfig(schedule="uniform:0.01", bucket_blocks=1), 1, 640)
    assert tiny.attention_blocks == (1,)
    sinks = LemoConfig(schedule="uniform:0.01", bucket_blocks=1, keep_first_blocks=3)
    assert layer_budgets(sinks, 1, 640).attention_blocks == (3,)
    # Rounding up to a bucket of 4 would pass the 6 blocks of the sequence: clamp to dense.
    assert layer_budgets(LemoConfig(schedule="uniform:0.9"), 1, 384).attention_blocks == (6,)


def test_paper_e2e_has_three_groups():
    groups = layer_budgets(LemoConfig(), 32, 65536).groups()
    assert [(g.start, g.stop, g.attention_blocks, g.mlp_blocks) for g in groups] == [
        (0, 15, 1024, None),
        (15, 31, 412, None),
        (31, 32, 1024, None),
    ]
    assert [g.is_dense for g in groups] == [True, False, True]


def test_uniform_one_is_one_dense_group():
    budgets = layer_budgets(LemoConfig(schedule="uniform:1"), 30, 8192)
    (group,) = budgets.groups()
    assert (group.start, group.stop, group.num_layers, group.is_dense) == (0, 30, 30, True)
    assert budgets.kept_fraction() == ([1.0] * 30, 1.0)


def test_token_sparse_mlp_splits_groups_and_full_budgets_are_dense():
    config = LemoConfig(mlp="token_sparse", mlp_schedule="paper_e2e", schedule="uniform:0.5")
    budgets = layer_budgets(config, 4, 4096)  # 64 blocks; e2e at 4 layers: 1.0 1.0 0.4 1.0
    assert budgets.attention_blocks == (32,) * 4
    assert budgets.mlp_blocks == (None, None, 28, None)
    groups = budgets.groups()
    assert [(g.start, g.stop, g.mlp_blocks) for g in groups] == [
        (0, 2, None),
        (2, 3, 28),
        (3, 4, None),
    ]
    assert not any(g.is_dense for g in groups)
    assert all(not g.is_attention_dense for g in groups)
    assert (
        "3 layer groups of 64 blocks: 0-1 attention 32; 2 attention 32 mlp 28" in budgets.summary()
    )


def test_kept_fraction_is_token_weighted():
    budgets = layer_budgets(LemoConfig(), 32, 65536)
    per_layer, overall = budgets.kept_fraction()
    assert per_layer == [1.0] * 15 + [412 / 1024] * 16 + [1.0]
    assert overall == pytest.approx((16 + 16 * 412 / 1024) / 32)
    assert budgets.kept_fraction("mlp") == ([1.0] * 32, 1.0)
    with pytest.raises(ValueError, match="sublayer='ffn'"):
        budgets.kept_fraction("ffn")


@pytest.mark.parametrize("seq_len", [1000, 32])
def test_seq_len_must_be_a_multiple_of_the_block(seq_len):
    message = f"train.seq_len={seq_len} is not a multiple of lemo.block_size=64"
    with pytest.raises(UserError, match=message):
        layer_budgets(LemoConfig(), 32, seq_len)


def test_schedule_file_round_trip(tmp_path):
    path = str(tmp_path / "schedule.json")
    attention, mlp = [1.0, 0.5, 0.25], [0.75, 0.5, 1]
    write_schedule_file(path, attention, mlp, source={"model": "test"})
    assert json.loads((tmp_path / "schedule.json").read_text())["source"] == {"model": "test"}
    config = LemoConfig(schedule=f"file:{path}", mlp="token_sparse", mlp_schedule=f"file:{path}")
    assert attention_keep_ratios(config, 3) == attention
    assert mlp_keep_ratios(config, 3) == [0.75, 0.5, 1.0]
    budgets = layer_budgets(config, 3, 1024)  # 16 blocks
    assert budgets.attention_blocks == (16, 8, 4)
    assert budgets.mlp_blocks == (12, 8, None)


def test_schedule_file_without_mlp(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"attention": [0.5, 0.5]}))
    config = LemoConfig(schedule=f"file:{path}", mlp="token_sparse", mlp_schedule=f"file:{path}")
    assert attention_keep_ratios(config, 2) == [0.5, 0.5]
    with pytest.raises(UserError, match="has no 'mlp' list of per-layer keep ratios"):
        mlp_keep_ratios(config, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read: No such file or directory"),
        ("{not json", "is not valid JSON"),
        ("[0.5, 0.5]", "has no 'attention' list"),
        ('{"attention": [0.5, 0.5, 0.5]}', "has 3 attention ratios but the model has 2 layers"),
        ('{"attention": [0.5, 1.5]}', r"attention\[1\]=1.5 is not a keep ratio in \(0, 1\]"),
        ('{"attention": [0, 0.5]}', r"attention\[0\]=0 is not a keep ratio"),
        ('{"attention": [true, 0.5]}', r"attention\[0\]=True is not a keep ratio"),
    ],
)
def test_schedule_file_errors(tmp_path, content, message):
    path = tmp_path / "schedule.json"
    if content is not None:
        path.write_text(content)
    config = LemoConfig(schedule=f"file:{path}")  # the file is only read for budgets
    with pytest.raises(UserError, match=message) as error:
        attention_keep_ratios(config, 2)
    assert str(error.value).startswith(f"lemo.schedule='file:{path}': {path}")
    with pytest.raises(UserError, match=message):
        read_schedule_file(str(path), "attention", 2)


def test_write_schedule_file_checks_ratios(tmp_path):
    with pytest.raises(UserError, match="has 1 mlp ratios but the model has 2 layers"):
        write_schedule_file(str(tmp_path / "s.json"), [0.5, 0.5], [0.5])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"block_size": 60}, "lemo.block_size=60 must be a positive multiple of 16"),
        ({"block_size": 0}, "lemo.block_size=0 must be a positive multiple of 16"),
        (
            {"schedule": "uniform:1.5"},
            r"lemo.schedule='uniform:1.5': the ratio must be in \(0, 1\]",
        ),
        ({"schedule": "uniform:0"}, r"lemo.schedule='uniform:0': the ratio must be in \(0, 1\]"),
        ({"schedule": "uniform:nan"}, r"lemo.schedule='uniform:nan': the ratio must be in"),
        ({"schedule": "uniform:half"}, r"'uniform:half': the ratio must be a number in \(0, 1\]"),
        ({"schedule": "file:"}, "lemo.schedule='file:': the file path is empty"),
        (
            {"schedule": "paper"},
            "lemo.schedule='paper' is not one of paper_e2e, paper_table, uniform:RATIO, file:PATH",
        ),
        ({"schedule": "paper_e2e:2"}, "lemo.schedule='paper_e2e:2' is not one of paper_e2e"),
        ({"mlp": "sparse"}, r"lemo.mlp='sparse' is not one of \('dense', 'token_sparse'\)"),
        ({"mlp_schedule": "uniform:2"}, r"lemo.mlp_schedule='uniform:2': the ratio must be in"),
        ({"mlp_schedule": "table"}, "lemo.mlp_schedule='table' is not one of paper_e2e"),
        ({"bucket_blocks": 0}, "lemo.bucket_blocks=0 must be at least 1"),
        (
            {"scorer": "predictor"},
            "lemo.scorer=predictor needs lemo.predictor_path=DIR",
        ),
        ({"scorer": "random"}, r"lemo.scorer='random' is not one of \('oracle', 'predictor'\)"),
        ({"keep_first_blocks": -1}, "lemo.keep_first_blocks=-1 must be >= 0"),
        ({"kernels": "triton"}, r"lemo.kernels='triton' is not one of \('auto', 'pallas', 'xla'\)"),
        (
            {"kernels": "pallas", "block_size": 48},
            "lemo.kernels=pallas needs a power-of-two lemo.block_size, got 48",
        ),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        LemoConfig(**fields)
    assert "\n" not in str(error.value)


def test_kernels_resolve_to_xla_off_the_gpu_and_reach_the_plan():
    plan = elimination_plan(LemoConfig(enabled=True, schedule="uniform:0.5"), 2, 1024)
    on_gpu = jax.default_backend() == "gpu"
    assert (plan.kernels, plan.row_kernels) == (("pallas",) * 2 if on_gpu else ("xla",) * 2)
    forced = LemoConfig(enabled=True, schedule="uniform:0.5", kernels="pallas")
    forced_plan = elimination_plan(forced, 2, 1024)
    assert (forced_plan.kernels, forced_plan.row_kernels) == ("pallas", "pallas")
    odd_blocks = LemoConfig(enabled=True, schedule="uniform:0.5", block_size=48)
    assert elimination_plan(odd_blocks, 2, 1920).kernels == "xla"  # the kernel needs 2^k


def test_elimination_plan_has_no_single_layer_groups():
    from lemo_jax.lemo.budgets import elimination_plan

    e2e = elimination_plan(LemoConfig(enabled=True, schedule="paper_e2e"), 32, 65536)
    spans = [(g.start, g.stop, g.attention_blocks) for g in e2e.groups]
    assert spans == [(0, 15, None), (15, 30, 412), (30, 32, None)]  # layer 30 rounded up to dense
    table = elimination_plan(
        LemoConfig(enabled=True, schedule="paper_table", mlp="token_sparse"), 32, 65536
    )
    assert all(g.stop - g.start >= 2 for g in table.groups)
    budgets = layer_budgets(LemoConfig(enabled=True, schedule="paper_table"), 32, 65536)
    for group in table.groups:  # merged budgets never keep fewer blocks than the layer's own
        for layer in range(group.start, group.stop):
            own = budgets.attention_blocks[layer]
            assert group.attention_blocks is None or group.attention_blocks >= own
    assert elimination_plan(LemoConfig(enabled=False), 32, 65536) is None


def test_executed_budgets_report_what_the_plan_runs():
    # paper_e2e on 30 layers: [0-13 dense][14-28 pruned][29 dense]; the lone last layer borrows
    # layer 28, which then runs dense, so 14 layers eliminate, not the schedule's 15.
    config = LemoConfig(enabled=True, schedule="paper_e2e")
    scheduled = layer_budgets(config, 30, 4096)
    executed = executed_budgets(config, 30, 4096)
    assert scheduled.attention_blocks[28] == 28 and executed.attention_blocks[28] == 64
    assert executed.attention_blocks[:28] == scheduled.attention_blocks[:28]
    plan = elimination_plan(config, 30, 4096)
    assert [(g.start, g.stop, g.attention_blocks) for g in plan.groups] == [
        (0, 14, None),
        (14, 28, 28),
        (28, 30, None),
    ]
    assert executed.kept_fraction()[1] == (16 * 64 + 14 * 28) / (30 * 64)
    assert executed.kept_fraction()[1] > scheduled.kept_fraction()[1]


@pytest.mark.parametrize(
    ("merge_lone_layers", "pruned"), [(True, range(15, 30)), (False, range(15, 31))]
)
def test_mlp_budgets_never_make_a_pruned_layer_dense(merge_lone_layers, pruned):
    # The paper's MLP table gives every layer its own MLP budget: one-layer groups everywhere.
    config = LemoConfig(
        enabled=True,
        schedule="paper_e2e",
        mlp="token_sparse",
        mlp_schedule="paper_table",
        merge_lone_layers=merge_lone_layers,
    )
    plan = elimination_plan(config, 32, 65536)
    pruned_layers = [
        layer
        for group in plan.groups
        if group.attention_blocks is not None
        for layer in range(group.start, group.stop)
    ]
    assert pruned_layers == list(pruned)
    sizes = [group.stop - group.start for group in plan.groups]
    assert min(sizes) >= (2 if merge_lone_layers else 1) and sizes.count(1) <= 1
    # Every layer keeps at least its scheduled MLP tokens.
    scheduled = layer_budgets(config, 32, 65536).mlp_blocks
    for group in plan.groups:
        assert all(group.mlp_blocks >= scheduled[i] for i in range(group.start, group.stop))
