"""The theory report's records and pure math (no MLflow, no plotting): the configurations of a
theory sweep (:class:`Group`: the children that differ only in ``seed``), their seed-mean
gap ``F(w_k) − F*`` and bound, divergence, and log-log slopes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rescalelab.analysis.child import Child

HUGE = 1e300  # MLflow stores ±inf as ±max float


def lr_of(child: Child) -> float:
    """α of a child (NaN when its run has no ``optim.lr``)."""
    return math.nan if child.lr is None else child.lr


@dataclass
class Group:
    """The children of one configuration (same swept values except ``seed``)."""

    label: str
    values: dict[str, str]
    children: list[Child] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return lr_of(self.children[0])

    @property
    def batch_size(self) -> int:
        return self.children[0].batch_size

    def mean(self, which: str = "gap") -> tuple[np.ndarray, np.ndarray]:
        """(steps, mean over seeds) on the steps every child logged; ±inf/NaN kept."""
        series = [dict(c.histories.get(f"theory/{which}", [])) for c in self.children]
        series = [s for s in series if s]
        if not series:
            return np.zeros(0), np.zeros(0)
        steps = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[finite_or_inf(s[k]) for k in steps] for s in series])
        return np.array(steps, dtype=float), values.mean(axis=0)


def finite_or_inf(v: float) -> float:
    return math.inf if (math.isnan(v) or abs(v) >= HUGE) else v


def diverged(child: Child, factor: float) -> bool:
    """Tagged by the guard, or the last gap not finite or above ``factor`` × the first (a child
    without a gap history: when its run failed)."""
    if child.diverged_by_tag:
        return True
    gap = child.histories.get("theory/gap", [])
    if not gap:
        return child.status == "FAILED"
    first, last = finite_or_inf(gap[0][1]), finite_or_inf(gap[-1][1])
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


def seeds_of(group: Group) -> int:
    """Seeds behind a configuration: its children, times the runs of a vectorised runner."""
    return sum(int(c.params.get("theory.runs", "1")) for c in group.children)


def short(target: str) -> str:
    """``rescalelab.optim.schedules.inverse`` → ``inverse`` (a swept group's option)."""
    return target.rsplit(".", 1)[-1]
