"""The sweep report's numbers (pure: no MLflow, no plotting): epoch curves, quartiles over seeds,
the per-method table with its tuneability measures.

Over the seeds of a configuration the report shows the median and the quartiles (Q1, Q3; the
band between them is the IQR) and ranks methods by the median; a diverged child counts as
``F = +inf``. Per method: the best setting with ``F*`` and its IQR, and the tuneability measures
of :mod:`rescalelab.analysis.tuneability` (expected best after k trials, share of the lr range
reaching the target ``r · L0``, time to target); the old *2x range* (the contiguous run of grid
stepsizes around ``α*`` whose median stays ``≤ 2 F*``) is kept for grids as a supplement. The
record of a child and its vocabulary (configuration, setting, task, method) are
:mod:`rescalelab.analysis.child`'s.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from rescalelab.analysis.child import Child
from rescalelab.analysis.tuneability import (
    TARGET_RATIO,
    expected_best_after_k,
    median_inf,
    range_share,
    time_to_target,
)

RANGE_FACTOR = 2.0
_HUGE = 1e300  # stands for +inf inside quantile arithmetic


def epoch_of(epochs: Sequence[tuple[int, float]]):
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
    of = epoch_of(epochs)
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
    of = epoch_of(epochs)
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
