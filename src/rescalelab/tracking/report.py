"""The sweep report: what a multirun found, logged to its MLflow parent run under ``report/``.

``rescalelab-report <parent run id | sweep dir>`` (also ``python -m rescalelab.tracking.report``)
builds it on demand; :class:`~rescalelab.tracking.sweep.MlflowSweepCallback` builds it when a
multirun ends. Everything is read back from MLflow, so a report can be rebuilt at any time.

Vocabulary, for the swept keys ``K`` of the sweep (``method``, ``norm``, ``optim.lr``, ``seed``…):

* a child's *configuration* is its values of ``K`` minus ``seed``; a *method* is its values of
  ``K`` minus ``seed`` and ``optim.lr`` (the global stepsize α);
* the *epoch curve* of a child is the mean of ``metric`` (``train/loss`` by default) over the
  steps logged in each epoch; its *final* value ``F(α)`` is the mean over the last epoch;
* over the seeds of a configuration the report shows the median and the quartiles
  (Q1, Q3; the band between them is the IQR);
* a child *diverged* when it carries the tag ``rescalelab.status=diverged`` or its final value is
  not finite; a diverged child counts as ``F = +inf`` (it is worse than any finite loss), and the
  tuning curve marks it at the top of the axes.

The *tuning curve* of a method is ``α ↦ median over seeds of F(α)``. With ``F* = min_α`` of it
at ``α*``, the method's *2x range* is the widest interval ``[α_lo, α_hi]`` of grid stepsizes
around ``α*`` (contiguous on the grid) where the median stays ``≤ 2 F*``; its width
``log10(α_hi/α_lo)`` (in decades) says how easy the method is to tune, ``F*`` how good it is
when tuned — the lecture's two questions, kept apart.

Artifacts (under the parent's ``report/``): ``children.csv`` and ``children.html`` (one row per
child: swept values, status, ``rescalelab.status``, wall time, final and best of every standard
metric), ``methods.csv`` (one row per method: ``F*``, ``α*``, 2x range and its width),
``report.html`` (both tables and the figures, self-contained), ``training_curves.png`` (epoch
curves per configuration, median and IQR band over seeds, one panel per method) and, when the
stepsize was swept, ``tuning_curves.png``.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run

from rescalelab.tracking.run import PARENT_FILE
from rescalelab.tracking.store import default_tracking_uri

LR_KEY, SEED_KEY = "optim.lr", "seed"
DIVERGED = "diverged"
STATUS_TAG = "rescalelab.status"
# Metrics of the children table: (key, "min" or "max" is best).
TABLE_METRICS = (
    ("train/loss", "min"),
    ("train/acc", "max"),
    ("val/loss", "min"),
    ("val/acc", "max"),
)
RANGE_FACTOR = 2.0
_HUGE = 1e300  # stands for +inf inside quantile arithmetic


@dataclass
class Child:
    """One job of the sweep, as read back from MLflow."""

    run_id: str
    name: str
    status: str
    tag_status: str
    swept: dict[str, str]
    lr: float | None
    wall_time_s: float | None
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch or step, value)

    @property
    def seed(self) -> str | None:
        return self.swept.get(SEED_KEY)

    @property
    def config(self) -> str:
        return _label({k: v for k, v in self.swept.items() if k != SEED_KEY})

    @property
    def method(self) -> str:
        return _label({k: v for k, v in self.swept.items() if k not in (SEED_KEY, LR_KEY)})

    @property
    def final_curve_value(self) -> float:
        """``F``: the metric averaged over the last epoch (NaN when nothing was logged)."""
        return self.curve[-1][1] if self.curve else math.nan

    @property
    def diverged(self) -> bool:
        if self.tag_status == DIVERGED:
            return True
        return bool(self.curve) and not math.isfinite(self.final_curve_value)

    @property
    def score(self) -> float:
        """``F`` for ranking: +inf when diverged, NaN when the child has no value at all."""
        return math.inf if self.diverged else self.final_curve_value


def _label(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "default"


# ----------------------------------------------------------------------------- math (pure)


def epoch_curve(
    history: Sequence[tuple[int, float]], epochs: Sequence[tuple[int, float]]
) -> tuple[list[tuple[float, float]], str]:
    """Mean of a per-step metric over each epoch, from the ``epoch`` metric's (step, epoch) log.

    Returns the curve and its x unit: ``"epoch"``, or ``"step"`` (the raw history) when no
    ``epoch`` metric was logged.
    """
    if not epochs:
        return [(float(s), v) for s, v in history], "step"
    step_epoch = dict(epochs)
    known = sorted(step_epoch)
    by_epoch: dict[float, list[float]] = defaultdict(list)
    for step, value in history:
        epoch = step_epoch.get(step)
        if epoch is None:  # the epoch of the nearest logged step at or before this one
            i = int(np.searchsorted(known, step, side="right")) - 1
            epoch = step_epoch[known[max(i, 0)]]
        by_epoch[float(epoch)].append(value)
    return [(e, float(np.mean(v))) for e, v in sorted(by_epoch.items())], "epoch"


def quartiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3) with +inf allowed (diverged runs); NaN values are dropped."""
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    arr = np.where(np.isinf(arr), _HUGE, arr)
    q = np.quantile(arr, [0.25, 0.5, 0.75])
    return tuple(math.inf if x >= _HUGE / 10 else float(x) for x in q)  # type: ignore[return-value]


