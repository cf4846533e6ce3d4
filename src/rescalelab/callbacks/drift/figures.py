"""Figures of the drift instruments, built from the long-format table of logged scalars.

Everything here works on what a run leaves behind (``drift/summary.parquet``: columns
``step, layer, stat, value``; ``drift/meta.json``), so the figures are the same whether the
callback draws them at the end of fit or ``scripts/plot_drift.py`` redraws them later. Figures
are plain :class:`matplotlib.figure.Figure` objects (no pyplot state, no display needed).

* ``drift_heatmap``: layers (input to output) x logged steps, colour log10 ``drift_mean``
  (std/step) and log10 ``drift_logvar`` (log-variance/step); dotted lines at epoch starts, a red
  line at the BN → whitening switch (only where one happened: ``meta["switch_step"]``).
* ``lag_heatmap``: the signed median log(v/r_var) of the running estimates (diverging colours
  centred at 0; blue: the variance is underestimated) and ``lag_mean_z``; markers at each
  layer's ``settle_step``.
* ``lag_curves``: per layer with running estimates, one panel per quantity (one y-axis each):
  ``lag_mean_z`` against its noise floor and the probe's lag, ``lag_logvar`` likewise, and
  ``lag_steps`` against the EMA references (1−ρ)/ρ and 1/ρ.
* ``dead_units``: ``dead_frac`` and the update ratio ||Δw||/||w|| per layer.
* ``warmup_sweep``: across runs with different warm-up lengths k, the training loss and the
  post-switch staleness against epochs since the switch (median and IQR over seeds).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def close(fig: Figure) -> None:
    """Release a figure's memory (plain Figures are not tracked by pyplot)."""
    fig.clear()


def _layers(table: Any, meta: dict[str, Any], stat: str) -> list[str]:
    present = set(table.loc[table["stat"] == stat, "layer"])
    order = [n for n in meta.get("layers", []) if n in present]
    return order + sorted(present - set(order) - {""})


def _matrix(table: Any, stat: str, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values[len(layers), len(steps)])`` with NaN where a layer has no value."""
    sub = table[(table["stat"] == stat) & table["layer"].isin(layers)]
    steps = np.array(sorted(set(sub["step"])), dtype=np.int64)
    values = np.full((len(layers), len(steps)), np.nan)
    if len(steps):
        col = {s: i for i, s in enumerate(steps)}
        row = {n: i for i, n in enumerate(layers)}
        for layer, step, v in zip(sub["layer"], sub["step"], sub["value"]):
            values[row[layer], col[step]] = v
    return steps, values


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around ``steps + 1`` (so step 0 sits on a log axis)."""
    x = steps.astype(float) + 1
    if len(x) == 1:
        return np.array([x[0] / 1.5, x[0] * 1.5])
    mid = np.sqrt(x[:-1] * x[1:])
    first = x[0] * x[0] / mid[0]
    last = x[-1] * x[-1] / mid[-1]
    return np.concatenate([[first], mid, [last]])


def _marks(ax: Any, meta: dict[str, Any]) -> None:
    """Dotted lines at the epoch starts, and a red "switch" line where BN → whitening switched
    (``switch_step`` is ``None`` when nothing switched)."""
    for s in meta.get("epoch_starts", [])[1:]:
        ax.axvline(s + 1, color="0.5", lw=0.6, ls=":")
    sw = meta.get("switch_step")
    if sw is not None:
        ax.axvline(sw + 1, color="red", lw=1.2, label="switch")


def _heat(
    fig: Figure, ax: Any, table: Any, meta: dict, stat: str, layers: list[str], **kw: Any
) -> Any:
    steps, values = _matrix(table, stat, layers)
    if not len(steps):
        ax.text(0.5, 0.5, f"no {stat}", ha="center", va="center", transform=ax.transAxes)
        return None
    transform = kw.pop("transform", None)
    if transform is not None:
        values = transform(values)
    mesh = ax.pcolormesh(
        _edges(steps), np.arange(len(layers) + 1), np.ma.masked_invalid(values), **kw
    )
    ax.set_xscale("log")
    ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=7)
    ax.set_ylim(len(layers), 0)  # input layer on top
    ax.set_xlabel("step + 1")
    _marks(ax, meta)
    return mesh


def _log10(floor: float):
    return lambda v: np.log10(np.maximum(v, floor))


