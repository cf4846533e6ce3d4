"""Performance profiles (Dolan & Moré 2002; the AlgoPerf benchmark's form) over tasks.

For tasks ``t`` (the ``data`` options of a sweep) and methods ``m`` with a cost ``c_{t,m}``
(epochs, or seconds, to the target at the method's best setting; ``+inf`` if never reached),
the ratio to the best method on that task is ``r_{t,m} = c_{t,m} / min_m c_{t,m}`` and the
profile of ``m`` is

    ρ_m(τ) = |{t : r_{t,m} ≤ τ}| / |T|,   τ ≥ 1:

the fraction of tasks that ``m`` solves within ``τ`` times the best method's cost. ``ρ_m(1)``
is the share of tasks where ``m`` is (one of) the fastest; ``ρ_m(∞)`` the share it solves.
A task that no method solves counts as unsolved for all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def ratios(costs: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{task: {method: r_{t,m}}}``; ``+inf`` for an unsolved (task, method)."""
    out: dict[str, dict[str, float]] = {}
    for task, by_method in costs.items():
        best = min((c for c in by_method.values() if math.isfinite(c)), default=math.inf)
        out[task] = {
            m: (c / best if math.isfinite(c) and math.isfinite(best) and best > 0 else
                (1.0 if c == best == 0 else math.inf))
            for m, c in by_method.items()
        }  # fmt: skip
    return out


def profile(
    costs: Mapping[str, Mapping[str, float]], taus: Sequence[float]
) -> dict[str, np.ndarray]:
    """``{method: [ρ_m(τ) for τ in taus]}`` over every task of ``costs``."""
    r = ratios(costs)
    methods = list(dict.fromkeys(m for by in costs.values() for m in by))
    n = len(r)
    return {
        m: np.array(
            [sum(r[t].get(m, math.inf) <= tau for t in r) / n if n else math.nan for tau in taus]
        )
        for m in methods
    }