def range_within(
    lrs: Sequence[float], values: Sequence[float], factor: float = RANGE_FACTOR
) -> tuple[float, float, float, float, float]:
    """``(α*, F*, α_lo, α_hi, log10(α_hi/α_lo))`` for a tuning curve ``values`` over ``lrs``.

    ``[α_lo, α_hi]`` is the contiguous run of grid points around the best ``α*`` whose value
    is ``≤ factor · F*``. All NaN when no value is finite.
    """
    order = np.argsort(lrs)
    xs = [float(lrs[i]) for i in order]
    ys = [float(values[i]) for i in order]
    finite = [i for i, y in enumerate(ys) if math.isfinite(y)]
    if not finite:
        return (math.nan,) * 5  # type: ignore[return-value]
    best = min(finite, key=lambda i: ys[i])
    limit = factor * ys[best] if ys[best] >= 0 else ys[best] / factor
    lo = hi = best
    while lo - 1 >= 0 and math.isfinite(ys[lo - 1]) and ys[lo - 1] <= limit:
        lo -= 1
    while hi + 1 < len(ys) and math.isfinite(ys[hi + 1]) and ys[hi + 1] <= limit:
        hi += 1
    width = math.log10(xs[hi] / xs[lo]) if xs[lo] > 0 else math.nan
    return xs[best], ys[best], xs[lo], xs[hi], width


def aggregate_curves(curves: Sequence[Sequence[tuple[float, float]]]) -> np.ndarray:
    """Rows ``(x, Q1, median, Q3)`` over the curves of several seeds, at every x any of them has.

    A non-finite value (a diverged step) counts as +inf.
    """
    at: dict[float, list[float]] = defaultdict(list)
    for curve in curves:
        for x, y in curve:
            at[x].append(y if math.isfinite(y) else math.inf)
    return np.array([(x, *quartiles(ys)) for x, ys in sorted(at.items())], dtype=float).reshape(
        -1, 4
    )


def method_table(children: Sequence[Child]) -> list[dict[str, object]]:
    """One row per method: runs, diverged runs, ``α*``, ``F*`` and the 2x range."""
    rows = []
    by_method: dict[str, list[Child]] = defaultdict(list)
    for c in children:
        by_method[c.method].append(c)
    for method, members in by_method.items():
        by_lr: dict[float, list[float]] = defaultdict(list)
        for c in members:
            if c.lr is not None and not math.isnan(c.score):
                by_lr[c.lr].append(c.score)
        lrs = sorted(by_lr)
        medians = [quartiles(by_lr[a])[1] for a in lrs]
        best_lr, best, lo, hi, width = range_within(lrs, medians) if lrs else (math.nan,) * 5
        rows.append(
            {
                "method": method,
                "runs": len(members),
                "diverged": sum(c.diverged for c in members),
                "stepsizes": len(lrs),
                "best_lr": best_lr,
                "best_final": best,
                "lr_lo_2x": lo if len(lrs) > 1 else math.nan,
                "lr_hi_2x": hi if len(lrs) > 1 else math.nan,
                "width_decades_2x": width if len(lrs) > 1 else math.nan,
            }
        )
    return rows


# ----------------------------------------------------------------------------- reading MLflow