def drift_heatmap(table: Any, meta: dict[str, Any]) -> Figure:
    """log10 drift_mean and drift_logvar, layers x steps."""
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, stat, title in (
        (axes[0], "drift_mean", "log10 drift of the means (std / step; black: below noise)"),
        (axes[1], "drift_logvar", "log10 drift of the log-variances (per step)"),
    ):
        layers = _layers(table, meta, stat)
        mesh = _heat(fig, ax, table, meta, stat, layers, cmap="magma", transform=_log10(1e-4))
        ax.set_title(title, fontsize=9)
        if mesh is not None:
            fig.colorbar(mesh, ax=ax)
    fig.suptitle("Statistics drift per layer", fontsize=10)
    return fig


def lag_heatmap(table: Any, meta: dict[str, Any]) -> Figure:
    """Signed log-variance lag (diverging, centred at 0) and lag_mean_z, with settle steps."""
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    layers = _layers(table, meta, "lag_logvar_signed")
    if not layers:
        for ax in axes:
            ax.text(
                0.5, 0.5, "no running estimates to lag (norm=none?)",
                ha="center", va="center", transform=ax.transAxes,
            )  # fmt: skip
        return fig
    _, signed = _matrix(table, "lag_logvar_signed", layers)
    lim = float(np.nanpercentile(np.abs(signed), 98)) if np.isfinite(signed).any() else 1.0
    lim = lim if lim > 0 else 1.0
    mesh = _heat(fig, axes[0], table, meta, "lag_logvar_signed", layers, cmap="RdBu", vmin=-lim, vmax=lim)  # fmt: skip
    axes[0].set_title("median log(v / r_var): blue = variance underestimated", fontsize=9)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes[0])
    mesh = _heat(fig, axes[1], table, meta, "lag_mean_z", layers, cmap="viridis")
    axes[1].set_title("lag_mean_z: RMS (m − r_mean)/r_std", fontsize=9)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes[1])
    settle = meta.get("settle_step") or {}
    for ax in axes:
        for i, name in enumerate(layers):
            s = settle.get(name)
            if s is not None:
                ax.plot([s + 1], [i + 0.5], marker="v", color="white", mec="black", ms=7)
    fig.suptitle("Lag of the running estimates (▼ settle step)", fontsize=10)
    return fig


def _series(table: Any, layer: str, stat: str) -> tuple[np.ndarray, np.ndarray]:
    sub = table[(table["layer"] == layer) & (table["stat"] == stat)].sort_values("step")
    return sub["step"].to_numpy(), sub["value"].to_numpy()


# One panel per quantity, one y-axis each: the lag of the means (std units) with its noise
# floor, the lag of the log-variances (log units) with its floor, the lag in steps with the EMA
# references.
LAG_PANELS = (
    ("lag of the mean (std units)", (
        ("lag_mean_z", dict(color="C0", lw=1)),
        ("noise_floor", dict(color="C0", lw=1, ls="--")),
        ("lag_mean_z_probe", dict(color="C0", marker="o", ms=3, lw=0)),
    )),
    ("lag of the log-variance", (
        ("lag_logvar", dict(color="C1", lw=1)),
        ("noise_floor_logvar", dict(color="C1", lw=1, ls="--")),
        ("lag_logvar_probe", dict(color="C1", marker="s", ms=3, lw=0)),
    )),
    ("lag (steps)", (
        ("lag_steps", dict(color="C2", marker="x", lw=0)),
        ("lag_steps_probe", dict(color="C2", marker="+", lw=0)),
    )),
)  # fmt: skip


def lag_curves(table: Any, meta: dict[str, Any]) -> Figure:
    """Per layer with running estimates (rows), one quantity per panel (columns): the lag of
    the means against its noise floor and the probe's, the same for the log-variances, and the
    lag in steps against the EMA references (1−ρ)/ρ and 1/ρ."""
    layers = _layers(table, meta, "lag_mean_z")
    n = len(layers)
    fig = Figure(figsize=(12, 2.4 * max(n, 1) + 0.6), layout="constrained")
    if not n:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no running estimates to lag", ha="center", va="center")
        return fig
    rho = meta.get("rho") or {}
    axes = fig.subplots(n, len(LAG_PANELS), squeeze=False, sharex=True)
    for row, name in zip(axes, layers):
        for ax, (title, stats) in zip(row, LAG_PANELS):
            for stat, style in stats:
                s, v = _series(table, name, stat)
                if len(s):
                    ax.plot(s + 1, v, label=stat, **style)
            ax.set_xscale("log")
            ax.set_title(f"{name}: {title}", fontsize=8)
            _marks(ax, meta)
        r = rho.get(name)
        if r:
            row[-1].axhline((1 - r) / r, color="C2", lw=0.8, ls=":", label="(1−ρ)/ρ")
            row[-1].axhline(1 / r, color="C2", lw=0.8, ls="-.", label="1/ρ")
    for ax in axes[-1]:
        ax.set_xlabel("step + 1", fontsize=8)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("Lag of the running estimates per layer", fontsize=10)
    return fig


