"""``callbacks=drift`` end to end: the real CLI in a subprocess, read back with MlflowClient, the
first step's numbers recomputed from the same data batch and initial weights, the artifacts
(per-unit arrays, summary table, figures) checked, the figures rebuilt by scripts/plot_drift.py,
and the training metrics identical to a run without the instruments."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rescalelab.errors import EXIT_DIVERGED
from tests.helpers import TINY, all_runs, assert_ok, cli_env, client, history, run_cli

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("drift_heatmap", "lag_heatmap", "lag_curves", "dead_units")
CONV_LINEAR = ("features.0", "features.4", "classifier.1", "classifier.4", "classifier.7")
BNS = ("features.1", "features.5", "classifier.2", "classifier.5")


def _first_step(root: Path) -> dict[str, float]:
    """The step-0 numbers, recomputed in process from the CLI's config: same seed, same batch."""
    from hydra import compose, initialize_config_module

    from rescalelab.fit import build_components

    with initialize_config_module("rescalelab.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*TINY, "norm=bn", f"paths.root={root}", f"paths.output_dir={root}/x"],
        )
    parts = build_components(cfg)
    model = parts["module"].model
    x, y = next(iter(parts["datamodule"].train_dataloader()))
    eps = 1e-5
    m, v = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)
    with torch.no_grad():
        conv_out = model.features[0](x).double()
    cm, cv = conv_out.mean((0, 2, 3)), conv_out.var((0, 2, 3), unbiased=False)
    model.train()
    F.cross_entropy(model(x), y).backward()
    w = model.features[0].weight
    g = float(w.grad.norm())
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    return {
        "x_mean": m.numpy(),
        "drift/features.0/mean_z": rms(m / (v + eps).sqrt()),
        # BatchNorm's running statistics start at mean 0, var 1
        "drift/features.1/lag_mean_z": rms(cm / math.sqrt(1 + eps)),
        "drift/features.1/lag_logvar": rms(torch.log((cv + eps) / (1 + eps))),
        "drift/features.0/grad_norm": g,
        # plain SG, lr 0.05: ||Δw|| = 0.05 ||g||
        "drift/features.0/update_ratio": 0.05 * g / float(w.detach().norm()),
    }


def _png_ok(data: bytes) -> None:
    from PIL import Image

    assert data.startswith(PNG) and len(data) > 5000
    Image.open(io.BytesIO(data)).verify()