def _parse_overrides(text: str) -> dict[str, str]:
    out = {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def _job_num(run: Run) -> int:
    m = re.search(r"#(\d+)$", run.info.run_name or "")
    return int(m.group(1)) if m else 1 << 30


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """Every run whose ``mlflow.parentRunId`` is ``parent``, in job order."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (_job_num(r), r.info.start_time or 0))


def sweep_swept_keys(parent: Run, runs: Sequence[Run]) -> list[str]:
    """The parent's ``rescalelab.swept_keys`` tag; else the override keys whose values differ."""
    tag = parent.data.tags.get("rescalelab.swept_keys")
    if tag:
        return list(json.loads(tag))
    values: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        for k, v in _parse_overrides(r.data.tags.get("rescalelab.overrides", "")).items():
            values[k].add(v)
    return [k for k, v in values.items() if len(v) > 1 or len(runs) == 1]


def read_child(
    client: MlflowClient, run: Run, keys: Sequence[str], metric: str
) -> tuple[Child, str]:
    """A :class:`Child` with its epoch curve of ``metric``; also the curve's x unit."""
    overrides = _parse_overrides(run.data.tags.get("rescalelab.overrides", ""))
    swept = {k: overrides.get(k, run.data.params.get(k, "?")) for k in keys}
    lr = run.data.params.get(LR_KEY)
    end, start = run.info.end_time, run.info.start_time
    child = Child(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        tag_status=run.data.tags.get(STATUS_TAG, ""),
        swept=swept,
        lr=float(lr) if lr not in (None, "None") else None,
        wall_time_s=(end - start) / 1000 if end and start else None,
    )
    for key, mode in TABLE_METRICS:
        if key in run.data.metrics:
            hist = [m.value for m in client.get_metric_history(run.info.run_id, key)]
            child.final[key] = run.data.metrics[key]
            finite = [v for v in hist if math.isfinite(v)]
            if finite:
                child.best[key] = min(finite) if mode == "min" else max(finite)
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
    epochs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")]
    child.curve, unit = epoch_curve(history, epochs)
    return child, unit


# ----------------------------------------------------------------------------- output


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


def _color_cycle(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(n - 1, 1)) if n > 10 else cmap(i) for i in range(n)]


