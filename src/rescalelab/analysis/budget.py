"""An equal tuning budget: every method gets the same ``trials`` points of one declared space.

``hparams_search=budget`` selects :class:`BudgetSweeper` (``conf/hydra/sweeper/budget.yaml``).
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

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from scipy.stats import qmc

from rescalelab.errors import ConfigError

TRIAL_KEY = "+budget_trial"  # the trial number, on each job's command line (and run name)


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


class BudgetSweeper(Sweeper):
    """The grid of ``params`` (and the command line) × ``trials`` QMC points of ``space``."""

    def __init__(
        self,
        trials: int,
        space: Mapping[str, Mapping[str, Any]],
        seed: int = 0,
        params: Mapping[str, str] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.trials, self.seed, self.max_batch_size = int(trials), int(seed), max_batch_size
        self.params = dict(params or {})
        self.space = OmegaConf.to_container(space) if OmegaConf.is_config(space) else dict(space)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def job_overrides(self, arguments: Sequence[str]) -> list[list[str]]:
        """Every job's overrides: grid combination, then the trial's point and number."""
        assert self.hydra_context is not None and self.config is not None
        points = qmc_points(self.space, self.trials, self.seed)  # type: ignore[arg-type]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        grid_args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        overrides = [o for o in parser.parse_overrides(grid_args) if o.key_or_group not in
                     self.space]  # fmt: skip
        axes = {}  # key -> its values, the command line replacing params key by key
        for o in overrides:
            key = o.get_key_element()
            if o.is_sweep_override():
                axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
            else:
                axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        combos = list(itertools.product(*axes.values()))
        jobs = []
        for combo in combos:
            # which keys of the space this combination's optimizer has (composed once per combo)
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(combo))
            present = [k for k in self.space if OmegaConf.select(cfg, k) is not None]
            for t, point in enumerate(points):
                jobs.append([*combo, *(f"{k}={point[k]}" for k in present), f"{TRIAL_KEY}={t}"])
        return jobs

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        jobs = self.job_overrides(arguments)
        size = self.max_batch_size or len(jobs)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, first = [], 0
        for i in range(0, len(jobs), size):
            batch = jobs[i : i + size]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # re-raises a job's exception, as the basic sweeper does
            first += len(batch)
            returns.append(results)
        return returns


def budget_info(config: Any) -> dict[str, Any] | None:
    """``{"trials", "seed", "space", "keys"}`` when the sweeper is :class:`BudgetSweeper`."""
    sweeper = OmegaConf.select(config, "hydra.sweeper")
    if sweeper is None or not str(sweeper.get("_target_", "")).endswith(".BudgetSweeper"):
        return None
    space = OmegaConf.to_container(sweeper.space, resolve=True)
    return {
        "trials": int(sweeper.trials),
        "seed": int(sweeper.seed),
        "space": space,
        "keys": [*space, TRIAL_KEY.lstrip("+")],  # type: ignore[misc]
    }


def lr_bounds(
    budget: Mapping[str, Any] | None, key: str = "optim.lr"
) -> tuple[float, float] | None:
    """The declared ``(low, high)`` of the stepsize, when the budget declares one."""
    dim = (budget or {}).get("space", {}).get(key)
    return (float(dim["low"]), float(dim["high"])) if dim else None
