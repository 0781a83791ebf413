"""scripts/benchmark.py --measure compiled-memory: JSON lines, LeMo below dense."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_compiled_memory_report():
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--config",
        "tiny",
        "--seq-lens",
        "512",
        "--modes",
        "dense,lemo",
        "--measure",
        "compiled-memory",
        "--set",
        "lemo.schedule=uniform:0.5",
        "--set",
        "lemo.block_size=16",
        "--set",
        "train.remat=none",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["mode"], row["seq_len"]) for row in rows] == [("dense", 512), ("lemo", 512)]
    dense, lemo = rows
    assert 0 < lemo["temp_gib"] < dense["temp_gib"]
    assert lemo["argument_gib"] == dense["argument_gib"]  # same weights and optimizer state


def test_bad_lengths_are_one_line_errors():
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--config",
        "tiny",
        "--seq-lens",
        "4k",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --seq-lens expects")


def test_step_time_report_runs_each_configuration_in_its_own_process():
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        "--config",
        "tiny",
        "--seq-lens",
        "256",
        "--modes",
        "dense,lemo",
        "--measure",
        "step-time",
        "--steps",
        "2",
        "--set",
        "lemo.schedule=uniform:0.5",
        "--set",
        "lemo.block_size=16",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["mode"], row["seq_len"]) for row in rows] == [("dense", 256), ("lemo", 256)]
    dense, lemo = rows
    for row in rows:
        assert "error" not in row, row
        assert 0 < row["step_s"] <= row["median_step_s"]
        assert row["tokens_per_s"] == 256 / row["step_s"]
        assert row["compiled_gib"] > 0
    assert dense["kept_fraction"] == 1.0 and lemo["kept_fraction"] == 0.5
    assert lemo["layer_groups"] == 1 and lemo["temp_gib"] < dense["temp_gib"]
    # Same weights, same tokens: the first losses agree to LeMo's effect on a random model.
    assert abs(lemo["loss"] - dense["loss"]) < 0.5


def test_kernel_benchmark_reports_ceilings_and_fractions():
    command = [
        sys.executable,
        str(ROOT / "scripts" / "bench_kernels.py"),
        "--seq-lens",
        "256",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "64",
        "--repeats",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["matmul_tflops"] > 0 and lines[0]["copy_tbps"] > 0
    row = lines[1]
    assert (row["op"], row["impl"], row["seq_len"]) == ("block_scores", "xla", 256)
    assert row["ms"] > 0 and row["fraction_of_ceiling"] > 0
