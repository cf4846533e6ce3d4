"""The sweep report: what a multirun found, logged to its MLflow parent run under ``report/``.

``rescalelab-report <parent run id | sweep dir>`` (:mod:`rescalelab.analysis.report_cli`, also
``python -m rescalelab.analysis.report_cli``) builds it on demand;
:class:`~rescalelab.tracking.sweep.MlflowSweepCallback` builds it when a multirun ends
(:func:`log_report`). Everything is read back from MLflow (:mod:`rescalelab.analysis.mlflow_read`),
so a report can be rebuilt at any time.

The children are :class:`~rescalelab.analysis.child.Child` records (configuration, setting, task,
method: see there). The *epoch curve* of a child is ``train/loss_epoch`` (the mean over every
step of each epoch) when the run logged it, else the mean of the logged ``train/loss`` steps of
each epoch; its *final* value ``F`` is the last epoch's. A child *diverged* when it carries the
tag ``rescalelab.status=diverged`` or its final value is not finite; a diverged child counts as
``F = +inf`` and is marked × in the figures (in the training curves at its
``rescalelab.diverged_step``). The numbers are :mod:`rescalelab.analysis.sweep_stats`', the
figures :mod:`rescalelab.analysis.figures`'. With several ``data`` options, performance profiles
(:mod:`rescalelab.analysis.profiles`).

Artifacts (under the parent's ``report/``): ``children.csv`` and ``children.html``,
``methods.csv``, ``report.html`` (tables and figures, self-contained), ``training_curves.png``,
``tuning_curves.png``, ``expected_best.png`` (several settings) and ``profiles.png`` (several
tasks).
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run

from rescalelab.analysis.budget import lr_bounds
from rescalelab.analysis.child import LR_KEY, OVERRIDES_TAG, Child, child_record, parse_overrides
from rescalelab.analysis.figures import (
    plot_expected_best,
    plot_profiles,
    plot_training_curves,
    plot_tuning_curves,
)
from rescalelab.analysis.mlflow_read import child_runs, metric_history, metric_points
from rescalelab.analysis.sweep_stats import (
    epoch_curve,
    epoch_of,
    epoch_stamps,
    expected_best_curves,
    initial_losses,
    method_table,
)
from rescalelab.analysis.tuneability import TARGET_RATIO

EPOCH_METRIC = "train/loss_epoch"  # the epoch mean over every step, when the run logs it
# Metrics of the children table: (key, "min" or "max" is best).
TABLE_METRICS = (
    ("train/loss", "min"),
    ("train/acc", "max"),
    ("val/loss", "min"),
    ("val/acc", "max"),
)


def sweep_swept_keys(parent: Run, runs: Sequence[Run]) -> list[str]:
    """The parent's ``rescalelab.swept_keys`` tag; else the override keys whose values differ."""
    tag = parent.data.tags.get("rescalelab.swept_keys")
    if tag:
        return list(json.loads(tag))
    values: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        for k, v in parse_overrides(r.data.tags.get(OVERRIDES_TAG, "")).items():
            values[k].add(v)
    return [k for k, v in values.items() if len(v) > 1 or len(runs) == 1]


def read_child(
    client: MlflowClient,
    run: Run,
    keys: Sequence[str],
    metric: str,
    tuning: Sequence[str] = (LR_KEY,),
) -> tuple[Child, str]:
    """A :class:`Child` with its epoch curve of ``metric``; also the curve's x unit.

    For ``metric="train/loss"`` the curve is ``train/loss_epoch`` (the mean over every step of
    each epoch) when the run logged it, else the mean of the logged ``train/loss`` steps.
    """
    child = child_record(run, keys, tuning)
    run_id = run.info.run_id
    for key, mode in TABLE_METRICS:
        if key in run.data.metrics:
            hist = [m.value for m in metric_history(client, run_id, key)]
            child.final[key] = run.data.metrics[key]
            finite = [v for v in hist if math.isfinite(v)]
            if finite:
                child.best[key] = min(finite) if mode == "min" else max(finite)
    source = metric
    if metric == "train/loss" and EPOCH_METRIC in run.data.metrics:
        source = EPOCH_METRIC
    points = metric_history(client, run_id, source)
    epochs = metric_points(client, run_id, "epoch")
    child.curve, unit = epoch_curve([(m.step, m.value) for m in points], epochs)
    child.stamps = epoch_stamps([(m.step, m.timestamp) for m in points], epochs)
    steps = metric_history(client, run_id, "train/loss") if "train/loss" in \
        run.data.metrics else points  # fmt: skip
    if steps:
        child.first_loss = min(steps, key=lambda m: (m.step, m.timestamp)).value
    step_tag = run.data.tags.get("rescalelab.diverged_step")
    if step_tag not in (None, "", "None"):
        step = int(float(step_tag))
        child.diverged_x = epoch_of(epochs)(step) if epochs else float(step)
    return child, unit


