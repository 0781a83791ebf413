"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom on a CPU."""

import json
import math
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    cells = code_cells(nbformat.read(NOTEBOOK, as_version=4))
    assert cells
    for cell in cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_notebook_runs_top_to_bottom(setting, tmp_path, monkeypatch):
    """The CPU setting everywhere; the GPU setting (a free Colab GPU's sizes) where there is
    one. The executed notebook is kept beside the summary (`executed.ipynb`)."""
    summary_path = tmp_path / "summary.json"
    monkeypatch.setenv("LEMO_NOTEBOOK_SETTING", setting)
    monkeypatch.setenv("LEMO_NOTEBOOK_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("LEMO_NOTEBOOK_SUMMARY", str(summary_path))
    # The kernel (and the benchmark's processes) import this checkout, whatever is installed.
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # run where a user opens it
    )
    try:
        client.execute()  # a failing cell raises CellExecutionError with its traceback
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")

    images = [
        output
        for cell in code_cells(notebook)
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 3  # benchmark, loss curve, kept-block heat map
    summary = json.loads(summary_path.read_text())
    assert summary["setting"] == setting
    assert len(summary["losses"]) == summary["steps"]
    assert all(math.isfinite(loss) and loss > 0 for loss in summary["losses"])
    assert math.isfinite(summary["validation_loss"])
    assert 0 < summary["kept_fraction"] < 1
    # The run ends with its dense steps: kept 1.0 there, less before.
    tail = summary["dense_final_steps"]
    assert 0 < tail < summary["steps"]
    kept = summary["kept_per_step"]
    assert kept[-tail:] == [1.0] * tail and all(fraction < 1 for fraction in kept[:-tail])
    rows = summary["benchmark"]
    assert not [row for row in rows if "error" in row], rows
    longest = max(row["seq_len"] for row in rows)
    # A GPU measures each process's peak; a CPU reports the compiled step's estimate.
    measure = "peak_gib" if setting == "gpu" else "total_gib"
    memory = {row["mode"]: row[measure] for row in rows if row["seq_len"] == longest}
    assert memory["lemo"] < memory["dense"]  # without recomputation LeMo stores less
    if setting == "gpu":
        assert all(row["median_step_s"] > 0 for row in rows)
    export_dir = Path(summary["export_dir"])
    assert export_dir.is_relative_to(tmp_path)
    assert (export_dir / "config.json").is_file() and list(export_dir.glob("*.safetensors"))
    assert summary["generated"].strip()