def _log_y(ax) -> None:
    """Log y axis with plain-number tick labels (2.3, not 2.3x10^0)."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    class PlainLog(LogFormatter):  # matplotlib's choice of labelled ticks, written 0.6 not 6e-01
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:.3g}"

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    # minor labels only where the axis spans less than ~2 decades (matplotlib's thresholds)
    ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def training_panels(
    children: Sequence[Child], methods: Sequence[dict[str, object]]
) -> list[tuple[str, list[tuple[str, list[list[tuple[float, float]]]]]]]:
    """``[(title, [(label, seed curves), ...]), ...]``: what :func:`plot_training_curves` draws.

    Without a stepsize sweep: one panel, one line per configuration. With one: first every
    method at its best stepsize α* (the comparison when tuned), then one panel per method with
    a line per stepsize.
    """
    with_curve = [c for c in children if c.curve]

    def curves(members: Sequence[Child]) -> list[list[tuple[float, float]]]:
        return [c.curve for c in members]

    configs = list(dict.fromkeys(c.config for c in with_curve))
    if len({c.lr for c in with_curve}) <= 1:
        lines = [(cfg, curves([c for c in with_curve if c.config == cfg])) for cfg in configs]
        return [("every configuration", lines)]
    best_lr = {str(r["method"]): r["best_lr"] for r in methods}
    tuned = []
    for method in dict.fromkeys(c.method for c in with_curve):
        members = [c for c in with_curve if c.method == method and c.lr == best_lr.get(method)]
        if members:
            tuned.append((f"{method} α*={members[0].lr:g}", curves(members)))
    panels = [("each method at its best stepsize α*", tuned)] if len(tuned) > 1 else []
    for method in dict.fromkeys(c.method for c in with_curve):
        members = [c for c in with_curve if c.method == method]
        lrs = sorted({c.lr for c in members if c.lr is not None})
        lines = [(f"α={a:g}", curves([c for c in members if c.lr == a])) for a in lrs]
        panels.append((method, lines))
    return panels


def plot_training_curves(
    children: Sequence[Child],
    methods: Sequence[dict[str, object]],
    metric: str,
    unit: str,
    path: Path,
) -> None:
    """Epoch curves: per line the median over seeds and the IQR band (see :func:`training_panels`)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = training_panels(children, methods)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.4 * ncols, 4.0 * nrows), squeeze=False, sharey=True
    )
    values = [v for c in children for _, v in c.curve if math.isfinite(v)]
    for ax, (title, lines) in zip(axes.flat, panels):
        for color, (label, curves) in zip(_color_cycle(len(lines)), lines):
            agg = aggregate_curves(curves)
            finite = np.isfinite(agg[:, 2])
            if len(curves) > 1:
                label += f" ({len(curves)} seeds)"
            ax.plot(agg[finite, 0], agg[finite, 2], color=color, label=label, marker=".")
            band = np.isfinite(agg[:, 1]) & np.isfinite(agg[:, 3])
            if len(curves) > 1 and band.any():
                ax.fill_between(agg[band, 0], agg[band, 1], agg[band, 3], color=color, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit)
        ax.set_ylabel(f"{metric} (epoch mean)" if unit == "epoch" else metric)
        if values and min(values) > 0:
            _log_y(ax)
        if unit == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{metric}: median over seeds, band = interquartile range", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tuning_curves(
    children: Sequence[Child], methods: Sequence[dict[str, object]], metric: str, path: Path
) -> None:
    """Final ``metric`` against the stepsize per method: median, quartiles, diverged marked."""
    import matplotlib.pyplot as plt

    finite = [c.score for c in children if c.lr and math.isfinite(c.score)]
    top = max(finite) * 1.5 if finite else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    rows = {str(r["method"]): r for r in methods}
    for k, (color, method) in enumerate(zip(_color_cycle(len(rows)), rows)):
        jitter = 1 + 0.05 * (k - (len(rows) - 1) / 2)  # diverged markers of methods side by side
        by_lr: dict[float, list[float]] = defaultdict(list)
        for c in children:
            if c.method == method and c.lr is not None and not math.isnan(c.score):
                by_lr[c.lr].append(c.score)
        if not by_lr:
            continue
        lrs = np.array(sorted(by_lr))
        q = np.array([quartiles(by_lr[a]) for a in lrs])
        row = rows[method]
        label = f"{method}: best {row['best_final']:.3g} at α={row['best_lr']:.3g}"
        if math.isfinite(float(row["width_decades_2x"])):  # type: ignore[arg-type]
            label += (
                f"; ≤2x best for α∈[{row['lr_lo_2x']:.3g}, {row['lr_hi_2x']:.3g}]"
                f" ({row['width_decades_2x']:.2f} decades)"
            )
        ok = np.isfinite(q[:, 1])
        ax.plot(lrs[ok], q[ok, 1], marker="o", color=color, label=label)
        band = np.isfinite(q[:, 0]) & np.isfinite(q[:, 2])
        ax.fill_between(lrs[band], q[band, 0], np.minimum(q[band, 2], top), color=color, alpha=0.2)
        for a, values in by_lr.items():  # every diverged seed: an x at the top
            n = sum(not math.isfinite(v) for v in values)
            if n:
                ax.scatter([a * jitter], [top], marker="x", s=40 + 20 * n, color=color, zorder=3)
        if math.isfinite(float(row["best_final"])):  # type: ignore[arg-type]
            ax.scatter([row["best_lr"]], [row["best_final"]], marker="*", s=160, color=color)
    ax.set_xscale("log")
    if any(c.diverged for c in children):
        ax.axhline(top, color="grey", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], top, " diverged (x)", va="bottom", fontsize=8, color="grey")
    if finite and min(finite) > 0:
        _log_y(ax)
    ax.set_xlabel("stepsize α (optim.lr)")
    ax.set_ylabel(f"final {metric} (last-epoch mean)")
    ax.set_title("Tuning curves: median over seeds, band = quartiles", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def build_report(
    client: MlflowClient, parent_run_id: str, out_dir: Path, metric: str = "train/loss"
) -> Report:
    """Read the sweep of ``parent_run_id`` and write the tables and figures into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    parent = client.get_run(parent_run_id)
    runs = child_runs(client, parent)
    keys = sweep_swept_keys(parent, runs)
    read = [read_child(client, r, keys, metric) for r in runs]
    children = [c for c, _ in read]
    unit = "epoch" if any(u == "epoch" for _, u in read) else "step"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    table = pd.DataFrame(children_rows(children, metric))
    methods = method_table(children)
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
    if any(r["stepsizes"] > 1 for r in methods):  # type: ignore[operator]
        images.append(out_dir / "tuning_curves.png")
        plot_tuning_curves(children, methods, metric, images[-1])
    files += images
    (out_dir / "report.html").write_text(
        _html(
            f"{parent.info.run_name}: {len(children)} runs, swept {', '.join(keys) or 'nothing'}",
            {
                "methods (tuning: best final value and 2x stepsize range)": mtable.to_html(**fmt),
                "children": children_html,
            },
            images,
        )  # fmt: skip
    )
    files.append(out_dir / "report.html")
    scored = [c for c in children if math.isfinite(c.score)]
    best = min(scored, key=lambda c: c.score) if scored else None
    best_text = f"{best.config}: final {metric} {best.score:.4g}" if best else ""
    return Report(out_dir, children, methods, files, best_text)


def log_report(
    tracking_uri: str,
    parent_run_id: str,
    metric: str = "train/loss",
    out_dir: str | Path | None = None,
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
        report = build_report(client, parent_run_id, target, metric)
        for f in report.files:
            client.log_artifact(parent_run_id, str(f), "report")
    client.set_tag(parent_run_id, "rescalelab.report", "report/report.html")
    if report.best:
        client.set_tag(parent_run_id, "rescalelab.best", report.best)
    return report


def resolve_target(target: str, tracking_uri: str | None) -> tuple[str, str]:
    """``(tracking_uri, parent_run_id)`` from a sweep directory or a parent run id."""
    path = Path(target)
    if path.is_dir():
        info_file = path / PARENT_FILE
        if not info_file.exists():
            raise SystemExit(f"error: {path} has no {PARENT_FILE}: is it a multirun directory?")
        info = json.loads(info_file.read_text())
        return tracking_uri or info["tracking_uri"], info["run_id"]
    if not re.fullmatch(r"[0-9a-f]{32}", target):
        raise SystemExit(f"error: {target!r} is neither a sweep directory nor a run id")
    return tracking_uri or default_tracking_uri(os.getcwd()), target


def keep_previous(client: MlflowClient, run_id: str, out: str | None) -> Path | None:
    """Rename an existing report folder (``--out``, else ``<sweep dir>/report``) to
    ``report-<its time>`` so that rebuilding never silently overwrites it; return the new name."""
    sweep_dir = client.get_run(run_id).data.tags.get("rescalelab.sweep_dir")
    folder = Path(out) if out else Path(sweep_dir) / "report" if sweep_dir else None
    if folder is None or not folder.is_dir() or not any(folder.iterdir()):
        return None
    when = datetime.fromtimestamp(folder.stat().st_mtime)
    kept = folder.with_name(f"{folder.name}-{when:%Y%m%d-%H%M%S}")
    folder.rename(kept)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """``rescalelab-report <parent run id | sweep dir> [--tracking-uri URI] [--metric KEY]``."""
    p = argparse.ArgumentParser(
        prog="rescalelab-report",
        description="Build a sweep's report (tables and figures) and log it to its parent run.",
    )
    p.add_argument("target", help="a multirun directory (holds mlflow_parent.json) or a run id")
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: the sweep's own; else $MLFLOW_TRACKING_URI, "
        "else sqlite:///$PWD/mlflow.db)",
    )
    p.add_argument("--metric", default="train/loss", help="curve metric (default train/loss)")
    p.add_argument("--out", help="also keep the files here (default: <sweep dir>/report)")
    args = p.parse_args(argv)
    uri, run_id = resolve_target(args.target, args.tracking_uri)
    try:
        kept = keep_previous(MlflowClient(uri), run_id, args.out)
        if kept is not None:
            print(f"the previous report is kept in {kept}; the run's report/ is replaced")
        report = log_report(uri, run_id, metric=args.metric, out_dir=args.out)
    except Exception as e:  # MlflowException (unknown run), I/O errors: one line, exit 1
        print(
            f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            file=sys.stderr,
        )
        return 1
    print(f"report of {len(report.children)} runs logged to run {run_id} (report/)")
    for row in report.methods:
        line = f"  {row['method']}: best final {args.metric} {row['best_final']:.4g}"
        if int(row["stepsizes"]) > 1:  # type: ignore[call-overload]
            line += f" at lr={row['best_lr']:.4g}, 2x range {row['width_decades_2x']:.2f} decades"
        print(line)
    print(f"files: {report.out_dir}" if args.out or report.out_dir.exists() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