def children_rows(children: Sequence[Child], metric: str) -> list[dict[str, object]]:
    rows = []
    for c in children:
        row: dict[str, object] = {"run": c.name, **c.swept, "method": c.method}
        row.update(
            {
                "status": c.status,
                "rescalelab.status": c.tag_status or ("diverged" if c.diverged else ""),
                "wall_time_s": c.wall_time_s,
                f"final_epoch_{metric}": c.final_curve_value,
            }
        )
        for key, _ in TABLE_METRICS:
            row[f"final_{key}"] = c.final.get(key, math.nan)
            row[f"best_{key}"] = c.best.get(key, math.nan)
        row["run_id"] = c.run_id
        rows.append(row)
    return rows


def _html(title: str, tables: dict[str, str], images: Sequence[Path]) -> str:
    parts = [
        f"<html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>",
        f"<h1>{title}</h1>",
    ]
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<h2>{image.stem}</h2><img src='data:image/png;base64,{data}'/>")
    for heading, table in tables.items():
        parts.append(f"<h2>{heading}</h2>{table}")
    parts.append("</body></html>")
    return "\n".join(parts)


@dataclass
class Report:
    """What :func:`build_report` wrote into ``out_dir``."""

    out_dir: Path
    children: list[Child]
    methods: list[dict[str, object]]
    files: list[Path]
    best: str
    expected: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def parent_budget(parent: Run) -> dict[str, object] | None:
    """The tuning budget recorded on the parent (``rescalelab.budget``), if the sweep had one."""
    tag = parent.data.tags.get("rescalelab.budget")
    return json.loads(tag) if tag else None


def build_report(
    client: MlflowClient,
    parent_run_id: str,
    out_dir: Path,
    metric: str = "train/loss",
    target_ratio: float = TARGET_RATIO,
) -> Report:
    """Read the sweep of ``parent_run_id`` and write the tables and figures into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    parent = client.get_run(parent_run_id)
    runs = child_runs(client, parent)
    keys = sweep_swept_keys(parent, runs)
    budget = parent_budget(parent)
    tuning = (LR_KEY, *(budget or {}).get("keys", ()))  # type: ignore[misc]
    lr_range = lr_bounds(budget)
    read = [read_child(client, r, keys, metric, tuning) for r in runs]
    children = [c for c, _ in read]
    unit = "epoch" if any(u == "epoch" for _, u in read) else "step"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    table = pd.DataFrame(children_rows(children, metric))
    methods = method_table(children, target_ratio, lr_range)
    expected = expected_best_curves(children, initial_losses(children))
    mtable = pd.DataFrame(methods)
    table.to_csv(out_dir / "children.csv", index=False)
    mtable.to_csv(out_dir / "methods.csv", index=False)
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False, "na_rep": ""}
    children_html = table.to_html(**fmt)
    (out_dir / "children.html").write_text(
        _html(f"{parent.info.run_name}: children", {"children": children_html}, [])
    )
    files += [out_dir / "children.csv", out_dir / "children.html", out_dir / "methods.csv"]
    images = []
    if any(c.curve for c in children):
        images.append(out_dir / "training_curves.png")
        plot_training_curves(children, methods, metric, unit, images[-1])
    if any(c.lr for c in children if c.curve):  # one α per method: a point per method
        images.append(out_dir / "tuning_curves.png")
        plot_tuning_curves(children, methods, metric, images[-1])
    if any(len(rows) > 1 for rows in expected.values()):
        images.append(out_dir / "expected_best.png")
        plot_expected_best(expected, metric, images[-1])
    if len({str(r.get("task", "")) for r in methods}) > 1:
        images.append(out_dir / "profiles.png")
        plot_profiles(methods, images[-1])
    files += images
    (out_dir / "report.html").write_text(
        _html(
            f"{parent.info.run_name}: {len(children)} runs, swept {', '.join(keys) or 'nothing'}",
            {
                "methods (ranked by the median final value at the best setting; tuneability: "
                f"target = {target_ratio:g} x initial loss)": mtable.to_html(**fmt),
                "children": children_html,
            },
            images,
        )  # fmt: skip
    )
    files.append(out_dir / "report.html")
    scored = [c for c in children if math.isfinite(c.score)]
    best = min(scored, key=lambda c: c.score) if scored else None
    best_text = f"{best.config}: final {metric} {best.score:.4g}" if best else ""
    return Report(out_dir, children, methods, files, best_text, expected)


def log_report(
    tracking_uri: str,
    parent_run_id: str,
    metric: str = "train/loss",
    out_dir: str | Path | None = None,
    target_ratio: float = TARGET_RATIO,
) -> Report:
    """Build the report and log it to the parent run under ``report/``.

    The files are also kept in ``out_dir``: by default ``<sweep dir>/report`` when the sweep
    directory is on this machine, else a temporary directory that is removed afterwards.
    """
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    sweep_dir = parent.data.tags.get("rescalelab.sweep_dir")
    if out_dir is None and sweep_dir and Path(sweep_dir).is_dir():
        out_dir = Path(sweep_dir) / "report"
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out_dir) if out_dir is not None else Path(tmp)
        report = build_report(client, parent_run_id, target, metric, target_ratio)
        for f in report.files:
            client.log_artifact(parent_run_id, str(f), "report")
    client.set_tag(parent_run_id, "rescalelab.report", "report/report.html")
    if report.best:
        client.set_tag(parent_run_id, "rescalelab.best", report.best)
    return report