@pytest.mark.slow
def test_drift_run_logs_per_layer_metrics_arrays_and_figures(root: Path):
    assert_ok(run_cli(root, "callbacks=drift", "norm=bn"))
    (run,) = all_runs(root)
    rid, metrics = run.info.run_id, run.data.metrics
    assert run.info.status == "FINISHED"
    # per layer, one scalar per statistic: compact set as metrics (8 steps: all instrumented)
    for layer in CONV_LINEAR:
        for stat in ("mean_z", "logvar_med", "drift_mean", "drift_logvar", "grad_norm",
                     "update_ratio", "settle_step", "n_eff"):  # fmt: skip
            assert f"drift/{layer}/{stat}" in metrics, (layer, stat)
    for layer in CONV_LINEAR[:-1]:  # every hidden layer has a ReLU after it; the output not
        assert 0 <= metrics[f"drift/{layer}/dead_frac"] <= 1
    assert "drift/classifier.7/dead_frac" not in metrics
    for layer in BNS:
        for stat in ("lag_mean_z", "lag_logvar", "noise_floor", "lag_mean_z_probe",
                     "lag_logvar_probe", "mean_z", "drift_mean"):  # fmt: skip
            assert f"drift/{layer}/{stat}" in metrics, (layer, stat)
    assert "drift/features.0/lag_mean_z" not in metrics  # norm=bn: a conv has no estimates
    assert "drift/features.0/logvar_iqr" not in metrics  # metrics=compact: parquet only
    # schedule: 8 steps, all below dense_steps=10; the probe at step 0 and the epoch's last step
    assert [s for s, _ in history(root, rid, "drift/features.0/mean_z")] == list(range(8))
    assert [s for s, _ in history(root, rid, "drift/features.1/lag_mean_z_probe")] == [0, 7]
    assert [s for s, _ in history(root, rid, "drift/features.0/drift_mean")] == list(range(1, 8))
    # step 0 against the formulas on the same batch and initial weights
    expected = _first_step(root)
    for key, value in expected.items():
        if key.startswith("drift/"):
            assert history(root, rid, key)[0] == (0, pytest.approx(value, rel=2e-4)), key
    # artifacts: per-unit arrays, summary table, meta, figures
    c = client(root)
    names = {a.path for a in c.list_artifacts(rid, "drift")}
    assert {"drift/arrays", "drift/figures", "drift/summary.parquet", "drift/meta.json"} <= names
    arrays = np.load(c.download_artifacts(rid, "drift/arrays/epoch_000.npz", str(root)))
    assert arrays["features.0/steps"].tolist() == list(range(8))
    np.testing.assert_allclose(arrays["features.0/m"][0], expected["x_mean"], rtol=1e-5)
    assert arrays["features.1/r_mean"].shape == (8, 6)
    assert arrays["features.1/probe_mean"].shape == (2, 6)
    import pandas as pd

    table = pd.read_parquet(c.download_artifacts(rid, "drift/summary.parquet", str(root)))
    row = table[(table.layer == "features.0") & (table.stat == "mean_z") & (table.step == 0)]
    assert row.value.item() == pytest.approx(metrics_at(root, rid, "drift/features.0/mean_z", 0))
    assert {"logvar_iqr", "lag_logvar_signed", "lag_mean_z_excess"} <= set(table.stat)
    meta = json.loads(Path(c.download_artifacts(rid, "drift/meta.json", str(root))).read_text())
    assert meta["layers"][:3] == ["features.0", "features.1", "features.4"]
    assert meta["steps_per_epoch"] == 8 and meta["rho"]["features.1"] == pytest.approx(0.1)
    for name in FIGURES:
        _png_ok(
            Path(c.download_artifacts(rid, f"drift/figures/{name}.png", str(root))).read_bytes()
        )
    # the script rebuilds the same figures from the artifacts alone
    out = root / "replot"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_drift.py"), "--run-id", rid,
         "--tracking-uri", f"sqlite:///{root}/mlflow.db", "--out", str(out)],
        capture_output=True, text=True, env=cli_env(), cwd=root, timeout=300,
    )  # fmt: skip
    assert_ok(proc)
    for name in FIGURES:
        _png_ok((out / f"{name}.png").read_bytes())
    # the instruments only read: the same run without them logs the same training metrics
    assert_ok(run_cli(root, "callbacks=default", "norm=bn"))
    other = next(r for r in all_runs(root) if r.info.run_id != rid)
    for key in ("train/loss", "train/acc", "val/loss"):
        assert history(root, rid, key) == history(root, other.info.run_id, key), key


def metrics_at(root: Path, rid: str, key: str, step: int) -> float:
    return dict(history(root, rid, key))[step]


def test_bad_drift_setting_stops_before_any_run(root: Path):
    proc = run_cli(root, "callbacks=drift", "callbacks.drift.probe_size=-1")
    assert proc.returncode == 2
    assert "error: callbacks.drift.probe_size=-1 is invalid: expected an integer >= 0" in (
        proc.stderr
    )
    assert all_runs(root) == []


@pytest.mark.slow
def test_a_diverged_run_keeps_its_drift_figures_arrays_and_summary(root: Path):
    """The run a researcher most needs to diagnose: written on failure too (on_exception)."""
    proc = run_cli(root, "callbacks=drift", "norm=bn", "optim.lr=100")
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]  # a single run: exit 1
    (run,) = all_runs(root)
    assert run.info.status == "FAILED" and run.data.tags["rescalelab.status"] == "diverged"
    step = int(run.data.tags["rescalelab.diverged_step"])
    rid, c = run.info.run_id, client(root)
    names = {a.path for a in c.list_artifacts(rid, "drift")}
    assert {"drift/arrays", "drift/figures", "drift/summary.parquet", "drift/meta.json"} <= names
    figures = {Path(a.path).stem for a in c.list_artifacts(rid, "drift/figures")}
    assert figures == set(FIGURES)
    import pandas as pd

    table = pd.read_parquet(c.download_artifacts(rid, "drift/summary.parquet", str(root)))
    # every step up to the diverged one (the monitor's hook runs before the guard's)
    assert sorted(set(table.step)) == list(range(step + 1))
    mean_z = [s for s, _ in history(root, rid, "drift/features.0/mean_z")]
    assert mean_z == list(range(step + 1))
