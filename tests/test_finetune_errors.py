"""Bad input to finetune.py / export_to_pytorch.py: one clear line, non-zero exit, nothing lost."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from run_scripts import ROOT, load_script, run_script

from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.configs.runs import get_run_config
from lemo_jax.errors import UserError
from lemo_jax.train.setup import write_run_config

finetune = load_script("finetune")
export = load_script("export_to_pytorch")


def tiny_args(tmp_path: Path, data: Path | str, *extra: str) -> list[str]:
    fields = {
        "output_dir": tmp_path / "run",
        "data.train": data,
        "data.cache_dir": tmp_path / "cache",
        "train.seq_len": 64,
        "train.steps": 2,
    }
    fields.update(assignment.split("=", 1) for assignment in extra)
    sets = [f"{key}={value}" for key, value in fields.items()]
    return ["--config", "tiny", "--no-progress", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 400)
    return path


def test_unknown_config_is_one_line_with_the_choices():
    result = run_script("finetune.py", "--config", "llama9", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip(),
    ], result.stderr  # exactly one line
    assert "unknown config 'llama9'" in result.stderr and "smollm2_demo" in result.stderr


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.stepz=3", "has no field 'stepz'"),
        ("train.steps=ten", "expects an integer"),
        ("train.remat=everything", "train.remat"),
        ("train.seq_len=1", "train.seq_len must be at least 2"),
        ("lemo.predictor_architecture=mlp", "lemo.predictor_architecture='mlp' is not one of"),
    ],
)
def test_bad_overrides(tmp_path, text_file, assignment, message):
    with pytest.raises(UserError, match=message):
        finetune.main(tiny_args(tmp_path, text_file, assignment))
    assert not (tmp_path / "run").exists()


def test_a_dense_tail_as_long_as_the_run_is_refused(tmp_path, text_file):
    args = tiny_args(tmp_path, text_file, "lemo.enabled=true", "lemo.dense_final_steps=2")
    with pytest.raises(UserError, match=r"dense_final_steps=2 must be less than train.steps=2"):
        finetune.main(args)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"lemo.dense_final_steps=-1 must be >= 0"):
        finetune.main(tiny_args(tmp_path, text_file, "lemo.dense_final_steps=-1"))


def test_missing_empty_and_short_data(tmp_path):
    with pytest.raises(UserError, match="not found"):
        finetune.main(tiny_args(tmp_path, tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="no text"):
        finetune.main(tiny_args(tmp_path, empty))
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(UserError, match=r"one sequence of train\.seq_len=64"):
        finetune.main(tiny_args(tmp_path, short))


def test_pretrained_config_without_weights():
    with pytest.raises(UserError, match=r"--set model.path=DIR .* --set model.init=random"):
        finetune.main(
            ["--config", "llama_64k", "--no-progress", "--set", "output_dir=/nonexistent"]
        )


def test_output_directory_of_a_different_run_is_left_alone(tmp_path, text_file):
    finetune.main(tiny_args(tmp_path, text_file))
    saved = (tmp_path / "run" / "run_config.json").read_text()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"holds a different run \(differs in lora.rank\)"):
        finetune.main(tiny_args(tmp_path, text_file, "lora.rank=2"))
    assert (tmp_path / "run" / "run_config.json").read_text() == saved
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_output_directory_that_is_not_a_run(tmp_path, text_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a lemo-jax run directory"):
        finetune.main(tiny_args(tmp_path, text_file))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_export_errors(tmp_path, text_file):
    with pytest.raises(UserError, match="not a lemo-jax run directory"):
        export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")])
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(UserError, match="already exists"):
        export.main(["--checkpoint", str(tmp_path), "--out", str(existing)])
    fresh = tmp_path / "fresh"  # a run directory whose run has not checkpointed yet
    write_run_config(fresh, apply_overrides(get_run_config("tiny"), [f"output_dir={fresh}"]))
    with pytest.raises(UserError, match="has no checkpoint yet"):
        export.main(["--checkpoint", str(fresh), "--out", str(tmp_path / "hf")])
    finetune.main(tiny_args(tmp_path, text_file, "checkpoint.every=1"))
    run = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        export.main(["--checkpoint", str(run), "--step", "7", "--out", str(tmp_path / "a")])
    for file in (run / "checkpoints" / "2").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        export.main(["--checkpoint", str(run), "--step", "2", "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_closed_stdout_ends_quietly_and_sigpipe_keeps_pythons_handling():
    """`finetune.py --list-configs | head -1` exits 141 without a traceback. The scripts must not
    restore SIGPIPE's default action: that would also kill a run when an asyncio self-pipe in
    Orbax's checkpoint threads meets a closed peer (the process died with -13 mid-save)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--list-configs"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert result.stderr == ""


def test_a_directory_holding_only_an_interrupted_write_is_a_new_run(tmp_path, text_file):
    # What a process killed while writing the run's config leaves behind: not a foreign directory.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".run_config.json.k3j9x1.tmp").write_text('{"half')
    finetune.main(tiny_args(tmp_path, text_file))
    assert (tmp_path / "run" / "run_config.json").exists()
