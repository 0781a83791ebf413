"""scripts/finetune.py and the training loop: end to end, resume, signals, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_scripts import ROOT, run_script

from lemo_jax.configs.overrides import apply_overrides
from lemo_jax.configs.runs import get_run_config, run_names
from lemo_jax.errors import UserError
from lemo_jax.train import loop
from lemo_jax.train.loop import run_training

TEXT = "\n".join(
    f"def function_{i}(value):\n    return value * {i} + {i % 7}  # line {i}\n" for i in range(1500)
)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def tiny_overrides(tmp_path: Path, text_file: Path, **fields) -> list[str]:
    values = {
        "output_dir": str(tmp_path / "run"),
        "data.train": str(text_file),
        "data.validation": "holdout",
        "data.cache_dir": str(tmp_path / "cache"),
        "train.seq_len": 64,
        "train.steps": 8,
        "checkpoint.every": 4,
        **fields,
    }
    return [f"{key}={value}" for key, value in values.items()]


def finetune(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_script("finetune.py", "--no-progress", *args, timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_every_run_config_builds_and_validates():
    for name in run_names():
        config = get_run_config(name)
        assert config.name == name
        assert config.train.seq_len >= 128


def test_tiny_end_to_end(tmp_path, text_file):
    sets = tiny_overrides(tmp_path, text_file, **{"train.eval_every": 4})
    result = finetune("--config", "tiny", *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    assert all(0 < loss < 10 for loss in losses.values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [4, 8]
    assert {"tokens_per_s", "learning_rate", "grad_norm", "memory_gib"} <= set(records[0])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4", "8"]
    assert "step 8/8" in result.stdout


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, text_file):
    base = apply_overrides(get_run_config("tiny"), tiny_overrides(tmp_path, text_file))
    whole = apply_overrides(base, [f"output_dir={tmp_path / 'whole'}"])
    run_training(whole, show_progress=False)
    split = apply_overrides(base, [f"output_dir={tmp_path / 'split'}", "train.steps=5"])
    first = run_training(split, show_progress=False)
    assert first.step == 5 and first.completed
    # Resumed where the directory was moved to.
    (tmp_path / "split").rename(tmp_path / "moved")
    moved = apply_overrides(split, ["train.steps=8", f"output_dir={tmp_path / 'moved'}"])
    resumed = run_training(moved, show_progress=False)
    assert resumed.step == 8
    assert train_losses(tmp_path / "moved") == train_losses(tmp_path / "whole")
    saved = json.loads((tmp_path / "moved" / "run_config.json").read_text())
    assert saved["output_dir"] == str(tmp_path / "moved")


def test_sigint_saves_and_the_same_command_resumes(tmp_path, text_file):
    def args_for(run_dir: Path) -> list[str]:
        fields = {"output_dir": run_dir, "train.steps": 400, "checkpoint.every": 1000}
        sets = tiny_overrides(tmp_path, text_file, **fields)
        return ["--config", "tiny", *[a for s in sets for a in ("--set", s)]]

    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--no-progress"]
    process = subprocess.Popen(
        [*command, *args_for(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    stopped_at = max(train_losses(run_dir))
    assert 3 <= stopped_at < 400
    assert f"stopped at step {stopped_at}" in stdout
    assert (run_dir / "checkpoints" / str(stopped_at)).is_dir()

    resumed = finetune(*args_for(run_dir))  # the same command
    assert resumed.returncode == 0, resumed.stderr
    reference = finetune(*args_for(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    assert train_losses(run_dir) == train_losses(tmp_path / "reference")


def test_a_step_larger_than_the_device_fails_before_the_first_step(
    tmp_path, text_file, monkeypatch
):
    """Where the device states its memory, every kind of step the run needs is compiled and
    checked up front: a dense tail that cannot fit fails before the LeMo steps, not at them."""
    lemo = ["lemo.enabled=true", "lemo.block_size=16", "lemo.schedule=uniform:0.25"]
    lemo += ["lemo.bucket_blocks=1", "lemo.dense_final_steps=2", "train.remat=none"]
    sets = [*tiny_overrides(tmp_path, text_file, **{"train.steps": 4}), *lemo]
    base = apply_overrides(get_run_config("tiny"), sets)
    monkeypatch.setattr(loop, "peak_device_memory_gib", lambda: None)  # memory_gib: estimates
    monkeypatch.setattr(loop, "device_memory_limit_gib", lambda: 1e6)
    fits = apply_overrides(base, [f"output_dir={tmp_path / 'fits'}"])
    assert run_training(fits, show_progress=False).completed
    memory = {r["step"]: r["memory_gib"] for r in records(tmp_path / "fits") if "loss" in r}
    lemo_gib, dense_gib = memory[1], memory[4]
    assert memory[2] == lemo_gib < dense_gib == memory[3]

    for limit, message in [
        ((lemo_gib + dense_gib) / 2, r"the dense tail \(lemo.dense_final_steps=2\) needs"),
        (lemo_gib / 2, "the LeMo training step needs"),
    ]:
        monkeypatch.setattr(loop, "device_memory_limit_gib", lambda limit=limit: limit)
        run_dir = tmp_path / f"limit_{limit:.6f}"
        config = apply_overrides(base, [f"output_dir={run_dir}"])
        with pytest.raises(UserError, match=message) as raised:
            run_training(config, show_progress=False)
        assert f"more than the {limit:.1f} GiB this process may use" in str(raised.value)
        metrics = run_dir / "metrics.jsonl"
        assert not metrics.is_file() or not train_losses(run_dir)  # no step ran


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, text_file):
    config = apply_overrides(get_run_config("tiny"), tiny_overrides(tmp_path, text_file))
    run_training(config, show_progress=False)  # checkpoints at steps 4 and 8
    reference = train_losses(tmp_path / "run")
    for file in (tmp_path / "run" / "checkpoints" / "8").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="step 8 .* is damaged"):
        result = run_training(config, show_progress=False)
    assert result.step == 8 and result.completed
    assert train_losses(tmp_path / "run") == reference  # steps 5-8 redone identically
    assert any((tmp_path / "run" / "damaged_checkpoints").iterdir())


def test_full_fine_tuning_without_loss_chunking(tmp_path, text_file):
    sets = tiny_overrides(
        tmp_path,
        text_file,
        **{
            "train.method": "full",
            "train.loss_chunk_size": 0,
            "train.steps": 3,
            "train.remat": "none",
        },
    )
    result = run_training(apply_overrides(get_run_config("tiny"), sets), show_progress=False)
    assert result.completed and result.validation_loss < 10
    losses = train_losses(tmp_path / "run")
    assert losses[3] < losses[1]  # full fine-tuning at lr 3e-3 learns within 3 steps


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lemo_dense_final_steps_end_the_run_dense_and_resume_inside_the_tail(tmp_path, text_file):
    # 4 blocks of 16 tokens, half kept in every layer; steps 5 and 6 run dense.
    lemo = ["lemo.enabled=true", "lemo.block_size=16", "lemo.schedule=uniform:0.5"]
    lemo += ["lemo.bucket_blocks=1", "checkpoint.keep=6"]
    fields = {"train.steps": 6, "checkpoint.every": 1}
    sets = [*tiny_overrides(tmp_path, text_file, **fields), *lemo]
    base = apply_overrides(get_run_config("tiny"), sets)
    sparse = apply_overrides(base, [f"output_dir={tmp_path / 'sparse'}"])
    run_training(sparse, show_progress=False)
    tail = apply_overrides(base, [f"output_dir={tmp_path / 'tail'}", "lemo.dense_final_steps=2"])
    run_training(tail, show_progress=False)

    kept = {r["step"]: r["kept_fraction"] for r in records(tmp_path / "tail") if "loss" in r}
    assert all(kept[step] < 1 for step in range(1, 5)), kept
    assert kept[5] == kept[6] == 1.0
    sparse_losses, tail_losses = train_losses(tmp_path / "sparse"), train_losses(tmp_path / "tail")
    assert [tail_losses[s] for s in range(1, 5)] == [sparse_losses[s] for s in range(1, 5)]
    assert tail_losses[5] != sparse_losses[5] and tail_losses[6] != sparse_losses[6]

    # Resumed inside the tail (only the dense step compiles) and before it (both do).
    for last_kept in (5, 3):
        for checkpoint in (tmp_path / "tail" / "checkpoints").iterdir():
            if int(checkpoint.name) > last_kept:
                shutil.rmtree(checkpoint)
        resumed = run_training(tail, show_progress=False)
        assert resumed.step == 6 and resumed.completed
        assert train_losses(tmp_path / "tail") == tail_losses
