"""The theory presets' sweep figure: measured gap vs k with BCN's bounds, on the parent run.

:class:`TheoryReport` is a Hydra callback (registered by the ``experiment=theory_*`` presets
under ``hydra.callbacks.theory_report``). When the multirun ends it reads every child's
``theory/gap`` and ``theory/bound`` histories back from MLflow, averages them over seeds (the
children that differ only in ``seed`` form one *configuration*), and logs to the parent run:

* ``theory/gap_vs_k.png`` — mean gap (solid) and bound (dashed) per configuration, log-log
  (``minibatch``: against gradient evaluations k·n_mb; ``divergence``: final gap vs α per n_mb);
* ``theory/summary.json`` and ``theory/summary.md`` — the numbers of the ``kind``:
  - ``fixed_step``: plateau of each α (mean over k ≥ ``plateau_from``·k_max), the ratio of
    successive plateaus (α vs α/2, ≈ 2), and the estimate F* ≈ 2F_{α/2} − F_α: its error
    2P_{α/2} − P_α against the gap P_{α/2} (``richardson_gain`` = P_{α/2}/|error|);
  - ``diminishing``: the log-log slope of the gap against γ + k over the last decade of k (−1
    for Theorem 4.7's ν/(γ + k) rate; γ of the inverse schedule, 0 for a constant one), drawn
    with a slope −1 guide line;
  - ``minibatch``: pairs with the same α/n_mb compared at equal gradient evaluations;
  - ``divergence``: per n_mb, the measured threshold bracket [largest converged α, smallest
    diverged α] next to the predicted mean-square threshold (and 2/L);
* parent metrics ``theory/<quantity>_<i>`` for the headline numbers.

A child *diverged* when it carries ``rescalelab.status=diverged`` (the divergence guard), or its
last gap is not finite, or exceeds ``diverge_factor`` × its initial gap. A report failure never
fails the sweep: it is printed and tagged ``rescalelab.theory_report`` on the parent.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rescalelab.tracking.run import read_parent

KINDS = ("fixed_step", "diminishing", "minibatch", "divergence")
HUGE = 1e300  # MLflow stores ±inf as ±max float
STATUS_TAG, DIVERGED = "rescalelab.status", "diverged"


@dataclass
class Child:
    run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    gap: list[tuple[int, float]]
    bound: list[tuple[int, float]]

    @property
    def lr(self) -> float:
        return float(self.params.get("optim.lr", "nan"))

    @property
    def batch_size(self) -> int:
        return int(self.params.get("data.batch_size", "1"))

    @property
    def diverged_by_tag(self) -> bool:
        return self.tags.get(STATUS_TAG) == DIVERGED


@dataclass
class Group:
    """The children of one configuration (same swept values except ``seed``)."""

    label: str
    values: dict[str, str]
    children: list[Child] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return self.children[0].lr

    @property
    def batch_size(self) -> int:
        return self.children[0].batch_size

    def mean(self, which: str = "gap") -> tuple[np.ndarray, np.ndarray]:
        """(steps, mean over seeds) on the steps every child logged; ±inf/NaN kept."""
        series = [dict(getattr(c, which)) for c in self.children]
        series = [s for s in series if s]
        if not series:
            return np.zeros(0), np.zeros(0)
        steps = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[_finite_or_inf(s[k]) for k in steps] for s in series])
        return np.array(steps, dtype=float), values.mean(axis=0)


def _finite_or_inf(v: float) -> float:
    return math.inf if (math.isnan(v) or abs(v) >= HUGE) else v


def diverged(child: Child, factor: float) -> bool:
    if child.diverged_by_tag:
        return True
    if not child.gap:
        return child.tags.get("mlflow.runStatus") == "FAILED"
    first, last = _finite_or_inf(child.gap[0][1]), _finite_or_inf(child.gap[-1][1])
    return not math.isfinite(last) or last > factor * max(first, 1e-12)


def loglog_slope(steps: np.ndarray, values: np.ndarray, lo: float, hi: float) -> float:
    """Least-squares slope of log(values) on log(steps) over lo ≤ step ≤ hi (finite, > 0)."""
    keep = (steps >= lo) & (steps <= hi) & np.isfinite(values) & (values > 0)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(steps[keep]), np.log(values[keep]), 1)[0])


def gamma_of(params: dict[str, str]) -> float:
    """γ of an inverse schedule ``α_k = β/(γ + k + 1)`` from a run's params (0 for the others)."""
    if params.get("schedule._target_", "").endswith(".inverse") and "schedule.gamma" in params:
        return float(params["schedule.gamma"])
    return 0.0


def _seeds(group: Group) -> int:
    """Seeds behind a configuration: its children, times the runs of a vectorised runner."""
    return sum(int(c.params.get("theory.runs", "1")) for c in group.children)


