"""An equal tuning budget: every method gets the same ``trials`` points of one declared space.

``hparams_search=budget`` selects the ``BudgetSweeper`` (``conf/hydra/sweeper/budget.yaml``; the
class lives in ``hydra_plugins.rescalelab_plugins.budget_sweeper``, where Hydra requires a
sweeper to be).
It expands ``hydra.sweeper.params`` and the command line's sweeps into a grid as Hydra's basic
sweeper does (``method: sg,bn,whitening``, ``seed: range(0,3)``) and crosses it with ``trials``
points ``θ_1..θ_K`` of the declared ``space``, drawn once, quasi-randomly (a scrambled Sobol'
sequence of ``scipy.stats.qmc``, seeded by ``hydra.sweeper.seed``). Every method and every seed
therefore sees *the same* K points: the comparison differs only by the method.

A dimension ``{key: optim.eps, low, high, log}`` maps the unit coordinate ``u`` to
``low·(high/low)^u`` (``log: true``) or ``low + u·(high − low)``. A key applies to a job only when
its composed config has it (``optim.eps`` is a key of Adam, RMSProp and AdaGrad, not of SGD;
``optim.momentum`` of SGD and RMSProp): such a job gets the other coordinates of the same point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf
from scipy.stats import qmc

from rescalelab.errors import ConfigError

TRIAL_KEY = "budget_trial"  # the trial number, on each job's command line (and run name)


def check_space(space: Mapping[str, Mapping[str, Any]]) -> None:
    """One line naming the key for a bad dimension (:class:`ConfigError`)."""
    if not space:
        raise ConfigError("hydra.sweeper.space is empty: expected at least optim.lr")
    for key, dim in space.items():
        lo, hi, log = dim.get("low"), dim.get("high"), bool(dim.get("log", False))
        ok = isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi
        if not ok or (log and lo <= 0):
            raise ConfigError(
                f"hydra.sweeper.space.{key}={dict(dim)} is invalid: expected low < high"
                + (" and low > 0 (log: true)" if log else "")
            )


def qmc_points(
    space: Mapping[str, Mapping[str, Any]], trials: int, seed: int
) -> list[dict[str, float]]:
    """``trials`` points of ``space``: the first ``trials`` of a scrambled Sobol' sequence.

    Drawn with ``random_base2`` (2^m ≥ trials points, Sobol's balanced size) and cut to
    ``trials``: a prefix of a Sobol' sequence is still low-discrepancy.
    """
    check_space(space)
    if trials < 1:
        raise ConfigError(f"hydra.sweeper.trials={trials} is invalid: expected an integer ≥ 1")
    keys = list(space)
    sobol = qmc.Sobol(d=len(keys), scramble=True, seed=seed)
    unit = sobol.random_base2(max(0, math.ceil(math.log2(trials))))[:trials]
    points = []
    for row in unit:
        point = {}
        for key, u in zip(keys, row):
            lo, hi = float(space[key]["low"]), float(space[key]["high"])
            log = bool(space[key].get("log", False))
            value = lo * (hi / lo) ** u if log else lo + u * (hi - lo)
            point[key] = float(f"{value:.4g}")  # readable run names; 4 digits are plenty
        points.append(point)
    return points


def budget_info(config: Any) -> dict[str, Any] | None:
    """``{"trials", "seed", "space", "keys"}`` when the sweeper is the ``BudgetSweeper``."""
    sweeper = OmegaConf.select(config, "hydra.sweeper")
    if sweeper is None or not str(sweeper.get("_target_", "")).endswith(".BudgetSweeper"):
        return None
    space = OmegaConf.to_container(sweeper.space, resolve=True)
    return {
        "trials": int(sweeper.trials),
        "seed": int(sweeper.seed),
        "space": space,
        "keys": [*space, TRIAL_KEY],  # type: ignore[misc]
    }


def lr_bounds(
    budget: Mapping[str, Any] | None, key: str = "optim.lr"
) -> tuple[float, float] | None:
    """The declared ``(low, high)`` of the stepsize, when the budget declares one."""
    dim = (budget or {}).get("space", {}).get(key)
    return (float(dim["low"]), float(dim["high"])) if dim else None
