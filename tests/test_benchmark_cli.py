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
