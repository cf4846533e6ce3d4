"""Tuneability of a method: three measures that stay meaningful near zero loss.

Symbols: a method was tried at ``N`` configurations (trials) ``θ_1..θ_N`` of the search space,
each with several seeds. ``F(θ)`` is the final value of the training loss (mean over the last
epoch); ``L0`` the initial loss of the task; the *target* is ``L* = r · L0`` (``r = 1e-2`` by
default). A diverged run counts as ``F = +inf``.

(a) **Expected best after k trials** (Sivaprasad et al., ICML 2020, after Dodge et al. 2019):
    drawing ``k`` of the ``N`` observed results uniformly with replacement, with
    ``x_(1) ≤ … ≤ x_(N)`` the sorted results, the expected minimum is the exact order statistic

        E[min_k] = Σ_i x_(i) · [((N − i + 1)/N)^k − ((N − i)/N)^k],   k = 1..N.

    ``k = 1`` is the mean, ``k → ∞`` the best. A diverged trial enters as ``L0`` (it is worth
    no more than not training), so that the expectation stays finite.
(b) **Share of the search range that reaches the target**, in decades of α = ``optim.lr``:
    each trial stands for its cell of ``log10 α`` (from the midpoints to its neighbours; the
    outer cells end at the declared range, or half a gap beyond the outer trials of a grid);
    the share is ``Σ cells of the trials that reach L*`` (decades) and that over the whole range.
(c) **Time to target at the best setting** ``θ* = argmin F``: the first epoch whose mean is
    ``≤ L*`` (counted from 1: ``epochs_to_target``) and the wall seconds from the run's start
    to the moment that epoch's value was logged (``seconds_to_target``); median over seeds,
    ``+inf`` when more than half of the seeds never reach it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TARGET_RATIO = 1e-2


def expected_best_after_k(values: Sequence[float], cap: float | None = None) -> np.ndarray:
    """``E[min of k draws]`` for ``k = 1..N`` (formula (a)); non-finite values become ``cap``.

    Without ``cap`` a non-finite value makes every entry ``+inf``. Empty input: empty array.
    """
    x = np.array(values, dtype=float)
    if cap is not None:
        x = np.where(np.isfinite(x), x, cap)
    x = np.sort(np.where(np.isnan(x), np.inf, x))
    n = x.size
    if n == 0:
        return np.zeros(0)
    i = np.arange(1, n + 1)
    out = []
    for k in range(1, n + 1):
        w = ((n - i + 1) / n) ** k - ((n - i) / n) ** k
        out.append(float(np.sum(np.where(w > 0, x * w, 0.0))) if np.all(np.isfinite(x[w > 0]))
                   else math.inf)  # fmt: skip
    return np.array(out)


def range_share(
    lrs: Sequence[float],
    reached: Sequence[float],
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float, float]:
    """``(decades reaching the target, decades of the whole range, share)`` (formula (b)).

    ``reached[j]`` is 1 when trial ``j`` reaches the target, 0 if not (a fraction when several
    trials share one α). ``bounds``: the declared range ``(α_lo, α_hi)``; without it the outer
    cells extend half a gap beyond the outermost α. Fewer than two distinct α: all NaN.
    """
    by_lr: dict[float, list[float]] = {}
    for a, r in zip(lrs, reached):
        by_lr.setdefault(math.log10(a), []).append(float(r))
    u = np.array(sorted(by_lr))
    if u.size < 2:
        return math.nan, math.nan, math.nan
    mids = (u[1:] + u[:-1]) / 2
    if bounds is not None:
        lo, hi = math.log10(bounds[0]), math.log10(bounds[1])
    else:
        lo, hi = u[0] - (u[1] - u[0]) / 2, u[-1] + (u[-1] - u[-2]) / 2
    edges = np.clip(np.concatenate([[lo], mids, [hi]]), lo, hi)
    cells = np.diff(edges)
    frac = np.array([np.mean(by_lr[v]) for v in u])
    total = hi - lo
    decades = float(np.sum(cells * frac))
    return decades, float(total), decades / total if total > 0 else math.nan


def time_to_target(
    curve: Sequence[tuple[float, float, float]], start_ms: float | None, target: float
) -> tuple[float, float]:
    """``(epochs, seconds)`` until an epoch mean is ``≤ target`` (formula (c)), one run.

    ``curve``: ``(epoch index from 0, epoch mean, timestamp in ms when it was logged)``.
    ``(+inf, +inf)`` when the run never reaches the target.
    """
    for epoch, value, stamp in curve:
        if math.isfinite(value) and value <= target:
            seconds = (stamp - start_ms) / 1000 if start_ms is not None else math.nan
            return epoch + 1, seconds
    return math.inf, math.inf


def median_inf(values: Sequence[float]) -> float:
    """Median with ``+inf`` allowed (an unreached target); NaN when empty."""
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan
    arr = np.sort(arr)
    n = arr.size
    lo, hi = arr[(n - 1) // 2], arr[n // 2]
    return float(lo if lo == hi else (math.inf if math.isinf(hi) else (lo + hi) / 2))
