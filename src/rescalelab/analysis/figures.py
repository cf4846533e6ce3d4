"""The reports' figures: the sweep report's training curves, tuning curves, expected best after
k trials and performance profiles (matplotlib, written as PNG files), and the theory report's
gap-vs-k figure (:func:`theory_figure`).

matplotlib is imported inside each function: it is only needed once a sweep is over.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rescalelab.analysis.child import Child
from rescalelab.analysis.profiles import profile
from rescalelab.analysis.sweep_stats import aggregate_curves, profile_costs, quartiles
from rescalelab.analysis.theory_stats import Group, diverged, finite_or_inf, lr_of, seeds_of


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


# ----------------------------------------------------------------------------- the theory report

_TITLES = {
    "fixed_step": "measured (solid), Thm 4.6 bound (dashed), plateaus (dotted)",
    "diminishing": "measured (solid), Thm 4.6 / 4.7 bound (dashed)",
    "minibatch": "colour: α/n_mb, style: n_mb; thin dashed: Thm 4.6 bound",
}
_NOTE = {"transform": None, "fontsize": 7, "va": "bottom", "bbox": {"facecolor": "white",
                                                                    "alpha": 0.8}}  # fmt: skip


def theory_figure(
    kind: str, groups: Sequence[Group], summary: dict[str, Any], diverge_factor: float
) -> Any:
    """The theory report's figure (``theory/gap_vs_k.png``): the seed-mean gap and bound of every
    configuration against k (``minibatch``: against k·n_mb), log-log; for ``divergence`` the
    final gap against α per n_mb with the predicted thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if kind == "divergence":
        _divergence_axes(ax, groups, summary, colors, diverge_factor)
    else:
        _gap_axes(ax, kind, groups, colors)
        if kind == "fixed_step":
            _plateau_notes(ax, groups, summary, colors)
        if kind == "diminishing":
            _slope_notes(ax, groups, summary)
        per_eval = kind == "minibatch"
        ax.set(xscale="log", yscale="log",
               xlabel="gradient evaluations k·n_mb" if per_eval else "SG step k",
               ylabel="F(w_k) − F*  (mean over seeds)", title=_TITLES[kind])  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _divergence_axes(
    ax: Any, groups: Sequence[Group], summary: dict[str, Any], colors: list, factor: float
) -> None:
    """Final gap against α, one colour per n_mb (x: diverged, drawn at 1e12)."""
    for i, row in enumerate(summary["thresholds"]):
        color = colors[i % len(colors)]
        b = row["batch_size"]
        pts = []
        for c in (c for g in groups if g.batch_size == b for c in g.children):
            gap = c.histories.get("theory/gap", [])
            last = finite_or_inf(gap[-1][1]) if gap else math.inf
            bad = diverged(c, factor)  # (the guard may stop it early)
            pts.append((lr_of(c), 1e12 if bad else min(last, 1e12), bad))
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, lw=1)
            for lr, v, d in pts:
                ax.plot(lr, v, "x" if d else "o", color=color, ms=7)
            ax.plot([], [], "-o", color=color, label=f"n_mb={b}")
        if row["predicted_threshold"]:
            ax.axvline(row["predicted_threshold"], color=color, ls="--", lw=1)
    if summary.get("two_over_L"):
        ax.axvline(summary["two_over_L"], color="k", ls=":", lw=1, label="2/L")
    ax.set(xscale="log", yscale="log", xlabel="stepsize α",
           ylabel="final F(w) − F*  (x: diverged, drawn at 1e12)",
           title="divergence: dashed = predicted mean-square threshold per n_mb")  # fmt: skip


def _gap_axes(ax: Any, kind: str, groups: Sequence[Group], colors: list) -> None:
    """Gap (solid) and bound (dashed) per configuration; ``minibatch``: one colour per α/n_mb
    (a pair to compare), one line style per n_mb, against gradient evaluations."""
    per_eval = kind == "minibatch"
    ratios = sorted({round(g.lr / g.batch_size, 12) for g in groups})
    sizes = sorted({g.batch_size for g in groups})
    styles, top, low = ["-", "-.", ":", (0, (5, 1))], 0.0, math.inf
    for i, g in enumerate(groups):
        color, ls = colors[i % len(colors)], "-"
        if per_eval:
            color = colors[ratios.index(round(g.lr / g.batch_size, 12)) % len(colors)]
            ls = styles[sizes.index(g.batch_size) % len(styles)]
        steps, gap = g.mean("gap")
        bsteps, bound = g.mean("bound")
        scale = g.batch_size if per_eval else 1
        keep = (steps >= 1) & np.isfinite(gap) & (gap > 0)
        if len(gap) and math.isfinite(gap[0]):
            top = max(top, float(gap[0]))
        if keep.any():
            low = min(low, float(gap[keep].min()))
        ax.plot(steps[keep] * scale, gap[keep], color=color, ls=ls, lw=1.5,
                label=f"{g.label} ({seeds_of(g)} seeds)")  # fmt: skip
        bkeep = (bsteps >= 1) & np.isfinite(bound) & (bound > 0)
        if bkeep.any():
            ax.plot(bsteps[bkeep] * scale, bound[bkeep], color=color, ls="--", lw=0.8)
    if 0 < low < 100 * top:  # diverging runs leave through the top, not squash the rest
        ax.set_ylim(low / 2, 100 * top)


def _plateau_notes(ax: Any, groups: Sequence[Group], summary: dict[str, Any], colors: list) -> None:
    """``fixed_step``: each plateau dotted, and the Richardson numbers of each α vs α/2 pair."""
    colour_of = {g.label: colors[i % len(colors)] for i, g in enumerate(groups)}
    for row in summary.get("plateaus", []):
        ax.axhline(row["plateau"], color=colour_of.get(row["label"]), ls=":", lw=1)
    lines = [
        f"α={p['alpha']:g} vs α/2: plateau ratio {p['ratio']:.2f}; "
        f"2F(α/2) − F(α) − F* = {p['richardson_error']:.2g} "
        f"(gap at α/2: {p['gap_alpha_2']:.2g})"
        for p in summary.get("pairs", [])
    ]
    if lines:
        ax.text(0.02, 0.02, "\n".join(lines), **{**_NOTE, "transform": ax.transAxes})


def _slope_notes(ax: Any, groups: Sequence[Group], summary: dict[str, Any]) -> None:
    """``diminishing``: the slopes, and a slope −1 guide against γ + k through the end of the
    configuration whose slope is nearest −1 (among those with γ > 0)."""
    text = [f"{r['label']}: slope {r['slope_last_decade']:.2f}" for r in summary.get("slopes", [])]
    fast = [r for r in summary.get("slopes", []) if r["gamma"] > 0]
    best = min(fast, key=lambda r: abs(r["slope_last_decade"] + 1), default=None)
    g = next((g for g in groups if best and g.label == best["label"]), None)
    if g is not None:
        steps, gap = g.mean("gap")
        k = np.geomspace(max(steps[-1] / 100, 1.0), steps[-1], 50)
        end = (steps[-1] + best["gamma"]) * gap[-1]
        ax.plot(k, end / (k + best["gamma"]), "k:", lw=1.2,
                label=f"slope −1 in γ + k (γ = {best['gamma']:g})")  # fmt: skip
    ax.text(0.02, 0.02, "\n".join(text) + "\n(log-log slope in γ + k, last decade)",
            **{**_NOTE, "transform": ax.transAxes})  # fmt: skip
