"""Rebuild the drift figures of a run (or a BN warm-up sweep) from its MLflow artifacts.

    .venv/bin/python scripts/plot_drift.py --run-id <id> [--out DIR] [--log]
    .venv/bin/python scripts/plot_drift.py --parent <sweep parent run id> [--out DIR] [--log]

``--run-id`` reads ``drift/summary.parquet`` and ``drift/meta.json`` (written by
``callbacks=drift``) and writes drift_heatmap.png, lag_heatmap.png, lag_curves.png and
dead_units.png. ``--parent`` reads every child run of a sweep over ``norm.warmup_epochs`` (e.g.
``experiment=bn_warmup callbacks=bn_warmup``) and writes warmup_sweep.png: training loss and
post-switch staleness per warm-up length k, median and 25-75% band over seeds. ``--log`` also
logs the figures to the run (``drift/figures/``). The store is ``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///./mlflow.db``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def _load(uri: str, run_id: str, tmp: Path) -> tuple[Any, dict[str, Any]]:
    import pandas as pd
    from mlflow import MlflowClient

    from rescalelab.analysis.mlflow_read import download

    client = MlflowClient(uri)
    table = pd.read_parquet(download(client, run_id, "drift/summary.parquet", tmp / run_id))
    meta = json.loads(download(client, run_id, "drift/meta.json", tmp / run_id).read_text())
    return table, meta


def run_figures(uri: str, run_id: str, tmp: Path) -> dict[str, Any]:
    from rescalelab.callbacks.drift import figures

    table, meta = _load(uri, run_id, tmp)
    return figures.run_figures(table, meta)


def sweep_figure(uri: str, parent: str, tmp: Path) -> Any:
    from mlflow import MlflowClient

    from rescalelab.analysis.mlflow_read import child_runs, metric_points
    from rescalelab.callbacks.drift import figures

    client = MlflowClient(uri)
    runs = []
    for child in child_runs(client, parent):
        rid, params = child.info.run_id, child.data.params
        try:
            table, meta = _load(uri, rid, tmp)
        except Exception as e:  # a failed or uninstrumented job: say so, keep the others
            print(
                f"skipping run {rid}: no drift artifacts ({e.__class__.__name__})", file=sys.stderr
            )
            continue
        k = params.get("norm.warmup_epochs")
        spe = int(meta.get("steps_per_epoch") or 0)
        sw = meta.get("switch_step")
        runs.append(
            {
                "k": int(k) if k is not None and k.lstrip("-").isdigit() else k,
                "seed": params.get("seed"),
                "loss": tuple(zip(*metric_points(client, rid, "train/loss"))) or ((), ()),
                "steps_per_epoch": spe,
                "switch_step": sw,
                "staleness": figures.staleness(table, sw, spe),
            }
        )
    if not runs:
        raise SystemExit(f"no child run of {parent} has drift artifacts")
    return figures.warmup_sweep(runs)


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-id")
    g.add_argument("--parent", help="a sweep's parent run: the warm-up sweep figure")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--out", type=Path, default=Path("drift_figures"))
    p.add_argument("--log", action="store_true", help="also log the figures to the run")
    a = p.parse_args(argv)
    uri = a.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    from rescalelab.callbacks.drift.figures import close
    from rescalelab.tracking.artifacts import log_figure_to_run

    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if a.run_id:
            figs, target = run_figures(uri, a.run_id, Path(tmp)), a.run_id
        else:
            figs, target = {"warmup_sweep": sweep_figure(uri, a.parent, Path(tmp))}, a.parent
    for name, fig in figs.items():
        path = a.out / f"{name}.png"
        fig.savefig(path, dpi=110)
        if a.log:
            log_figure_to_run(uri, target, fig, f"drift/figures/{name}.png")
        close(fig)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
