"""scripts/elimination_loss.py: the loss each LeMo schedule costs a model before training."""

from __future__ import annotations

from run_scripts import run_script


def test_elimination_loss_reports_each_schedule_against_dense():
    result = run_script(
        "elimination_loss.py",
        "--config", "tiny", "--set", "train.seq_len=256", "--set", "lemo.bucket_blocks=1",
        "--windows", "2",
        "--schedules", "uniform:0.5,uniform:1.0", "--random-scorer",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [row[:2] for row in rows] == [
        ["dense", "-"],
        ["uniform:0.5", "oracle"],
        ["uniform:0.5", "random"],
        ["uniform:1.0", "oracle"],
        ["uniform:1.0", "random"],
    ]
    kept = {(row[0], row[1]): float(row[2]) for row in rows}
    rise = {(row[0], row[1]): float(row[4]) for row in rows}
    assert kept[("uniform:0.5", "oracle")] == 0.5 and rise[("uniform:0.5", "oracle")] != 0
    # Keeping every block is the dense model: no rise.
    assert kept[("uniform:1.0", "oracle")] == 1.0 and rise[("uniform:1.0", "oracle")] == 0


def test_elimination_loss_rejects_a_bad_schedule():
    result = run_script("elimination_loss.py", "--config", "tiny", "--schedules", "half")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
