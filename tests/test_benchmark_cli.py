"""scripts/benchmark.py and scripts/bench_kernels.py: JSON lines, tables, plots, errors."""

import argparse
import json
import math

import pytest
from run_scripts import load_script, run_script

from lemo_jax.configs.runs import get_run_config
from lemo_jax.errors import UserError

TINY_LEMO = ["--set", "lemo.schedule=uniform:0.5", "--set", "lemo.block_size=16"]


def test_compiled_memory_report():
    result = run_script(
        "benchmark.py",
        *("--config", "tiny", "--seq-lens", "512", "--modes", "dense,lemo,lemo_predictor"),
        *("--measure", "compiled-memory", *TINY_LEMO, "--set", "train.remat=none"),
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    modes = [(row["mode"], row["seq_len"]) for row in rows]
    assert modes == [("dense", 512), ("lemo", 512), ("lemo_predictor", 512)]
    dense, lemo, predictor = rows
    assert 0 < lemo["temp_gib"] < dense["temp_gib"]
    assert lemo["argument_gib"] == dense["argument_gib"]  # same weights and optimizer state
    # The predictors ride in the (frozen) arguments; their scores replace the oracle's.
    assert predictor["argument_gib"] > lemo["argument_gib"]
    assert 0 < predictor["temp_gib"] < dense["temp_gib"]


def test_bad_lengths_are_one_line_errors():
    result = run_script("benchmark.py", "--config", "tiny", "--seq-lens", "4k", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --seq-lens expects")


def test_step_time_report_runs_each_configuration_in_its_own_process(tmp_path):
    result = run_script(
        "benchmark.py",
        *("--config", "tiny", "--seq-lens", "256", "--modes", "hf_peft,dense,lemo"),
        *("--measure", "step-time", "--steps", "2", *TINY_LEMO),
        *("--plot", str(tmp_path / "steps.png"), "--profile", str(tmp_path / "profile")),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(row["mode"], row["seq_len"]) for row in rows] == [
        ("hf_peft", 256),
        ("dense", 256),
        ("lemo", 256),
    ]
    peer, dense, lemo = rows
    for row in rows:
        assert "error" not in row, row
        assert 0 < row["step_s"] <= row["median_step_s"]
        assert row["tokens_per_s"] == 256 / row["step_s"]
        # Random weights of the same shape: the first losses are near ln(vocabulary).
        assert abs(row["loss"] - math.log(512)) < 0.5, row
    assert "peft" in peer["implementation"] and peer["device"] == "cpu"
    assert dense["compiled_gib"] > 0 and dense["kept_fraction"] == 1.0
    # The same training state (weights, adapters, AdamW moments) in both of our modes.
    assert dense["state_gib"] > 0 and lemo["state_gib"] == pytest.approx(dense["state_gib"])
    assert lemo["kept_fraction"] == 0.5
    assert lemo["layer_groups"] == 1 and lemo["temp_gib"] < dense["temp_gib"]
    table = result.stdout[result.stdout.index("| tokens | mode |") :].split("\n\n")[0].splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| 256 | hf_peft | ")
    assert table[2].split("|")[9].strip() == "1.00"  # hf_peft against itself
    # The selection (oracle scorer + top-k) is timed for LeMo only, as a share of its step.
    assert dense["selection_s"] is None and table[3].split("|")[8].strip() == "-"
    assert 0 < lemo["selection_s"] < lemo["median_step_s"]
    assert lemo["selection_share"] == pytest.approx(lemo["selection_s"] / lemo["median_step_s"])
    # One more step of our modes ran under the profiler: its ops, summed by name, on disk too.
    assert "profile" not in peer
    for row in (dense, lemo):
        profile = row["profile"]
        assert profile["source"] == "host" and profile["total_ms"] > 0
        assert sum(profile["categories_ms"].values()) == pytest.approx(profile["total_ms"])
        saved = tmp_path / "profile" / f"{row['mode']}_256" / "profile_summary.json"
        assert json.loads(saved.read_text())["top_ops_ms"] == profile["top_ops_ms"]
    assert "| 256 | lemo | " in result.stdout[result.stdout.index("| ops total (ms) |") :]
    for row in rows:  # the same dense FLOPs for every mode
        assert row["model_tflops"] * row["median_step_s"] == pytest.approx(
            rows[0]["model_tflops"] * rows[0]["median_step_s"]
        )


def test_table_reports_activation_memory_against_dense():
    """Activation memory is the peak minus the training state; the ratio is to dense's."""
    common = dict(seq_len=8192, step_s=1.0, median_step_s=1.0, tokens_per_s=8192.0)
    rows = [
        dict(mode="dense", peak_gib=72.0, state_gib=12.0, **common),
        dict(mode="lemo", peak_gib=42.0, state_gib=12.0, **common),
        dict(mode="lemo_predictor", error="out of memory", seq_len=8192),
    ]
    table = load_script("benchmark").markdown_table(rows).splitlines()
    assert table[0].split("|")[-2].strip() == "activations / dense"
    cells = [line.split("|") for line in table[2:]]
    assert [row[-2].strip() for row in cells] == ["1.00", "0.50", "-"]
    assert cells[1][-3].strip() == "0.58"  # peak / dense: 42 / 72
    assert all(len(row) == len(cells[0]) for row in cells)


def test_kernel_benchmark_reports_ceilings_and_fractions():
    result = run_script(
        "bench_kernels.py",
        *("--seq-lens", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "64"),
        *("--repeats", "1", "--model-dim", "64", "--ceiling-size", "512"),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["matmul_tflops"] > 0 and lines[0]["copy_tbps"] > 0
    row = lines[1]
    assert (row["op"], row["impl"], row["seq_len"]) == ("block_scores", "xla", 256)
    assert row["ms"] > 0 and row["fraction_of_ceiling"] > 0
    assert row["timing"] == lines[0]["timing"] == "wall" and "device_ms" not in row  # CPU default
    assert row["ms"] == row["wall_ms"]


def test_kernel_benchmark_device_timing_and_checked_outputs():
    """Device timing (on a CPU: the trace's host op events) for the ops and the ceilings alike,
    wall times beside them, and each Pallas output checked against XLA's."""
    result = run_script(
        "bench_kernels.py",
        *("--seq-lens", "256", "--ops", "selective_load,residual_add", "--impls", "xla,pallas"),
        *("--repeats", "2", "--model-dim", "64", "--ceiling-size", "256", "--timing", "device"),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    ceilings, rows = lines[0], lines[1:]
    assert ceilings["timing"] == "device"
    assert ceilings["copy_tbps"] > 0 and ceilings["wall_copy_tbps"] > 0
    assert [(row["op"], row["impl"]) for row in rows] == [
        (op, impl) for op in ("selective_load", "residual_add") for impl in ("xla", "pallas")
    ]
    for row in rows:
        assert row["timing"] == "device" and row["time_source"] == "host"
        assert row["ms"] == row["device_ms"] > 0 and row["wall_ms"] > 0
        assert row["fraction_of_ceiling"] == pytest.approx(row["rate"] / ceilings["copy_tbps"])
        assert row["wall_fraction_of_ceiling"] > 0 and row["kernels_ms"]
        # The Pallas output checked against XLA's (bf16: one addition is exact).
        if row["impl"] == "xla":
            assert "error_vs_xla" not in row
        elif row["op"] == "residual_add":
            assert row["error_vs_xla"] == 0
        else:
            assert row["error_vs_xla"] < 1e-2
    assert "device ms" in result.stdout and "vs xla" in result.stdout


def test_kernel_benchmark_flags_fail_in_one_line_and_the_budget_skips(capsys):
    bench = load_script("bench_kernels")
    for argv, match in [
        (["--timing", "gpu"], "--timing must be one of device, wall"),
        (["--repeats", "x"], "argument --repeats: invalid int value"),
        (["--score-tiles", "3x2"], "--score-tiles expects powers of two"),
        (["--score-warps", "6"], "--score-warps expects powers of two"),
        (["--impls", "triton"], "--impls: unknown"),
    ]:
        with pytest.raises(UserError, match=match):
            bench.main(argv)
    tiny = ["--seq-lens", "256", "--ops", "selective_load", "--model-dim", "64", "--repeats", "1"]
    bench.main([*tiny, "--ceiling-size", "64", "--budget-s", "1e-9"])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")][1:]
    assert rows == [
        dict(op="selective_load", impl="xla", seq_len=256, skipped="--budget-s 1e-09 spent")
    ]
    assert "skipped: --budget-s" in out


def test_kernel_benchmark_labels_block_score_tiles_and_splits():
    result = run_script(
        "bench_kernels.py",
        *("--seq-lens", "256", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"),
        *("--repeats", "1", "--impls", "pallas", "--ops", "block_scores"),
        *("--block-size", "16", "--score-tiles", "2x1", "--score-splits", "1,auto"),
        *("--ceiling-size", "512"),
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][1:]
    labels = [row["impl"] for row in rows]
    assert labels == ["pallas:2x1", "pallas:2x1/sauto"]
    bad = run_script("bench_kernels.py", "--score-splits", "0", timeout=120)
    assert bad.returncode == 2 and "--score-splits must be at least 1" in bad.stderr


def test_the_peer_has_no_compiled_memory():
    result = run_script(
        "benchmark.py",
        *("--config", "tiny", "--seq-lens", "256", "--modes", "hf_peft,dense"),
        *("--measure", "compiled-memory"),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --modes hf_peft has no compiled program; use --measure step-time"
    )


def test_boundary_searches_find_the_exact_boundary_for_every_monotone_shape():
    benchmark = load_script("benchmark")
    shapes = {
        "linear": lambda n: 10.0 + 0.4 * n,
        "convex": lambda n: 10.0 + 0.004 * n * n,
        "concave": lambda n: 10.0 + 6.0 * math.sqrt(n),
        "step": lambda n: 10.0 if n < 50 else 1000.0,
    }
    for name, shape in shapes.items():
        for limit in (9.0, 10.0, 30.0, 40.1, 60.0, 1e6):
            for top in (0, 1, 2, 7, 75, 128):
                expected = max([n for n in range(top + 1) if shape(n) <= limit], default=0)
                calls = []
                found = benchmark._largest_within(
                    lambda n, calls=calls, shape=shape: calls.append(n) or shape(n), limit, top
                )
                assert found == expected, (name, limit, top)
                assert len(calls) == len(set(calls)) and all(0 < n <= top for n in calls)
                if name == "linear":  # interpolation lands on it
                    assert len(calls) <= 4, (limit, top, calls)
                calls = []
                found = benchmark._largest_true(
                    lambda n, calls=calls, shape=shape, limit=limit: (
                        calls.append(n) or shape(n) <= limit
                    ),
                    0,
                    top,
                )
                assert found == expected, (name, limit, top)
                assert len(calls) <= 2 + math.ceil(math.log2(top + 1))
                assert not calls or calls[0] == top  # the likeliest answer first


def test_max_context_confirms_the_compiled_boundary_with_one_real_step(monkeypatch):
    """Compiles place the boundary, one real step (in its own process) confirms it; a real
    step that runs out of memory moves it down; any other failure ends the search with it."""
    benchmark = load_script("benchmark")
    args = argparse.Namespace(seq_lens="65536", context_step=4096, memory_limit_gib=None)
    # 2 + 0.5 x 96 = 50 GiB: 98,304 tokens would be the boundary; the search stops at 65,536.
    real, limit = {}, {"gib": 50.0}

    def child(args, n, mode, measure=None):  # what each fresh process would report
        if measure == "compiled-memory":
            return {"total_gib": 2.0 + n / 1024 * 0.5, "memory_limit_gib": limit["gib"]}
        return real[n](n)

    monkeypatch.setattr(benchmark, "_in_child_process", child)
    base = get_run_config("tiny")

    def row():
        return benchmark._max_context(args, base, "dense")

    real.update({65536: lambda n: {"step_s": 1.0, "peak_gib": 35.0}})
    assert row()["max_tokens"] == 65536

    assert row()["memory_limit_gib"] == 50.0  # the device's, as the compiling process saw it
    args.memory_limit_gib = 26.0  # 2 + 0.5 x 48: 49,152 tokens, 12 units
    real.update({49152: lambda n: {"step_s": 1.0, "peak_gib": 25.9}})
    result = row()
    assert result["max_tokens"] == 49152 and "error" not in result
    ran = [p["seq_len"] for p in result["probes"] if "step_s" in p or "error" in p]
    assert ran == [49152]
    assert {p["seq_len"] for p in result["probes"] if "compiled_gib" in p} >= {49152, 53248}

    real.update({49152: lambda n: {"error": benchmark.OUT_OF_MEMORY}})
    real.update({45056: lambda n: {"step_s": 1.0, "peak_gib": 24.0}})
    assert row()["max_tokens"] == 45056

    # A compiled estimate far off: real steps go down 1, 2, 4 units, then bisect the gap.
    real.update({n: (lambda n: {"error": benchmark.OUT_OF_MEMORY}) for n in (45056, 40960)})
    real.update({n: (lambda n: {"step_s": 1.0}) for n in (32768, 36864)})
    result = row()
    ran = [p["seq_len"] for p in result["probes"] if "step_s" in p or "error" in p]
    assert result["max_tokens"] == 36864 and ran == [49152, 45056, 40960, 32768, 36864]

    real.update({49152: lambda n: {"error": "ValueError: a bug"}})
    result = row()
    assert result["error"] == "49152 tokens: ValueError: a bug" and result["max_tokens"] == 0


def test_max_context_bisects_to_the_longest_step_that_fits():
    result = run_script(
        "benchmark.py",
        *("--config", "tiny", "--seq-lens", "8192", "--context-step", "1024"),
        *("--modes", "dense,lemo", "--measure", "max-context", "--memory-limit-gib", "0.05"),
        *("--set", "lemo.schedule=uniform:0.25", "--set", "lemo.block_size=16"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    dense, lemo = (json.loads(line) for line in result.stdout.splitlines())
    for row in (dense, lemo):
        fitting = [p["seq_len"] for p in row["probes"] if p["fits"]]
        failing = [p["seq_len"] for p in row["probes"] if not p["fits"]]
        assert row["max_tokens"] == max(fitting, default=0)
        assert all(length > row["max_tokens"] for length in failing)
        assert row["max_tokens"] + 1024 in failing or row["max_tokens"] == 8192
    # At a quarter of the tokens kept, LeMo fits longer sequences in the same budget.
    assert lemo["max_tokens"] > dense["max_tokens"]
