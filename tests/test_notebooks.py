"""``notebooks/*.ipynb``: stored without outputs, and executed (nbclient, as nbmake does) against
a small sweep that the test creates, with the tracking URI and parent run id given by environment
variables."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import all_runs, assert_ok, run_cli, tracking_uri

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code), path.name


def _outputs(cell) -> list[str]:
    kinds = []
    for out in cell.outputs:
        kinds += list(out.get("data", {})) if "data" in out else [out.output_type]
    return kinds


@pytest.mark.slow
def test_analysis_notebook_draws_the_sweep_curves_drift_heatmaps_and_report(root, monkeypatch):
    # The notebook reads the drift metrics only: the callback's own figures and arrays are off.
    drift = ["callbacks=drift", "callbacks.drift.figures=false", "callbacks.drift.arrays=false"]
    proc = run_cli(root, "-m", "norm=bn,whitening", *drift, "trainer.max_epochs=2")
    assert_ok(proc)
    (parent,) = [r for r in all_runs(root) if r.data.tags.get("rescalelab.sweep") == "parent"]
    monkeypatch.setenv("RESCALELAB_TRACKING_URI", tracking_uri(root))
    monkeypatch.setenv("RESCALELAB_PARENT_RUN_ID", parent.info.run_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(NOTEBOOK_DIR / "analysis.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}
    ).execute()  # raises CellExecutionError on any failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {key: next(c for c in code if key in c.source) for key in (
        "PARENT_RUN_ID is None", "curves = {", "drift_keys = ", "artifacts = ["
    )}  # fmt: skip
    text = lambda c: "".join(o.get("text", "") for o in c.outputs)  # noqa: E731
    sweep = by_source["PARENT_RUN_ID is None"]
    assert f"({parent.info.run_id}): 2 children" in text(sweep)
    table = "".join(o.get("data", {}).get("text/html", "") for o in sweep.outputs)
    assert "norm=bn #0" in table and "norm=whitening #1" in table
    assert "image/png" in _outputs(by_source["curves = {"])  # BN vs whitening curves
    heatmaps = by_source["drift_keys = "]
    assert "image/png" in _outputs(heatmaps), text(heatmaps)  # the heatmaps, not the skip message
    report = by_source["artifacts = ["]
    assert "report/methods.csv" in text(report)
    # training_curves.png and tuning_curves.png (one α: a point per method)
    assert _outputs(report).count("image/png") == 2
