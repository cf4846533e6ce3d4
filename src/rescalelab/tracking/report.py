"""The sweep report: what a multirun found, logged to its MLflow parent run under ``report/``.

``rescalelab-report <parent run id | sweep dir>`` (also ``python -m rescalelab.tracking.report``)
builds it on demand; :class:`~rescalelab.tracking.sweep.MlflowSweepCallback` builds it when a
multirun ends. Everything is read back from MLflow, so a report can be rebuilt at any time.

Vocabulary, for the swept keys ``K`` of the sweep (``method``, ``norm``, ``optim.lr``, ``seed``…):

* a child's *configuration* is its values of ``K`` minus ``seed``; its *setting* the tuned keys
  (``optim.lr``; for an equal budget the space's keys and ``budget_trial``); its *task* the
  ``data`` option when swept; its *method* the configuration minus setting and task;
* the *epoch curve* of a child is ``train/loss_epoch`` (the mean over every step of each epoch)
  when the run logged it, else the mean of the logged ``train/loss`` steps of each epoch; its
  *final* value ``F`` is the last epoch's;
* over the seeds of a configuration the report shows the median and the quartiles
  (Q1, Q3; the band between them is the IQR) and ranks methods by the median;
* a child *diverged* when it carries the tag ``rescalelab.status=diverged`` or its final value is
  not finite; a diverged child counts as ``F = +inf`` and is marked × in the figures (in the
  training curves at its ``rescalelab.diverged_step``).

Per method the report gives the best setting with ``F*`` and its IQR, and the tuneability
measures of :mod:`rescalelab.analysis.tuneability` (expected best after k trials, share of the lr
range reaching the target ``r · L0``, time to target); the old *2x range* (the contiguous run of
grid stepsizes around ``α*`` whose median stays ``≤ 2 F*``) is kept for grids as a supplement.
With several ``data`` options, performance profiles (:mod:`rescalelab.analysis.profiles`).

Artifacts (under the parent's ``report/``): ``children.csv`` and ``children.html``,
``methods.csv``, ``report.html`` (tables and figures, self-contained), ``training_curves.png``,
``tuning_curves.png``, ``expected_best.png`` (several settings) and ``profiles.png`` (several
tasks).
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

from rescalelab.analysis.budget import lr_bounds
from rescalelab.analysis.profiles import profile
from rescalelab.analysis.tuneability import (
    TARGET_RATIO,
    expected_best_after_k,
    median_inf,
    range_share,
    time_to_target,
)
from rescalelab.tracking.run import PARENT_FILE
from rescalelab.tracking.store import default_tracking_uri

LR_KEY, SEED_KEY, TASK_KEY = "optim.lr", "seed", "data"
EPOCH_METRIC = "train/loss_epoch"  # the epoch mean over every step, when the run logs it
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
    stamps: list[float] = field(default_factory=list)  # ms when each curve point was logged
    start_ms: float | None = None
    first_loss: float = math.nan  # the first logged per-step training loss
    diverged_x: float | None = None  # epoch (or step) of the divergence guard's step
    tuning: tuple[str, ...] = (LR_KEY,)  # keys that a tuner chooses: the "setting"

    @property
    def seed(self) -> str | None:
        return self.swept.get(SEED_KEY)

    @property
    def config(self) -> str:
        return _label({k: v for k, v in self.swept.items() if k != SEED_KEY})

    @property
    def task(self) -> str:
        """The ``data`` option when the sweep spans several (a task of the profiles), else ``""``."""
        return self.swept.get(TASK_KEY, "")

    @property
    def method(self) -> str:
        skip = (SEED_KEY, TASK_KEY, *self.tuning)
        return _label({k: v for k, v in self.swept.items() if k not in skip})

    @property
    def setting(self) -> str:
        """The tuned values (``optim.lr=0.1``; a budget trial's point) without the seed."""
        return _label({k: v for k, v in self.swept.items() if k in self.tuning}) or "default"

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


def _epoch_of(epochs: Sequence[tuple[int, float]]):
    """``step ↦ epoch`` from the ``epoch`` metric's (step, epoch) log: a step without its own
    entry belongs to the epoch of the nearest logged step at or before it."""
    step_epoch = dict(epochs)
    known = sorted(step_epoch)

    def of(step: int) -> float:
        epoch = step_epoch.get(step)
        if epoch is None:
            i = int(np.searchsorted(known, step, side="right")) - 1
            epoch = step_epoch[known[max(i, 0)]]
        return float(epoch)

    return of


def epoch_curve(
    history: Sequence[tuple[int, float]], epochs: Sequence[tuple[int, float]]
) -> tuple[list[tuple[float, float]], str]:
    """Mean of a per-step metric over each epoch, from the ``epoch`` metric's (step, epoch) log.

    Returns the curve and its x unit: ``"epoch"``, or ``"step"`` (the raw history) when no
    ``epoch`` metric was logged. A metric logged once per epoch (``train/loss_epoch``) is its
    own mean.
    """
    if not epochs:
        return [(float(s), v) for s, v in history], "step"
    of = _epoch_of(epochs)
    by_epoch: dict[float, list[float]] = defaultdict(list)
    for step, value in history:
        by_epoch[of(step)].append(value)
    return [(e, float(np.mean(v))) for e, v in sorted(by_epoch.items())], "epoch"


def epoch_stamps(
    stamps: Sequence[tuple[int, float]], epochs: Sequence[tuple[int, float]]
) -> list[float]:
    """The time (ms) each point of :func:`epoch_curve` was complete: its epoch's last log."""
    if not epochs:
        return [float(s) for _, s in stamps]
    of = _epoch_of(epochs)
    last: dict[float, float] = {}
    for step, stamp in stamps:
        e = of(step)
        last[e] = max(last.get(e, -math.inf), float(stamp))
    return [last[e] for e in sorted(last)]


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


def initial_losses(children: Sequence[Child]) -> dict[str, float]:
    """``L0`` per task: the median over the task's children of their first logged training loss
    (the loss before the first update when ``trainer.log_every_n_steps=1``), one target for all."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for c in children:
        first = c.first_loss if math.isfinite(c.first_loss) else (c.curve[0][1] if c.curve else
                                                                 math.nan)  # fmt: skip
        if math.isfinite(first):
            by_task[c.task].append(first)
    return {task: float(np.median(v)) for task, v in by_task.items()}


def _groups(children: Sequence[Child]) -> dict[tuple[str, str], list[Child]]:
    out: dict[tuple[str, str], list[Child]] = defaultdict(list)
    for c in children:
        out[(c.task, c.method)].append(c)
    return out


def child_time_to_target(c: Child, target: float) -> tuple[float, float]:
    """``(epochs, seconds)`` to ``target`` for one child (``+inf`` when diverged or never)."""
    if c.diverged and not c.curve:
        return math.inf, math.inf
    stamps = c.stamps if len(c.stamps) == len(c.curve) else [math.nan] * len(c.curve)
    return time_to_target([(x, y, s) for (x, y), s in zip(c.curve, stamps)], c.start_ms, target)


def expected_best_curves(
    children: Sequence[Child], initial: dict[str, float]
) -> dict[tuple[str, str], np.ndarray]:
    """Per (task, method): rows ``(k, Q1, median, Q3)`` over seeds of ``E[min_k]`` (formula (a))
    over that seed's settings, a diverged setting counting as ``L0``."""
    out = {}
    for (task, method), members in _groups(children).items():
        by_seed: dict[str | None, list[float]] = defaultdict(list)
        for c in members:
            if not math.isnan(c.score):
                by_seed[c.seed].append(c.score)
        cap = initial.get(task)
        curves = [expected_best_after_k(v, cap=cap) for v in by_seed.values() if v]
        if not curves:
            continue
        k_max = min(len(e) for e in curves)
        rows = [(k, *quartiles([e[k - 1] for e in curves])) for k in range(1, k_max + 1)]
        out[(task, method)] = np.array(rows, dtype=float).reshape(-1, 4)
    return out


def method_table(
    children: Sequence[Child],
    target_ratio: float = TARGET_RATIO,
    lr_range: tuple[float, float] | None = None,
) -> list[dict[str, object]]:
    """One row per (task, method): runs, diverged runs, the best setting with ``F*`` and its IQR
    over seeds, the three tuneability measures (:mod:`rescalelab.analysis.tuneability`) and
    the 2x range of a stepsize grid (a supplement)."""
    rows = []
    initial = initial_losses(children)
    expected = expected_best_curves(children, initial)
    with_task = any(c.task for c in children)
    for (task, method), members in _groups(children).items():
        settings: dict[str, list[Child]] = defaultdict(list)
        for c in members:
            settings[c.setting].append(c)
        scored = {s: [c.score for c in cs if not math.isnan(c.score)] for s, cs in settings.items()}
        medians = {s: quartiles(v)[1] for s, v in scored.items() if v}
        finite = {s: m for s, m in medians.items() if math.isfinite(m)}
        best = min(finite, key=finite.__getitem__) if finite else None
        q1, med, q3 = quartiles(scored[best]) if best else (math.nan,) * 3
        lr_of = {s: cs[0].lr for s, cs in settings.items()}
        l0 = initial.get(task, math.nan)
        target = target_ratio * l0
        reach = {
            s: median_inf([child_time_to_target(c, target)[0] for c in cs])
            for s, cs in settings.items()
        }
        with_lr = [s for s in settings if lr_of[s]]
        decades, total, share = range_share(
            [lr_of[s] for s in with_lr],  # type: ignore[misc]
            [float(math.isfinite(reach[s])) for s in with_lr],
            lr_range,
        ) if with_lr else (math.nan,) * 3  # fmt: skip
        times = [child_time_to_target(c, target) for c in settings[best]] if best else []
        # the 2x range (a supplement): only for a grid over the stepsize alone
        grid = len({lr_of[s] for s in with_lr}) == len(with_lr) > 1 and lr_range is None
        lrs = sorted(lr_of[s] for s in with_lr if s in medians)  # type: ignore[type-var]
        by_lr = {lr_of[s]: medians[s] for s in with_lr if s in medians}
        _, _, lo, hi, width = (
            range_within(lrs, [by_lr[a] for a in lrs]) if grid and lrs else (math.nan,) * 5
        )
        ek = expected.get((task, method))
        val_acc = [c.best.get("val/acc", math.nan) for c in settings[best]] if best else []
        row: dict[str, object] = {"method": method}
        if with_task:
            row["task"] = task
        row.update(
            {
                "runs": len(members),
                "diverged": sum(c.diverged for c in members),
                "settings": len(settings),
                "stepsizes": len({lr_of[s] for s in with_lr}),
                "seeds": len(scored[best]) if best else 0,
                "best_setting": best or "",
                "best_lr": lr_of[best] if best and lr_of[best] else math.nan,
                "best_final": med,
                "best_final_q1": q1,
                "best_final_q3": q3,
                "best_val_acc": float(np.nanmedian(val_acc)) if np.isfinite(val_acc).any() else
                math.nan,
                "initial_loss": l0,
                "target": target,
                "expected_best_k1": float(ek[0, 2]) if ek is not None else math.nan,
                "expected_best_kK": float(ek[-1, 2]) if ek is not None else math.nan,
                "K": int(ek[-1, 0]) if ek is not None else 0,
                "reach_decades": decades,
                "range_decades": total,
                "reach_share": share,
                "epochs_to_target": median_inf([e for e, _ in times]) if times else math.nan,
                "seconds_to_target": median_inf([s for _, s in times]) if times else math.nan,
                "lr_lo_2x": lo,
                "lr_hi_2x": hi,
                "width_decades_2x": width,
            }
        )  # fmt: skip
        rows.append(row)
    rows.sort(key=lambda r: (str(r.get("task", "")), _rank(r["best_final"])))  # by median F*
    return rows


def _rank(value: object) -> float:
    v = float(value)  # type: ignore[arg-type]
    return math.inf if math.isnan(v) else v


def profile_costs(
    methods: Sequence[dict[str, object]], key: str = "epochs_to_target"
) -> dict[str, dict[str, float]]:
    """``{task: {method: cost}}`` for the performance profiles (tasks: the swept ``data``)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in methods:
        cost = float(r[key])  # type: ignore[arg-type]
        out[str(r.get("task", ""))][str(r["method"])] = math.inf if math.isnan(cost) else cost
    return dict(out)


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
    overrides = _parse_overrides(run.data.tags.get("rescalelab.overrides", ""))
    swept = {}
    for k in keys:  # a key the job did not have (optim.eps of SGD in a budget) is left out
        value = overrides.get(k, run.data.params.get(k))
        if value is not None or k not in tuning:
            swept[k] = value if value is not None else "?"
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
        start_ms=float(start) if start else None,
        tuning=tuple(tuning),
    )
    for key, mode in TABLE_METRICS:
        if key in run.data.metrics:
            hist = [m.value for m in client.get_metric_history(run.info.run_id, key)]
            child.final[key] = run.data.metrics[key]
            finite = [v for v in hist if math.isfinite(v)]
            if finite:
                child.best[key] = min(finite) if mode == "min" else max(finite)
    source = metric
    if metric == "train/loss" and EPOCH_METRIC in run.data.metrics:
        source = EPOCH_METRIC
    points = client.get_metric_history(run.info.run_id, source)
    epochs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")]
    child.curve, unit = epoch_curve([(m.step, m.value) for m in points], epochs)
    child.stamps = epoch_stamps([(m.step, m.timestamp) for m in points], epochs)
    steps = client.get_metric_history(run.info.run_id, "train/loss") if "train/loss" in \
        run.data.metrics else points  # fmt: skip
    if steps:
        child.first_loss = min(steps, key=lambda m: (m.step, m.timestamp)).value
    step_tag = run.data.tags.get("rescalelab.diverged_step")
    if step_tag not in (None, "", "None"):
        step = int(float(step_tag))
        child.diverged_x = _epoch_of(epochs)(step) if epochs else float(step)
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


def _name(task: str, method: str) -> str:
    return f"{task}: {method}" if task else method


def _row_name(row: dict[str, object]) -> str:
    return _name(str(row.get("task", "")), str(row["method"]))


def training_panels(
    children: Sequence[Child], methods: Sequence[dict[str, object]]
) -> list[tuple[str, list[tuple[str, list[Child]]]]]:
    """``[(title, [(label, seed children), ...]), ...]``: what :func:`plot_training_curves` draws.

    Without a tuned key swept: one panel, one line per configuration. With one: first every
    method at its best setting (the comparison when tuned), then one panel per method with a
    line per setting (per stepsize α on a grid).
    """
    with_curve = [c for c in children if c.curve or c.diverged_x is not None]
    configs = list(dict.fromkeys(c.config for c in with_curve))
    if len({c.setting for c in with_curve}) <= 1:
        lines = [(cfg, [c for c in with_curve if c.config == cfg]) for cfg in configs]
        return [("every configuration", lines)]
    best = {_row_name(r): r["best_setting"] for r in methods}
    names = list(dict.fromkeys(_name(c.task, c.method) for c in with_curve))
    tuned = []
    for name in names:
        members = [c for c in with_curve if _name(c.task, c.method) == name and
                   c.setting == best.get(name)]  # fmt: skip
        if members:
            what = f"α*={members[0].lr:g}" if members[0].lr is not None else members[0].setting
            tuned.append((f"{name} {what}", members))
    panels = [("each method at its best setting", tuned)] if len(tuned) > 1 else []
    for name in names:
        members = [c for c in with_curve if _name(c.task, c.method) == name]
        settings = sorted(dict.fromkeys(c.setting for c in members),
                          key=lambda s: next(c.lr or 0.0 for c in members if c.setting == s))  # fmt: skip
        lines = []
        for s in settings:
            group = [c for c in members if c.setting == s]
            lines.append((f"α={group[0].lr:g}" if group[0].lr is not None else s, group))
        panels.append((name, lines))
    return panels


def plot_training_curves(
    children: Sequence[Child],
    methods: Sequence[dict[str, object]],
    metric: str,
    unit: str,
    path: Path,
) -> None:
    """Epoch curves: per line the median over seeds and the IQR band (see :func:`training_panels`);
    a diverged seed is an × at the epoch of its divergence, at its last finite value (or at the
    top of the axes when it had none)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = training_panels(children, methods)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.4 * ncols, 4.0 * nrows), squeeze=False, sharey=True
    )
    values = [v for c in children for _, v in c.curve if math.isfinite(v)]
    top = max(values) if values else 1.0
    for ax, (title, lines) in zip(axes.flat, panels):
        for color, (label, members) in zip(_color_cycle(len(lines)), lines):
            curves = [c.curve for c in members if c.curve]
            if len(members) > 1:
                label += f" (n={len(members)})"
            if curves:
                agg = aggregate_curves(curves)
                finite = np.isfinite(agg[:, 2])
                ax.plot(agg[finite, 0], agg[finite, 2], color=color, label=label, marker=".")
                band = np.isfinite(agg[:, 1]) & np.isfinite(agg[:, 3])
                if len(curves) > 1 and band.any():
                    ax.fill_between(
                        agg[band, 0], agg[band, 1], agg[band, 3], color=color, alpha=0.2
                    )
            for c in members:  # every diverged seed: an x at its step
                if c.diverged_x is None:
                    continue
                ok = [v for _, v in c.curve if math.isfinite(v)]
                ax.scatter([c.diverged_x], [ok[-1] if ok else top], marker="x", s=60,
                           color=color, zorder=4, label=None)  # fmt: skip
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
    fig.suptitle(
        f"{metric}: median over seeds, band = interquartile range, x = diverged", fontsize=11
    )
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
    rows = {_row_name(r): r for r in methods}
    for k, (color, name) in enumerate(zip(_color_cycle(len(rows)), rows)):
        jitter = 1 + 0.05 * (k - (len(rows) - 1) / 2)  # diverged markers of methods side by side
        by_lr: dict[float, list[float]] = defaultdict(list)
        for c in children:
            if _name(c.task, c.method) == name and c.lr is not None and not math.isnan(c.score):
                by_lr[c.lr].append(c.score)
        if not by_lr:
            continue
        lrs = np.array(sorted(by_lr))
        q = np.array([quartiles(by_lr[a]) for a in lrs])
        row = rows[name]
        label = f"{name}: best {row['best_final']:.3g} at α={row['best_lr']:.3g}"
        if math.isfinite(float(row["reach_share"])):  # type: ignore[arg-type]
            label += (
                f"; reaches target on {row['reach_decades']:.2f} of {row['range_decades']:.2f} dec."
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
    targets = {float(r["target"]) for r in methods if math.isfinite(float(r["target"]))}  # type: ignore[arg-type]
    for target in targets:
        ax.axhline(target, color="black", lw=0.8, ls="--")
    if targets:
        ax.text(ax.get_xlim()[0], min(targets), " target", va="bottom", fontsize=8)
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


def plot_expected_best(curves: dict[tuple[str, str], np.ndarray], metric: str, path: Path) -> None:
    """``E[best after k trials]`` per method: median over seeds, band = quartiles."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for color, ((task, method), rows) in zip(_color_cycle(len(curves)), curves.items()):
        ax.plot(rows[:, 0], rows[:, 2], marker="o", color=color, label=_name(task, method))
        ax.fill_between(rows[:, 0], rows[:, 1], rows[:, 3], color=color, alpha=0.2)
    ax.set_xlabel("k (trials)")
    ax.set_ylabel(f"expected best final {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if all((r[:, 1:] > 0).all() for r in curves.values()):
        _log_y(ax)
    ax.set_title("Expected best after k trials (Sivaprasad et al. 2020), band = seed IQR",
                 fontsize=10)  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profiles(methods: Sequence[dict[str, object]], path: Path) -> None:
    """Performance profiles over the tasks: epochs and seconds to the target."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    for ax, key, what in zip(axes, ("epochs_to_target", "seconds_to_target"), ("epochs", "s")):
        costs = profile_costs(methods, key)
        finite = [r for by in costs.values() for r in by.values() if math.isfinite(r)]
        tau_max = max(4.0, 1.2 * max(finite) / max(min(finite), 1e-12)) if finite else 4.0
        taus = np.geomspace(1, tau_max, 200)
        for color, (m, rho) in zip(_color_cycle(len(costs)), profile(costs, taus).items()):
            ax.step(taus, rho, where="post", color=color, label=m)
        ax.set_xscale("log")
        ax.set_xlabel(f"τ (× the best method's {what} to target)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{key.replace('_', ' ')}: {len(costs)} tasks", fontsize=10)
    axes[0].set_ylabel("fraction of tasks solved within τ")
    axes[0].legend(fontsize=7)
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
    p.add_argument(
        "--target-ratio",
        type=float,
        default=TARGET_RATIO,
        help="tuneability target as a fraction of the initial loss (default 0.01)",
    )
    args = p.parse_args(argv)
    uri, run_id = resolve_target(args.target, args.tracking_uri)
    try:
        kept = keep_previous(MlflowClient(uri), run_id, args.out)
        if kept is not None:
            print(f"the previous report is kept in {kept}; the run's report/ is replaced")
        report = log_report(
            uri, run_id, metric=args.metric, out_dir=args.out, target_ratio=args.target_ratio
        )
    except Exception as e:  # MlflowException (unknown run), I/O errors: one line, exit 1
        print(
            f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            file=sys.stderr,
        )
        return 1
    print(f"report of {len(report.children)} runs logged to run {run_id} (report/)")
    from rescalelab.analysis.summary import finish_sweep

    finish_sweep(MlflowClient(uri), run_id, report, uri, args.metric)
    print(f"files: {report.out_dir}" if args.out or report.out_dir.exists() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