def dead_units(table: Any, meta: dict[str, Any]) -> Figure:
    """dead_frac and ||Δw||/||w|| per layer against steps."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, stat, title, log in (
        (axes[0], "dead_frac", "fraction of dead ReLU units (zero on the whole batch)", False),
        (axes[1], "update_ratio", "update ratio ||Δw|| / ||w||", True),
    ):
        positive = False
        for i, name in enumerate(_layers(table, meta, stat)):
            s, v = _series(table, name, stat)
            ax.plot(s + 1, v, lw=1, color=f"C{i % 10}", label=name)
            positive = positive or bool(np.any(v > 0))
        ax.set_xscale("log")
        if log and positive:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        _marks(ax, meta)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncols=2)
    axes[1].set_xlabel("step + 1")
    return fig


def run_figures(table: Any, meta: dict[str, Any]) -> dict[str, Figure]:
    """Every per-run figure, by artifact name."""
    return {
        "drift_heatmap": drift_heatmap(table, meta),
        "lag_heatmap": lag_heatmap(table, meta),
        "lag_curves": lag_curves(table, meta),
        "dead_units": dead_units(table, meta),
    }


# ------------------------------------------------------------------------------------------
# Across a warm-up sweep


def staleness(
    table: Any,
    switch_step: int | None,
    steps_per_epoch: int,
    stat: str = "lag_logvar_probe",
) -> tuple[np.ndarray, np.ndarray]:
    """Median over layers of ``stat`` at every step from the switch on, against epochs since
    the switch: how stale the whitening statistics get after k warm-up epochs."""
    if switch_step is None or steps_per_epoch <= 0:
        return np.array([]), np.array([])
    sub = table[(table["stat"] == stat) & (table["step"] >= switch_step)]
    if not len(sub):
        return np.array([]), np.array([])
    med = sub.groupby("step")["value"].median().sort_index()
    x = (med.index.to_numpy() - switch_step) / steps_per_epoch
    return x, med.to_numpy()


def _band(ax: Any, curves: Sequence[tuple[np.ndarray, np.ndarray]], color: str, label: str) -> None:
    """Median and 25-75% band of curves interpolated onto their common x grid."""
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = grid[(grid >= lo) & (grid <= hi)] if hi >= lo else grid
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    q25, q50, q75 = np.percentile(ys, [25, 50, 75], axis=0)
    ax.plot(grid, q50, color=color, lw=1.2, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(grid, q25, q75, color=color, alpha=0.2, lw=0)


def warmup_sweep(runs: Sequence[dict[str, Any]]) -> Figure:
    """Loss curves and post-switch staleness per warm-up length k.

    Each run: ``k`` (warm-up epochs), ``loss`` = (steps, values), ``steps_per_epoch``,
    ``staleness`` = (epochs since switch, values) and optionally ``switch_step``.
    """
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_loss, ax_st = fig.subplots(1, 2)
    by_k: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_k[r["k"]].append(r)
    for i, k in enumerate(sorted(by_k, key=lambda v: (v is None, v))):
        color = f"C{i % 10}"
        group = by_k[k]
        loss = []
        for r in group:
            s, v = (np.asarray(a, dtype=float) for a in r["loss"])
            spe = max(int(r.get("steps_per_epoch") or 1), 1)
            loss.append((s / spe, v))
        _band(ax_loss, loss, color, f"k={k}")
        _band(ax_st, [tuple(np.asarray(a, dtype=float) for a in r["staleness"]) for r in group], color, f"k={k}")  # fmt: skip
        for r in group:
            if r.get("switch_step") is not None:
                spe = max(int(r.get("steps_per_epoch") or 1), 1)
                ax_loss.axvline(r["switch_step"] / spe, color=color, lw=0.6, ls=":")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss (median, 25-75% over seeds)", fontsize=9)
    ax_st.set_xlabel("epochs since the switch")
    ax_st.set_title("staleness after the switch: median over layers of lag_logvar_probe", fontsize=9)  # fmt: skip
    for ax in (ax_loss, ax_st):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("BN warm-up sweep: what k warm-up epochs buy", fontsize=10)
    return fig