def _short(target: str) -> str:
    """``rescalelab.optim.schedules.inverse`` → ``inverse`` (a swept group's option)."""
    return target.rsplit(".", 1)[-1]


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w./\- ]", "_", text)


class TheoryReport(Callback):
    """Hydra callback: the theory figure and summary on the sweep's parent run (module doc)."""

    def __init__(
        self, kind: str = "fixed_step", plateau_from: float = 0.5, diverge_factor: float = 10.0
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"theory_report kind={kind} is invalid: expected one of {KINDS}")
        self.kind, self.plateau_from, self.diverge_factor = kind, plateau_from, diverge_factor

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        parent = read_parent(str(config.hydra.sweep.dir))
        if parent is None:
            return
        from mlflow import MlflowClient  # only needed once the sweep is over

        client = MlflowClient(parent["tracking_uri"])
        try:
            self.report(client, parent)
        except Exception as e:  # the sweep's own outcome matters more than its figure
            client.set_tag(parent["run_id"], "rescalelab.theory_report", f"failed: {e}")
            print(f"warning: the theory report failed: {type(e).__name__}: {e}", file=sys.stderr)

    # -- reading ---------------------------------------------------------------------------------
    def groups(self, client: Any, parent: dict[str, Any]) -> list[Group]:
        runs = client.search_runs(
            [parent["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'",
            max_results=5000,
        )
        swept = [k for k in parent.get("swept_keys") or [] if k != "seed"]
        groups: dict[tuple, Group] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            p = run.data.params
            values = {k: p[k] if k in p else _short(p.get(f"{k}._target_", "?")) for k in swept}
            key = tuple(values.items())
            if key not in groups:
                label = " ".join(f"{k}={v}" for k, v in values.items()) or "all"
                groups[key] = Group(label, values)
            hist = {
                name: [(m.step, m.value) for m in sorted(
                    client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
                for name in ("theory/gap", "theory/bound")
            }  # fmt: skip
            tags = {**run.data.tags, "mlflow.runStatus": run.info.status}
            groups[key].children.append(
                Child(run.info.run_id, dict(p), tags, hist["theory/gap"], hist["theory/bound"])
            )
        return list(groups.values())

    # -- the report ------------------------------------------------------------------------------
    def report(self, client: Any, parent: dict[str, Any]) -> dict[str, Any]:
        groups = self.groups(client, parent)
        summary: dict[str, Any] = {"kind": self.kind, "configurations": []}
        for g in groups:
            steps, gap = g.mean("gap")
            _, bound = g.mean("bound")
            summary["configurations"].append({
                "label": g.label, "seeds": len(g.children), "lr": g.lr, "batch_size": g.batch_size,
                "condition_ok": g.children[0].params.get("theory.condition_ok"),
                "beta_c": g.children[0].params.get("theory.beta_c"),
                "diverged": sum(diverged(c, self.diverge_factor) for c in g.children),
                "final_gap": float(gap[-1]) if len(gap) else None,
                "final_bound": float(bound[-1]) if len(bound) else None,
            })  # fmt: skip
        summary.update(getattr(self, f"_{self.kind}")(client, groups))
        fig = self._figure(groups, summary)
        run_id = parent["run_id"]
        client.log_figure(run_id, fig, "theory/gap_vs_k.png")
        client.log_dict(run_id, summary, "theory/summary.json")
        client.log_text(run_id, self._markdown(summary), "theory/summary.md")
        metrics = summary.get("metrics", {})
        for name, value in metrics.items():
            if value is not None and math.isfinite(value):
                client.log_metric(run_id, _metric_name(name), float(value))
        import matplotlib.pyplot as plt

        plt.close(fig)
        return summary

    def _fixed_step(self, client: Any, groups: list[Group]) -> dict[str, Any]:
        rows, metrics = [], {}
        ordered = sorted(groups, key=lambda g: -g.lr)
        plateau = {}
        for g in ordered:
            steps, gap = g.mean("gap")
            if len(steps) == 0:
                continue
            window = steps >= self.plateau_from * steps[-1]
            plateau[g.label] = float(gap[window].mean())
            p = g.children[0].params
            pred = None
            if p.get("data._target_", "").endswith("QuadraticData"):
                # (α/4) tr Σ*/n_mb with M = 2 tr Σ* (per sample)
                pred = g.lr * float(p["data.M"]) / (8 * g.batch_size)
            rows.append({"label": g.label, "lr": g.lr, "plateau": plateau[g.label],
                         "plateau_predicted": pred})  # fmt: skip
        pairs = []
        for i, (a, b) in enumerate(zip(ordered, ordered[1:])):
            if a.label not in plateau or b.label not in plateau:
                continue
            pa, pb = plateau[a.label], plateau[b.label]
            error = 2 * pb - pa  # (2F_{α/2} − F_α) − F*
            pairs.append({
                "alpha": a.lr, "alpha_2": b.lr, "ratio": pa / pb, "richardson_error": error,
                "gap_alpha_2": pb, "richardson_gain": pb / abs(error) if error else math.inf,
            })  # fmt: skip
            metrics[f"theory/plateau_ratio_{i}"] = pa / pb
            metrics[f"theory/richardson_gain_{i}"] = pairs[-1]["richardson_gain"]
        for i, row in enumerate(rows):
            metrics[f"theory/plateau_{i}"] = row["plateau"]
        return {"plateaus": rows, "pairs": pairs, "metrics": metrics}

    def _diminishing(self, client: Any, groups: list[Group]) -> dict[str, Any]:
        """Slope of log gap against log(γ + k) over the last decade of k (−1 for ν/(γ + k)).

        Theorem 4.7's rate is ν/(γ + k + 1): against k itself the log-log slope only tends to
        −1 once k ≫ γ (with γ = 391 it read −0.80 over k in [2000, 20000]). γ is the inverse
        schedule's ``schedule.gamma``; a constant stepsize has γ = 0 (its slope tends to 0).
        """
        rows, metrics = [], {}
        for i, g in enumerate(groups):
            steps, gap = g.mean("gap")
            if len(steps) == 0:
                continue
            gamma = gamma_of(g.children[0].params)
            slope = loglog_slope(steps + gamma, gap, steps[-1] / 10 + gamma, steps[-1] + gamma)
            rows.append({"label": g.label, "gamma": gamma, "slope_last_decade": slope,
                         "slope_vs_k": loglog_slope(steps, gap, steps[-1] / 10, steps[-1]),
                         "seeds": _seeds(g), "beta_c": g.children[0].params.get("theory.beta_c")})  # fmt: skip
            metrics[f"theory/slope_{i}"] = slope
        return {"slopes": rows, "metrics": metrics}

    def _minibatch(self, client: Any, groups: list[Group]) -> dict[str, Any]:
        rows, metrics = [], {}
        by_ratio: dict[float, list[Group]] = defaultdict(list)
        for g in groups:
            by_ratio[round(g.lr / g.batch_size, 12)].append(g)
        thresholds = self._thresholds(client, groups)
        for i, (ratio, members) in enumerate(sorted(by_ratio.items())):
            members = sorted(members, key=lambda g: g.batch_size)
            if len(members) < 2 or members[0].batch_size == members[-1].batch_size:
                continue
            small, large = members[0], members[-1]
            s_steps, s_gap = small.mean("gap")
            l_steps, l_gap = large.mean("gap")
            s_at = dict(zip(s_steps * small.batch_size, s_gap))
            l_at = dict(zip(l_steps * large.batch_size, l_gap))
            # equal gradient evaluations, at the counts both runs logged (no interpolation)
            evals = np.array(sorted(e for e in set(s_at) & set(l_at) if e >= 1))
            rel = np.array([abs(l_at[e] / s_at[e] - 1) for e in evals])
            thr = thresholds.get(large.batch_size)
            rows.append({
                "alpha_over_n_mb": ratio, "single": small.label, "minibatch": large.label,
                "max_rel_diff": float(rel.max()) if len(rel) else None,
                "median_rel_diff": float(np.median(rel)) if len(rel) else None,
                "rel_diff_at": {str(int(e)): float(r) for e, r in zip(evals, rel)},
                "minibatch_threshold": thr, "below_threshold": None if thr is None else large.lr < thr,
            })  # fmt: skip
            if len(rel):
                metrics[f"theory/minibatch_max_rel_diff_{i}"] = float(rel.max())
        return {"pairs": rows, "metrics": metrics}

    def _divergence(self, client: Any, groups: list[Group]) -> dict[str, Any]:
        by_batch: dict[int, list[Child]] = defaultdict(list)
        for g in groups:
            by_batch[g.batch_size].extend(g.children)
        thresholds = self._thresholds(client, groups)
        rows, metrics = [], {}
        for b, children in sorted(by_batch.items()):
            flags = sorted((c.lr, diverged(c, self.diverge_factor)) for c in children)
            div = [lr for lr, d in flags if d]
            first_div = min(div) if div else None
            ok = [lr for lr, d in flags if not d and (first_div is None or lr < first_div)]
            rows.append({
                "batch_size": b, "runs": [{"lr": lr, "diverged": d} for lr, d in flags],
                "largest_converged": max(ok) if ok else None, "smallest_diverged": first_div,
                "predicted_threshold": thresholds.get(b),
            })  # fmt: skip
            if first_div is not None:
                metrics[f"theory/diverged_from_b{b}"] = first_div
            if ok:
                metrics[f"theory/converged_up_to_b{b}"] = max(ok)
            if thresholds.get(b) is not None:
                metrics[f"theory/predicted_threshold_b{b}"] = thresholds[b]
        L = self._constant(groups, "data.L")
        return {"thresholds": rows, "two_over_L": 2 / L if L else None, "metrics": metrics}

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _constant(groups: list[Group], key: str) -> float | None:
        for g in groups:
            if key in g.children[0].params:
                return float(g.children[0].params[key])
        return None

    def _thresholds(self, client: Any, groups: list[Group]) -> dict[int, float]:
        """Predicted mean-square thresholds per n_mb, from each child's own data config."""
        from hydra.utils import instantiate

        out: dict[int, float] = {}
        problems: dict[str, Any] = {}
        for g in groups:
            b = g.batch_size
            if b in out:
                continue
            child = g.children[0]
            if not child.params.get("data._target_", "").endswith("QuadraticData"):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(child.run_id, "config/config_resolved.yaml", tmp)
                data_cfg = OmegaConf.load(path).data
            key = json.dumps({k: v for k, v in OmegaConf.to_container(data_cfg).items()
                              if k not in ("batch_size", "seed")}, sort_keys=True)  # fmt: skip
            if key not in problems:
                dm = instantiate(data_cfg, noise_estimate=False)
                dm.setup()
                problems[key] = dm
            dm = problems[key]
            if dm.problem.d <= 40:
                out[b] = dm.problem.mean_square_threshold(b, dm.replacement)
        return out

    def _figure(self, groups: list[Group], summary: dict[str, Any]) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5.5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        if self.kind == "divergence":
            for i, row in enumerate(summary["thresholds"]):
                color = colors[i % len(colors)]
                b = row["batch_size"]
                pts = []
                for g in groups:
                    if g.batch_size != b:
                        continue
                    for c in g.children:
                        last = _finite_or_inf(c.gap[-1][1]) if c.gap else math.inf
                        bad = diverged(c, self.diverge_factor)  # (the guard may stop it early)
                        pts.append((c.lr, 1e12 if bad else min(last, 1e12), bad))
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
        else:
            per_eval = self.kind == "minibatch"
            # minibatch: one colour per α/n_mb (a pair to compare), one line style per n_mb
            ratios = sorted({round(g.lr / g.batch_size, 12) for g in groups})
            sizes = sorted({g.batch_size for g in groups})
            styles, top, low = ["-", "-.", ":", (0, (5, 1))], 0.0, math.inf
            for i, g in enumerate(groups):
                color = colors[i % len(colors)]
                ls: Any = "-"
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
                        label=f"{g.label} ({_seeds(g)} seeds)")  # fmt: skip
                bkeep = (bsteps >= 1) & np.isfinite(bound) & (bound > 0)
                if bkeep.any():
                    ax.plot(bsteps[bkeep] * scale, bound[bkeep], color=color, ls="--", lw=0.8)
            if 0 < low < 100 * top:  # diverging runs leave through the top, not squash the rest
                ax.set_ylim(low / 2, 100 * top)
            if self.kind == "fixed_step":
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
                    ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, fontsize=7,
                            va="bottom", bbox={"facecolor": "white", "alpha": 0.8})  # fmt: skip
            if self.kind == "diminishing":
                text = [f"{r['label']}: slope {r['slope_last_decade']:.2f}"
                        for r in summary.get("slopes", [])]  # fmt: skip
                # the guide: slope −1 against γ + k, through the end of the 1/k configuration
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
                        transform=ax.transAxes, fontsize=7, va="bottom",
                        bbox={"facecolor": "white", "alpha": 0.8})  # fmt: skip
            ax.set(xscale="log", yscale="log",
                   xlabel="gradient evaluations k·n_mb" if per_eval else "SG step k",
                   ylabel="F(w_k) − F*  (mean over seeds)",
                   title={
                       "fixed_step": "measured (solid), Thm 4.6 bound (dashed), plateaus (dotted)",
                       "diminishing": "measured (solid), Thm 4.6 / 4.7 bound (dashed)",
                       "minibatch": "colour: α/n_mb, style: n_mb; thin dashed: Thm 4.6 bound",
                   }[self.kind])  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    @staticmethod
    def _markdown(summary: dict[str, Any]) -> str:
        def fmt(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = [f"# theory report: {summary['kind']}", ""]
        for name, rows in summary.items():
            if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
                continue
            keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
            lines += [f"## {name}", "", "| " + " | ".join(keys) + " |",
                      "|" + "---|" * len(keys)]  # fmt: skip
            lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines)


__all__ = ["TheoryReport", "diverged", "gamma_of", "loglog_slope"]
